"""Engram table storage: where the rows live, how they reach the compute, and how they are trained.

* :mod:`~engram.storage.tiers`: :class:`RowStore`, one interface over device, host (pinned) and disk
  (memory-mapped) tables; created directly in their tier, converted and saved chunk by chunk.
* :mod:`~engram.storage.embedding`: :class:`OffloadedEmbedding`, a drop-in for
  :class:`~engram.module.MultiHeadEmbedding` over any store, with deduplicated gathers, asynchronous
  ``prefetch`` (side stream + pinned staging on CUDA) and captured row gradients. Its docstring gives the
  placement rule for prefetch.
* :mod:`~engram.storage.cache`: :class:`HotRowCache`, frequency-admitted hot rows in the fast tier.
* :mod:`~engram.storage.optim`: :class:`SparseRowOptimizer`, row-wise Adam / Adagrad applied in the table's tier.
* :mod:`~engram.storage.profile`: :func:`zipf_profile`, the access-frequency profile that sizes the cache, and
  :func:`profile_corpus` / :func:`simulate_cache` over a corpus's hash ids.
* :mod:`~engram.storage.tables`: a model's tables in a tier: :func:`table_factory` / :func:`build_offloaded`
  (``EngramLM(..., table_factory=...)``), table files beside a saved model, :func:`load_offloaded`.
"""

from .cache import CacheStats, HotRowCache
from .embedding import OffloadedEmbedding, fetch_seconds, offload_tables
from .optim import SparseRowOptimizer
from .profile import (
    ZipfProfile,
    count_rows,
    fit_zipf,
    plot_rank_frequency,
    profile_corpus,
    simulate_cache,
    zipf_profile,
)
from .tables import (
    TableFiles,
    build_offloaded,
    load_offloaded,
    offloaded_tables,
    save_table_files,
    set_prefetch,
    table_factory,
)
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
    "TableFiles",
    "ZipfProfile",
    "build_offloaded",
    "count_rows",
    "create_row_store",
    "fetch_seconds",
    "fit_zipf",
    "init_rows",
    "load_offloaded",
    "load_row_store",
    "offload_tables",
    "offloaded_tables",
    "plot_rank_frequency",
    "profile_corpus",
    "save_table_files",
    "set_prefetch",
    "simulate_cache",
    "table_factory",
    "read_disk_header",
    "to_tier",
    "zipf_profile",
]
