"""The ``kubetune`` command line (see cli/README.md); the entry point is :func:`kubetune_cli.main.main`."""
