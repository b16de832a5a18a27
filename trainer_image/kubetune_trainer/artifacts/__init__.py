"""Stage 5, artifacts: what a version holds besides the trained weights.

:mod:`~kubetune_trainer.artifacts.stage` is the stage (``build_artifacts`` -> ``Artifacts``;
``write_reports`` once the version is named); :mod:`~kubetune_trainer.artifacts.merge` merges an
adapter into its base, :mod:`~kubetune_trainer.artifacts.quantize` writes and smoke-tests the
quantized formats and :mod:`~kubetune_trainer.artifacts.report` writes eval/ and the model card.
Imports evaluate, train and fetch; only publish (and the pipeline) import it.
"""
