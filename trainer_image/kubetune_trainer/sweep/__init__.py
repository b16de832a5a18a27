"""Sweeps on one machine (``kubetune run sweep.yaml``, docs/adr/0001): the Optuna search over the
trial records (``search``) and the loop that runs trials and publishes the winner (``local``)."""
