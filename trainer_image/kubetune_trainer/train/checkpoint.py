"""Checkpoints in object storage, with a completion marker written last.

Layout: ``<output>/<model>/checkpoints/<run id>/step-<00000100>/`` holding every rank's files and,
once all of them are uploaded, ``COMPLETE.json`` (written by rank 0 after a barrier). The run id is
derived from the inputs digest, so a restarted pod — or ``kubetune run`` of the same YAML after a
kill — finds its own checkpoints and nothing else. A step folder without ``COMPLETE.json`` (the
process died while uploading) is ignored on resume and deleted when a newer complete one exists.
The newest ``keep`` complete checkpoints are kept.

Exact resume: besides the weights, optimizer and schedule, a checkpoint records where the data
cursor is (epoch and micro-batches consumed, in ``state.json``), every rank's RNG states
(``rng-rank<N>.pt``: Python, NumPy, torch CPU and CUDA) and the :class:`ResumePlan` it was
written under (world size, strategy, per-rank micro-batch size, gradient accumulation, effective
batch, micro-batches per epoch, training examples, data-order seed, planned steps). A run resumes
only under the same plan (:func:`check_resume_plan`); anything else would not continue the same
run (other shards, another effective batch, a different schedule) and is refused with the fields
that differ. Checkpoints are written only after an optimizer step, so they never hold a partial
gradient accumulation.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_registry.storage import ObjectStore, join_key
from kubetune_trainer.reporting import now_rfc3339
from kubetune_trainer.runtime import Runtime

log = logging.getLogger("kubetune.trainer")

MARKER = "COMPLETE.json"
_STEP_RE = re.compile(r"step-(\d{8})/")


class CheckpointMismatchError(RuntimeError):
    """The newest checkpoint was written by a different layout (e.g. another world size)."""


@dataclass(frozen=True)
class ResumePlan:
    """What a checkpoint's data cursor and optimizer state mean: a resume needs all of it equal."""

    world_size: int
    strategy: str
    micro_batch_size: int
    gradient_accumulation_steps: int
    micro_batches_per_epoch: int
    train_examples: int
    data_order_seed: int
    total_steps: int

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step over all ranks (micro-batch x accumulation x world size)."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.world_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "worldSize": self.world_size,
            "strategy": self.strategy,
            "microBatchSize": self.micro_batch_size,
            "gradientAccumulationSteps": self.gradient_accumulation_steps,
            "effectiveBatch": self.effective_batch,
            "microBatchesPerEpoch": self.micro_batches_per_epoch,
            "trainExamples": self.train_examples,
            "dataOrderSeed": self.data_order_seed,
            "totalSteps": self.total_steps,
        }


def check_resume_plan(step: int, saved: dict[str, Any] | None, current: ResumePlan) -> None:
    """Raise CheckpointMismatchError naming every field where the checkpoint's plan differs.

    ``saved`` is the ``plan`` a checkpoint recorded (None for a checkpoint written before plans
    were recorded: refused too, since exactness cannot be shown)."""
    now = current.to_dict()
    if saved is None:
        raise CheckpointMismatchError(
            f"checkpoint step {step} records no resume plan (written by an older trainer), so an exact "
            "resume cannot be verified. Delete the run's checkpoints to start over."
        )
    differ = [k for k in now if saved.get(k) != now[k]]
    if differ:
        was = ", ".join(f"{k}={saved.get(k)}" for k in differ)
        has = ", ".join(f"{k}={now[k]}" for k in differ)
        raise CheckpointMismatchError(
            f"checkpoint step {step} was written with {was}; this run has {has}: its data cursor and "
            "optimizer state would not continue the same run. Restore the settings it was written "
            "with (distributed.nodes/gpusPerNode, --nproc, training.batchSize/"
            "gradientAccumulationSteps), or delete the run's checkpoints to start over."
        )


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint."""

    step: int
    key: str
    meta: dict[str, Any]


class CheckpointManager:
    """Save, find, load and prune the checkpoints of one run."""

    def __init__(
        self, store: ObjectStore, prefix: str, *, keep: int, runtime: Runtime, scratch: Path
    ) -> None:
        self.store = store
        self.prefix = prefix.strip("/")
        self.keep = keep
        self.runtime = runtime
        self.scratch = scratch

    def _step_key(self, step: int) -> str:
        return join_key(self.prefix, f"step-{step:08d}")

    def _steps(self) -> tuple[dict[int, bool], dict[int, str]]:
        """Step -> complete?, step -> marker key, from one listing."""
        found: dict[int, bool] = {}
        for info in self.store.list(self.prefix + "/"):
            rel = info.key[len(self.prefix) + 1 :]
            m = _STEP_RE.match(rel)
            if not m:
                continue
            step = int(m.group(1))
            found[step] = found.get(step, False) or rel.endswith("/" + MARKER)
        return found, {s: join_key(self._step_key(s), MARKER) for s in found}

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint, or None. Incomplete ones are skipped (and logged)."""
        steps, markers = self._steps()
        for step in sorted(steps, reverse=True):
            if not steps[step]:
                log.warning("ignoring incomplete checkpoint at step %d (no %s)", step, MARKER)
                continue
            data, _ = self.store.get_bytes(markers[step])
            return CheckpointInfo(step=step, key=self._step_key(step), meta=json.loads(data))
        return None

    def local_dir(self, step: int) -> Path:
        path = self.scratch / f"step-{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, step: int, local: Path, meta: dict[str, Any]) -> None:
        """Upload what this rank wrote into ``local``; then rank 0 writes the marker and prunes.

        Every rank must call it (it synchronises). Files of different ranks must not share names.
        """
        key = self._step_key(step)
        self.store.upload_dir(local, key)
        self.runtime.barrier()
        if self.runtime.is_main:
            marker = {**meta, "step": step, "worldSize": self.runtime.world_size, "created": now_rfc3339()}
            self.store.put_bytes(join_key(key, MARKER), json.dumps(marker, sort_keys=True).encode())
            self._prune()
        self.runtime.barrier()
        shutil.rmtree(local, ignore_errors=True)

    def download(self, info: CheckpointInfo) -> Path:
        """Fetch a checkpoint into scratch space (every rank fetches what it needs: all files)."""
        if info.meta.get("worldSize", 1) != self.runtime.world_size:
            raise CheckpointMismatchError(
                f"checkpoint step {info.step} was written by {info.meta.get('worldSize')} processes, this run has "
                f"{self.runtime.world_size}: the data position and optimizer shards would not line up. Restore "
                "distributed.nodes/gpusPerNode, or delete the run's checkpoints to start over."
            )
        local = self.scratch / f"resume-{info.step:08d}"
        shutil.rmtree(local, ignore_errors=True)
        self.store.download_dir(info.key + "/", local)
        return local

    def _prune(self) -> None:
        steps, _ = self._steps()
        complete = sorted((s for s, ok in steps.items() if ok), reverse=True)
        newest = complete[0] if complete else None
        doomed = set(complete[self.keep :])
        if newest is not None:
            doomed |= {s for s, ok in steps.items() if not ok and s < newest}
        for step in sorted(doomed):
            # Marker first: a half-deleted checkpoint must never look complete.
            self.store.delete(join_key(self._step_key(step), MARKER))
            self.store.delete_prefix(self._step_key(step) + "/")
