"""The trainer -> operator interface.

The trainer never needs the operator and the operator never needs object-store credentials, so
everything the operator shows comes through two channels defined here:

* **Progress** (:class:`~kubetune_api.models.Progress`): rank 0 patches
  ``status.progress`` of its own FineTuneJob (a per-job Role allows exactly that), throttled to
  ``reporting.progressEverySeconds``; the same numbers go to the log as JSON lines prefixed
  ``KUBETUNE_PROGRESS`` for anyone tailing pod logs.
* **Result** (:class:`TrainerResult`): written as compact JSON to the pod's termination message
  file (``terminationMessagePath``, at most 4096 bytes, so no samples or per-file lists) and to
  ``status.trainerResult``; the operator turns it into status fields and a ModelVersion object.

Exit codes are part of the contract: the operator's podFailurePolicy fails the Job at once on
:data:`EXIT_BAD_INPUT`, :data:`EXIT_GATES_FAILED` and :data:`EXIT_DIVERGED` (retrying cannot help)
instead of burning ``backoffLimit``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kubetune_api.models import ApiModel, GatesStatus, VersionRef

EXIT_OK = 0
#: Invalid spec, invalid data beyond maxInvalidRecords, unsafe model files, unreachable hub.
EXIT_BAD_INPUT = 3
#: The version was published but failed its gates, so it is not promotable.
EXIT_GATES_FAILED = 4
#: Loss became NaN/inf or diverged.
EXIT_DIVERGED = 5
#: Any other error (retried by the Job's backoffLimit).
EXIT_ERROR = 1

PROGRESS_LOG_PREFIX = "KUBETUNE_PROGRESS "
RESULT_LOG_PREFIX = "KUBETUNE_RESULT "
TERMINATION_MESSAGE_LIMIT = 4096

Reason = Literal[
    "Published",
    "Reused",
    "InvalidSpec",
    "InvalidData",
    "UnsafeModel",
    "FetchFailed",
    "GateFailed",
    "Diverged",
    "UnsupportedHardware",
    "WillNotFit",
    "Error",
    # A sweep's trial (RunConfig.trial) trained and measured its objective; it publishes nothing.
    "TrialComplete",
]


class TrainerResult(ApiModel):
    """The final outcome of one trainer run."""

    outcome: Literal["Succeeded", "Failed"] = Field(
        description="Succeeded when a version was published or reused."
    )
    reason: Reason = Field(description="Why, in one CamelCase word.")
    message: str = Field(default="", max_length=1500, description="What happened and what to do.")
    model: str | None = Field(default=None, description="Model name.")
    base: str | None = Field(default=None, description="Base model URI.")
    parent: str | None = Field(default=None, description="Parent version when chained (modelversion://...).")
    method: str | None = Field(default=None, description="lora, qlora or full.")
    version: VersionRef | None = Field(default=None, description="The version published or reused.")
    inputs_digest: str | None = Field(
        default=None, description="Digest of base, data, config and trainer version."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="Tuned-model metrics.")
    gates: GatesStatus | None = Field(default=None, description="Gate results.")
    quantized: list[str] = Field(default_factory=list, description="Quantized formats published.")
    promoted_alias: str | None = Field(default=None, description="Alias moved to this version, if any.")
    resumed_from_step: int | None = Field(
        default=None, description="Checkpoint step this attempt resumed from."
    )
    created: str | None = Field(default=None, description="When the version was published (RFC 3339).")

    def to_termination_message(self) -> str:
        """Compact JSON that fits Kubernetes' 4096-byte termination message limit."""
        text = self.model_dump_json(by_alias=True, exclude_none=True)
        if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
            return text
        # Shed detail, never validity: the operator must always be able to parse it.
        slim = self
        updates: tuple[dict[str, Any], ...] = (
            {"message": self.message[:300], "gates": None},
            {"metrics": {}},
            {"message": ""},
        )
        for update in updates:
            slim = slim.model_copy(update=update)
            text = slim.model_dump_json(by_alias=True, exclude_none=True)
            if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
                break
        return text
