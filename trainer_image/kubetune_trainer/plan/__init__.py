"""Pre-flight planning: will a run fit its devices, how many tokens and steps, how long.

Stage 0 of a run, between the data fetch and the model download (:mod:`.stage`), and the
``kubetune plan job.yaml`` command. Reads the base model's config alone (``config.json`` or a GGUF
header: :mod:`.shape`), estimates peak memory per device term by term (:mod:`.memory`), the tokens
and steps from the data and the time from the project's throughput table (:mod:`.throughput`),
and joins them into a :class:`~.plan.Plan` (:mod:`.plan`). When the estimate does not fit, the plan
suggests the changes that would, each re-estimated.

Torch-free (the CLI imports it); imports ``kubetune_api``, ``kubetune_registry`` and the
trainer's torch-free ``data`` package. How the estimate is derived and how well it matches
measured peaks: docs/plan.md and BENCHMARKS.md.
"""

from kubetune_trainer.plan.memory import MemoryEstimate, Suggestion, TrainSettings, estimate_memory, suggest
from kubetune_trainer.plan.plan import DataStats, Plan, data_stats, make_plan, settings_from_run_config
from kubetune_trainer.plan.shape import ModelShape, ShapeError, read_base_shape, shape_from_config

__all__ = [
    "DataStats",
    "MemoryEstimate",
    "ModelShape",
    "Plan",
    "ShapeError",
    "Suggestion",
    "TrainSettings",
    "data_stats",
    "estimate_memory",
    "make_plan",
    "read_base_shape",
    "settings_from_run_config",
    "shape_from_config",
    "suggest",
]
