"""kubetune's trainer: fetch -> data -> train -> evaluate -> artifacts -> publish.

Entry points: ``python -m kubetune_trainer --run-config FILE`` (in the trainer image, under torchrun)
and the ``kubetune`` CLI (``kubetune run job.yaml`` on one machine); both call
:func:`kubetune_trainer.pipeline.run`, which reads as the stages a run walks. One sub-package per
stage, in that order, each holding a ``stage`` module (its input, its output, what it raises) and
the parts it is built from: ``fetch/``, ``data/`` (also the torch-free data layer that
``kubetune data validate`` uses), ``train/``, ``evaluate/``, ``artifacts/``, ``publish/``. A stage
imports only the stages before it (and the data layer); all of them share :mod:`kubetune_trainer.context` (the
``RunContext``), :mod:`kubetune_trainer.runtime` and :mod:`kubetune_trainer.reporting`.

Importing this package imports neither torch nor kopf.
"""

__version__ = "0.1.0"
