"""The publish stage: the staging folder becomes a ModelVersion, an alias may move, the result is told.

:mod:`kubetune_trainer.publish.stage` looks a run up by its inputs digest (a match is reused and
nothing trains), publishes ``staging/`` through :class:`~kubetune_registry.versions.ModelRegistry`,
applies ``output.promote`` and builds the :class:`~kubetune_api.reports.TrainerResult`. It is the
last stage: it may import every other stage package, and none of them imports it.
"""
