"""Progress and result reporting (the trainer side of :mod:`kubetune_api.reports`).

Three sinks, all fed by rank 0:

* a human log line every ``logEverySteps`` (step/total, loss, learning rate, tokens/s, ETA) and a
  tqdm bar when attached to a terminal;
* a machine-readable JSON line prefixed ``KUBETUNE_PROGRESS`` / ``KUBETUNE_RESULT`` on stderr;
* in a cluster, a JSON merge patch of ``status.progress``/``status.stage`` on the trainer's own
  FineTuneJob, throttled, through the pod's ServiceAccount token (a per-job Role allows exactly
  that). Reporting failures are logged and never stop training.

Written by hand on urllib rather than the kubernetes client: the trainer image stays free of
operator dependencies, and one PATCH with a bearer token is all it needs. The token is never
logged.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from kubetune_api.models import Progress
from kubetune_api.names import API_GROUP, API_VERSION
from kubetune_api.reports import PROGRESS_LOG_PREFIX, RESULT_LOG_PREFIX, TrainerResult

log = logging.getLogger("kubetune.trainer")

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class KubeStatusClient:
    """Merge-patches the status of one FineTuneJob with the pod's ServiceAccount token."""

    def __init__(self, server: str, namespace: str, name: str, token: str, ca_file: str | None) -> None:
        self._url = (
            f"{server}/apis/{API_GROUP}/{API_VERSION}/namespaces/{namespace}/finetunejobs/{name}/status"
        )
        self._token = token
        self._ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()

    @classmethod
    def from_environment(cls) -> KubeStatusClient | None:
        """The in-cluster client, or None when not running in a pod that may report."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        name = os.environ.get("KUBETUNE_JOB_NAME")
        namespace = os.environ.get("KUBETUNE_NAMESPACE")
        sa_dir = Path(os.environ.get("KUBETUNE_SA_DIR", SA_DIR))
        token_file = sa_dir / "token"
        if not (host and name and namespace and token_file.is_file()):
            return None
        ca = sa_dir / "ca.crt"
        server = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        return cls(server, namespace, name, token_file.read_text().strip(), str(ca) if ca.is_file() else None)

    def patch_status(self, status: dict[str, Any]) -> bool:
        """Send ``{"status": status}`` as a merge patch. False (logged) on any failure."""
        body = json.dumps({"status": status}).encode()
        req = urllib.request.Request(
            self._url,
            data=body,
            method="PATCH",
            headers={
                "Content-Type": "application/merge-patch+json",
                "Authorization": f"Bearer {self._token}",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=10, context=self._ctx) as resp:
                return bool(200 <= resp.status < 300)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("could not report status to the API server: %s", getattr(exc, "reason", exc))
            return False


class Reporter:
    """What rank 0 tells the user and the operator. Other ranks get a silent reporter."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        kube: KubeStatusClient | None = None,
        termination_message_path: str | None = None,
        min_interval_s: float = 10.0,
        stream: TextIO | None = None,
        tracker: Any = None,
    ) -> None:
        """``tracker`` (:class:`kubetune_trainer.tracking.MlflowTracker`) gets every stage, progress
        report and the result too (``spec.tracking.mlflow``)."""
        self.enabled = enabled
        self.tracker = tracker
        self.kube = kube
        self.termination_message_path = termination_message_path
        self.min_interval_s = min_interval_s
        self.stream = stream or sys.stderr
        self._last_patch = 0.0
        self._stage: str | None = None
        self._bar: Any = None

    # --- stages -------------------------------------------------------------------------------
    def stage(self, stage: str, message: str = "") -> None:
        """Enter a pipeline stage (Fetching, PreparingData, Training, Evaluating, ...)."""
        if not self.enabled:
            return
        if stage == self._stage and not message:
            return  # already there (loading the tokenizer and preparing the data are one stage)
        self._stage = stage
        if self.tracker is not None:
            self.tracker.stage(stage)
        print(f"[kubetune] stage {stage}" + (f": {message}" if message else ""), file=self.stream, flush=True)
        if self.kube:
            self.kube.patch_status({"stage": stage, "progress": {"stage": stage, "updatedAt": now_rfc3339()}})

    # --- the pre-flight plan ----------------------------------------------------------------------
    def plan(self, status: dict[str, Any]) -> None:
        """The plan's verdict (a :class:`~kubetune_api.models.PlanStatus` as JSON) into ``status.plan``."""
        if self.enabled and self.kube:
            self.kube.patch_status({"plan": status})

    # --- progress -----------------------------------------------------------------------------
    def progress(self, p: Progress, *, force: bool = False, log_line: bool = True) -> None:
        """Report training progress; the status patch is throttled unless ``force``."""
        if not self.enabled:
            return
        p = p.model_copy(update={"stage": self._stage or p.stage, "updated_at": now_rfc3339()})
        if self.tracker is not None:
            self.tracker.progress(p)
        if self._bar is not None:
            self._bar.n = p.step
            self._bar.set_postfix(loss=f"{p.loss:.4f}" if p.loss is not None else "?", refresh=False)
            self._bar.refresh()
        if log_line:
            lr = f"{p.learning_rate:.2e}" if p.learning_rate is not None else "?"
            loss = f"{p.loss:.4f}" if p.loss is not None else "?"
            tps = f"{p.tokens_per_second:,.0f}" if p.tokens_per_second is not None else "?"
            print(
                f"[kubetune] step {p.step}/{p.total_steps} ({p.percent:.0f}%) | loss {loss} | lr {lr} | "
                f"{tps} tok/s | ETA {format_duration(p.eta_seconds)}",
                file=self.stream,
                flush=True,
            )
            print(PROGRESS_LOG_PREFIX + json.dumps(p.to_api()), file=self.stream, flush=True)
        now = time.monotonic()
        if self.kube and (force or now - self._last_patch >= self.min_interval_s):
            self._last_patch = now
            self.kube.patch_status({"stage": p.stage, "progress": p.to_api()})

    def trial(self, report: dict[str, Any]) -> None:
        """A sweep trial's intermediate eval_loss reports into ``status.trial`` (a
        :class:`~kubetune_api.models.TrialReport`), at once: the operator's pruner reads them."""
        if not self.enabled:
            return
        print(f"[kubetune] trial report: {json.dumps(report, sort_keys=True)}", file=self.stream, flush=True)
        if self.kube:
            self.kube.patch_status({"trial": report})

    def open_bar(self, total: int, initial: int) -> None:
        """A tqdm bar for interactive runs (not in pods: their logs get the log lines)."""
        if not self.enabled or not self.stream.isatty():
            return
        self._bar = tqdm(
            total=total, initial=initial, desc="training", unit="step", file=self.stream, leave=False
        )

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # --- result -------------------------------------------------------------------------------
    def result(self, result: TrainerResult) -> None:
        """The final outcome: log line, termination message for the operator."""
        if not self.enabled:
            return
        print(
            RESULT_LOG_PREFIX + result.model_dump_json(by_alias=True, exclude_none=True),
            file=self.stream,
            flush=True,
        )
        if self.tracker is not None:
            self.tracker.result(result)
        if self.termination_message_path:
            try:
                Path(self.termination_message_path).write_text(result.to_termination_message())
            except OSError as exc:
                log.warning("could not write the termination message: %s", exc)
