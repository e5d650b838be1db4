"""Engram table storage: where the rows live, how they reach the compute, and how they are trained.

* :mod:`~engram.storage.tiers`: :class:`RowStore`, one interface over device, host (pinned) and disk
  (memory-mapped) tables; created directly in their tier, converted and saved chunk by chunk.
* :mod:`~engram.storage.embedding`: :class:`OffloadedEmbedding`, a drop-in for
  :class:`~engram.module.MultiHeadEmbedding` over any store, with deduplicated gathers, asynchronous
  ``prefetch`` (side stream + pinned staging on CUDA) and captured row gradients. Its docstring gives the
  placement rule for prefetch.
* :mod:`~engram.storage.cache`: :class:`HotRowCache`, frequency-admitted hot rows in the fast tier.
* :mod:`~engram.storage.optim`: :class:`SparseRowOptimizer`, row-wise Adam / Adagrad applied in the table's tier.
* :mod:`~engram.storage.profile`: :func:`zipf_profile`, the access-frequency profile that sizes the cache.
"""

from .cache import CacheStats, HotRowCache
from .embedding import OffloadedEmbedding, fetch_seconds, offload_tables
from .optim import SparseRowOptimizer
from .profile import ZipfProfile, count_rows, fit_zipf, plot_rank_frequency, zipf_profile
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
    "DiskRowStore",
    "HostRowStore",
    "HotRowCache",
    "OffloadedEmbedding",
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
    "plot_rank_frequency",
    "read_disk_header",
    "to_tier",
    "zipf_profile",
]
