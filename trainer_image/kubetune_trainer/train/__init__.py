"""Stage 3, train: prepared examples -> trained weights, on every rank.

:mod:`~kubetune_trainer.train.stage` is the stage (``train_stage`` -> ``Trained``);
:mod:`~kubetune_trainer.train.recipe` the SFT loop (methods, engines, schedules, resume),
:mod:`~kubetune_trainer.train.checkpoint` checkpoints in object storage,
:mod:`~kubetune_trainer.train.adapters` the peft configs, :mod:`~kubetune_trainer.train.distill`
knowledge distillation, :mod:`~kubetune_trainer.train.label_head` the LM head at trained positions
only and :mod:`~kubetune_trainer.train.health` gradient norms and loss warnings. Imports fetch and
data, never evaluate, artifacts or publish.
"""
