"""The object store and the model registry: torch-free, shared by the trainer and the CLI (see registry/README.md)."""
