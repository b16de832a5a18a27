"""The node cache: base models, teachers and tokenised data shared by every job on a node.

A leaf package (it imports nothing of the trainer's): :mod:`~kubetune_trainer.cache.store` is a
content-addressed, verified, LRU-bounded folder cache that knows nothing about what it holds.
Its two users say what an entry is and how it is keyed: ``fetch/nodecache.py`` (``models/<folder
digest>``: a base model or teacher, the exact folder the trainer loads) and ``data/cached.py``
(``tokenized/<key>``: the prepared examples and data report, keyed on everything that decides
them). It sits beside them, not inside either, because both use it and neither may import the
other's internals; it stays torch-free. Configured by ``KUBETUNE_CACHE_DIR`` and
``KUBETUNE_CACHE_MAX_BYTES`` (``kubetune run --cache-dir``; the chart's ``trainerCache`` values);
see docs/cache.md.
"""

from kubetune_trainer.cache.store import (
    CACHE_DIR_ENV,
    CACHE_MAX_BYTES_ENV,
    DEFAULT_MAX_BYTES,
    CacheError,
    Entry,
    NodeCache,
    link_tree,
)

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_MAX_BYTES_ENV",
    "DEFAULT_MAX_BYTES",
    "CacheError",
    "Entry",
    "NodeCache",
    "link_tree",
]
