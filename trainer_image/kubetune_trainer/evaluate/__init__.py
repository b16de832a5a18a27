"""Stage 4, evaluate: the trained weights scored against the base on the same data, and gated.

:mod:`~kubetune_trainer.evaluate.stage` is the stage (``evaluate_stage`` -> ``Evaluation``);
:mod:`~kubetune_trainer.evaluate.evaluator` the metrics and ``evaluate_model``,
:mod:`~kubetune_trainer.evaluate.gates` the min/max gates and
:mod:`~kubetune_trainer.evaluate.loading` loading any artifact (torch, peft, quanto, ONNX) and its
peak-memory probe. Imports fetch, data and train; artifacts and publish import it, never the other
way round. This file imports nothing: the memory probe's fresh process imports the package.
"""
