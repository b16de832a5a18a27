"""Stage 1, fetch: every input of a run onto local disk, and the record of what they are.

:mod:`~kubetune_trainer.fetch.inputs` is the stage (:func:`~kubetune_trainer.fetch.inputs.fetch_inputs`
-> ``Inputs``; ``identify`` -> the inputs digest); :mod:`~kubetune_trainer.fetch.sources` fetches one
URI (s3://, file://, hf://, modelversion://) and refuses model folders that would run code;
:mod:`~kubetune_trainer.fetch.teacher` fetches the distillation teacher. Imports the registry and
the data layer's file suffixes, no later stage.
"""
