"""kubetune's trainer: fetch -> prepare data -> train -> evaluate -> quantize -> publish.

Entry points: ``python -m kubetune_trainer --run-config FILE`` (in the trainer image, under torchrun)
and the ``kubetune`` CLI (``kubetune run job.yaml`` on one machine). Importing this package imports
neither torch nor kopf.
"""

__version__ = "0.1.0"
