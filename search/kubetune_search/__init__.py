"""The sweep search (FineTuneSweep, docs/sweeps.md), shared by `kubetune run sweep.yaml` and the operator."""
