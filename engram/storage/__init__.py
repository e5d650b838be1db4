"""Engram table storage: where the rows live, how they reach the compute, and how they are trained.

* :mod:`~engram.storage.tiers`: :class:`RowStore`, one interface over device, host (pinned) and disk
  (memory-mapped) tables; created directly in their tier, converted and saved chunk by chunk.
* :mod:`~engram.storage.formats`: row formats (float32, bfloat16, FP8 E4M3 with one E8M0 scale per 32 values),
  how every tier stores its rows and decodes them on gather.
* :mod:`~engram.storage.embedding`: :class:`OffloadedEmbedding`, an :class:`~engram.table.EngramTable` over
  any store, with deduplicated gathers, asynchronous
  ``prefetch`` (side stream + pinned staging on CUDA) and captured row gradients. Its docstring gives the
  placement rule for prefetch.
* :mod:`~engram.storage.cache`: :class:`HotRowCache`, frequency-admitted hot rows in the fast tier.
* :mod:`~engram.storage.optim`: :func:`rowwise_adam`, the one row-wise Adam rule of every tier, and
  :class:`SparseRowOptimizer`, which applies it to offloaded tables in their own tier.
* :mod:`~engram.storage.profile`: :func:`zipf_profile`, the access-frequency profile that sizes the cache, and
  :func:`profile_corpus` / :func:`simulate_cache` over a corpus's hash ids.
* :mod:`~engram.storage.tables`: :func:`table_factory` (``EngramLM(..., table_factory=...)``) and the offloaded
  tables of a model. Saving them beside a model is :mod:`engram.model.tables` (storage knows no model).
"""

from .cache import CacheStats, HotRowCache
from .embedding import OffloadedEmbedding, fetch_seconds, offload_tables
from .formats import FORMATS, RowFormat, row_format
from .optim import SparseRowOptimizer, rowwise_adam
from .profile import (
    ZipfProfile,
    count_rows,
    fit_zipf,
    profile_corpus,
    simulate_cache,
    zipf_profile,
)
from .tables import offloaded_tables, set_prefetch, table_factory
from .tiers import (
    TIERS,
    DeviceRowStore,
    DiskRowStore,
    HostRowStore,
    RowStore,
    create_row_store,
    init_rows,
    load_row_store,
    read_disk_header,
    to_tier,
)

__all__ = [
    "TIERS",
    "CacheStats",
    "DeviceRowStore",
    "FORMATS",
    "DiskRowStore",
    "HostRowStore",
    "HotRowCache",
    "OffloadedEmbedding",
    "RowFormat",
    "RowStore",
    "SparseRowOptimizer",
    "ZipfProfile",
    "count_rows",
    "create_row_store",
    "fetch_seconds",
    "fit_zipf",
    "init_rows",
    "load_row_store",
    "offload_tables",
    "offloaded_tables",
    "profile_corpus",
    "rowwise_adam",
    "set_prefetch",
    "simulate_cache",
    "table_factory",
    "read_disk_header",
    "row_format",
    "to_tier",
    "zipf_profile",
]
