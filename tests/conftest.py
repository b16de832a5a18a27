"""Shared pytest set-up: fixture modules per real component, CPU threading pinned for speed."""

import os

# A LoRA step on this 2-core box is 5-10x slower with torch's default thread count (shared/FACTS.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.fixtures.s3",
    "tests.fixtures.kube",
    "tests.fixtures.crd_server",
    "tests.fixtures.models",
    "tests.fixtures.trainer",
    "tests.fixtures.operator",
]
