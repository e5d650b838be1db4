"""OffloadedEmbedding: the multi-head Engram table with its rows in any :class:`~engram.storage.RowStore` tier.

A drop-in for :class:`~engram.module.MultiHeadEmbedding` (same ``head_sizes``, ``head_dim``, ``offsets``,
``forward(ids [..., H]) -> [..., H, head_dim]``, and ``state_dict`` key ``weight``), so the Engram module does
not know where its rows live. One forward:

    fused  = ids + offsets                                    (per-head ids -> rows of the fused table)
    U, inv = unique(fused)                                    (each row crosses PCIe once per batch)
    rows   = cache hits  +  store.gather(misses) -> device    (hot rows from the fast tier)
    out    = rows[inv]                                        ([..., H, head_dim], differentiable in rows)

Training: ``rows`` is a leaf that requires grad, so backward leaves d loss / d rows (summed over the batch's
occurrences of each row) in ``rows.grad``. The table itself is not an ``nn.Parameter``: a dense optimizer never
sees it; :class:`~engram.storage.SparseRowOptimizer` reads the captured row gradients and updates only those
rows, in the table's tier (:meth:`OffloadedEmbedding.update_rows`).

Prefetch (paper section 5): hash ids depend only on token ids, so ``prefetch(ids)`` can start the gather before
the forward reaches the Engram layer. On CUDA a worker thread gathers the missed rows into a pinned staging
buffer and copies them on a side stream; the forward then waits on that copy's event only (not on the device).
Without CUDA the worker thread does the gather. The forward whose ids equal a pending prefetch's (the same
tensor, or equal values) takes its rows; any other forward gathers synchronously.

Placement rule for prefetch. The copy is hidden when it finishes before the compute reaches the first Engram
layer, i.e. for a batch of ``tokens`` tokens::

    rows_per_token * head_dim * bytes_per_value * tokens / bandwidth  +  gather_latency
        <=  time of the blocks before the first Engram layer

with ``rows_per_token = (N - 1) * K`` hash heads of that layer (less after deduplication and cache hits),
``bandwidth`` the effective host-to-device bandwidth (PCIe, ~25 GB/s usable on Gen4 x16) and
``gather_latency`` the host-side gather (row copies into the staging buffer; for a disk table, page reads:
count at least one 4 KiB page per missed row). Example: d_mem = (N-1) * K * head_dim = 1280 in bf16 is 2560 B
per token; 8192 tokens are 21 MB, ~0.8 ms at 25 GB/s, so the first Engram layer must sit behind at least ~1 ms of
compute, which is the paper's reason for layer 2 (with layer 15 for the bulk of the memory).
:func:`fetch_seconds` evaluates the left side.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import tensor_version
from ..module import MultiHeadEmbedding
from ..table import EngramTable
from .cache import CacheStats, HotRowCache, same_memory_reason
from .tiers import (
    DeviceRowStore,
    RowStore,
    check_rows,
    chunk_rows_for,
    copy_in_chunks,
    create_row_store,
    to_device,
    to_tier,
)

logger = logging.getLogger(__name__)


def fetch_seconds(
    tokens: int,
    rows_per_token: int,
    head_dim: int,
    bytes_per_value: int,
    bandwidth_bytes_per_s: float,
    gather_latency_s: float = 0.0,
) -> float:
    """Left side of the prefetch placement rule (module docstring): the time to bring one batch's rows to the
    device. The first Engram layer should come after at least this much compute."""
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_bytes_per_s}")
    return rows_per_token * head_dim * bytes_per_value * tokens / bandwidth_bytes_per_s + gather_latency_s


class _Fetch:
    """The rows of one batch of ids, possibly still on their way (hits copied from the cache, misses from the
    store by a worker thread and/or a side stream)."""

    def __init__(
        self, ids: torch.Tensor, unique: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, device: torch.device
    ):
        # Match the forward's ids by identity while the tensor's version counter says it is unchanged; inference
        # tensors have no version counter, so keep a copy of them and match by value.
        self.ids_version = tensor_version(ids)
        self.ids = ids.clone() if self.ids_version is None else ids
        self.unique, self.inverse, self.counts, self.device = unique, inverse, counts, device
        self.hit_pos = self.hit_values = None  # positions in ``unique`` served by the cache, and their values
        self.miss_pos: torch.Tensor | None = None  # positions read from the store (None: all of them)
        self._miss: concurrent.futures.Future | tuple | None = None
        self.values: torch.Tensor | None = None  # [U, dim] on device once assembled

    def matches(self, ids: torch.Tensor) -> bool:
        if self.ids_version is not None:
            if tensor_version(self.ids) != self.ids_version:  # the prefetched ids were modified in place since
                return False
            if ids is self.ids:
                return True
        if ids.shape != self.ids.shape:
            return False
        return torch.equal(self.ids, ids.to(self.ids.device))

    def result(self) -> torch.Tensor:
        """The rows ``[U, dim]`` on the compute device, ordered on the current stream after their copy."""
        if self.values is None:
            done = isinstance(self._miss, tuple)
            miss_values, event = self._miss if done else self._miss.result()
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)
                miss_values.record_stream(stream)
            if self.hit_pos is None:
                self.values = miss_values
            else:
                values = torch.empty(
                    self.unique.numel(), miss_values.shape[1], dtype=miss_values.dtype, device=self.device
                )
                values[to_device(self.hit_pos, self.device)] = self.hit_values
                values[to_device(self.miss_pos, self.device)] = miss_values
                self.values = values
            self._miss = self.hit_values = None
        return self.values

    def missed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows that came from the store and their values (for cache admission)."""
        values = self.result()
        if self.miss_pos is None:
            return self.unique, values
        return self.unique[self.miss_pos], values[to_device(self.miss_pos, self.device)]

    def patch(self, rows: torch.Tensor, new_values: torch.Tensor) -> None:
        """Rows ``rows`` (sorted, unique, CPU) now hold ``new_values``; refresh this fetch's copies of them."""
        values = self.result()
        pos = torch.searchsorted(rows, self.unique).clamp_(max=rows.numel() - 1)
        here = (rows[pos] == self.unique).nonzero().squeeze(1)
        if here.numel():
            new = new_values[to_device(pos[here], new_values.device)]
            values[to_device(here, self.device)] = new.to(self.device, values.dtype)


class OffloadedEmbedding(EngramTable):
    """All hash heads of one Engram layer, rows in a :class:`RowStore` (see the module docstring).

    Args:
        head_sizes: rows per hash head (the primes of :attr:`NgramHasher.table_sizes` for this layer).
        head_dim: width of one row.
        store: the rows, ``[sum(head_sizes), head_dim]`` in any tier.
        init_std: recorded for :meth:`to_multihead` (the store is already initialised).
        device: the compute device, where ``forward`` returns rows (default: the store's device for a device
            table, else the CPU). It follows ``module.to(...)`` like any module's buffers.
        cache_bytes: size of a :class:`HotRowCache` on the compute device (0: no cache).
        max_pending: prefetches kept waiting for their forward; the oldest is dropped beyond this.
    """

    def __init__(
        self,
        head_sizes: list[int],
        head_dim: int,
        store: RowStore,
        *,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        cache_bytes: int = 0,
        max_pending: int = 2,
    ):
        super().__init__(head_sizes, head_dim, init_std)
        if not isinstance(store, RowStore):
            raise TypeError(f"store must be a RowStore (device, host or disk table), got {type(store).__name__}")
        if (store.num_rows, store.dim) != (self.num_rows, self.head_dim):
            raise ValueError(
                f"the store holds a [{store.num_rows}, {store.dim}] table, these heads need "
                f"[{self.num_rows}, {self.head_dim}] (sum of head sizes, head_dim)"
            )
        if cache_bytes < 0 or max_pending < 0:
            raise ValueError(f"cache_bytes and max_pending must be >= 0, got {cache_bytes}, {max_pending}")
        self.store = store
        self.trainable = True  # capture row gradients when autograd is on
        self.prefetch_enabled = True  # False: prefetch() does nothing and every forward gathers synchronously
        self.cache_bytes, self.max_pending = int(cache_bytes), int(max_pending)
        if device is None:
            device = store.device if store.kind == "device" else torch.device("cpu")
        self.offsets, self.sizes = self.offsets.to(device), self.sizes.to(device)  # the compute device
        self.cache: HotRowCache | None = None
        self._pending: collections.deque[_Fetch] = collections.deque()
        self._captures: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._known_version = store.version
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # the rows travel in the state dict under MultiHeadEmbedding's key, though they are no parameter; a
        # journaled checkpoint (engram.storage.journal) leaves them out while it saves and loads
        self.rows_in_state_dict = True
        self.register_state_dict_post_hook(_rows_into_state_dict)
        self.register_load_state_dict_pre_hook(_rows_from_state_dict)

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        head_sizes: list[int],
        head_dim: int,
        *,
        tier: str = "host",
        dtype: torch.dtype = torch.float32,
        fmt: str | None = None,
        init_std: float = 0.02,
        seed: int = 0,
        device: torch.device | str | None = None,
        path: str | os.PathLike | None = None,
        pin: bool | None = None,
        cache_bytes: int = 0,
        overwrite: bool = False,
        progress: bool | None = None,
    ) -> OffloadedEmbedding:
        """A new table created directly in ``tier`` (a host or disk table never touches the accelerator).
        ``device`` is the compute device, and also where a device-tier table is allocated; rows are gathered as
        ``dtype`` and stored in the row format ``fmt`` (default: as ``dtype``)."""
        store = create_row_store(
            tier,
            sum(int(s) for s in head_sizes),
            head_dim,
            dtype=dtype,
            fmt=fmt,
            init_std=init_std,
            seed=seed,
            device=device if tier == "device" else None,
            path=path,
            pin=pin,
            overwrite=overwrite,
            progress=progress,
        )
        return cls(head_sizes, head_dim, store, init_std=init_std, device=device, cache_bytes=cache_bytes)

    @classmethod
    def from_multihead(
        cls,
        table: MultiHeadEmbedding,
        tier: str = "host",
        *,
        path: str | os.PathLike | None = None,
        pin: bool | None = None,
        cache_bytes: int = 0,
        overwrite: bool = False,
        progress: bool | None = None,
    ) -> OffloadedEmbedding:
        """The same rows, copied (chunk by chunk) into ``tier``; the compute device is the table's device."""
        weight = table.weight.detach()
        if weight.device.type == "meta":
            raise ValueError(
                "the MultiHeadEmbedding has no data (meta device); create the table in its tier with "
                "OffloadedEmbedding.create instead"
            )
        store = to_tier(
            DeviceRowStore(weight),
            tier,
            device=weight.device if tier == "device" else None,
            path=path,
            pin=pin,
            overwrite=overwrite,
            progress=progress,
        )
        return cls(
            table.head_sizes,
            table.head_dim,
            store,
            init_std=table.init_std,
            device=weight.device,
            cache_bytes=cache_bytes,
        )

    def to_multihead(self) -> MultiHeadEmbedding:
        """A MultiHeadEmbedding on the compute device holding exactly these rows (materialises the table)."""
        device = self.offsets.device
        table = MultiHeadEmbedding(
            self.head_sizes, self.head_dim, init_std=self.init_std, device="meta", dtype=self.store.dtype
        )
        table.weight = nn.Parameter(torch.empty(self.num_rows, self.head_dim, dtype=self.store.dtype, device=device))
        with torch.no_grad():
            copy_in_chunks(
                self.store.read_range,
                lambda start, rows: table.weight[start : start + len(rows)].copy_(rows),
                self.num_rows,
                chunk_rows_for(self.store.row_bytes),
            )
        return table.to(device)

    # ------------------------------------------------------------------ reading rows
    def _cache_on(self, device: torch.device) -> HotRowCache | None:
        if self.cache_bytes == 0:
            return None
        if self.cache is None or self.cache.device != device:
            reason = same_memory_reason(self.store.device, device) if self.store.kind != "disk" else None
            if reason is not None:
                logger.warning(
                    "hot-row cache of %s bytes in front of a %s table: %s", self.cache_bytes, self.store.kind, reason
                )
            self.cache = HotRowCache(self.cache_bytes, self.head_dim, self.store.dtype, device)
        return self.cache

    def _check_store_version(self) -> None:
        """If the store was written behind our back, every copy we hold may be stale: drop them."""
        if self.store.version != self._known_version:
            if self.cache is not None:
                self.cache.clear()
            self._pending.clear()
            self._known_version = self.store.version

    def _load_rows(self, rows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Store rows -> compute device. Runs in the worker thread for host and disk tables."""
        store = self.store
        if store.device == device:
            return store.gather(rows, check=False), None
        if device.type == "cuda" and store.device.type == "cpu":
            # rows cross PCIe as stored (an fp8 row is ~1/4 of its float32 values) and are decoded on the device
            width = store.format.width(store.dim)
            staging = torch.empty(rows.numel(), width, dtype=store.format.storage_dtype, pin_memory=True)
            store.gather_stored(rows, out=staging)
            with torch.cuda.device(device):
                stream = self._streams.get(device)
                if stream is None:
                    stream = self._streams[device] = torch.cuda.Stream(device)
                with torch.cuda.stream(stream):
                    values = store.format.decode(staging.to(device, non_blocking=True), store.dtype)
                    event = torch.cuda.Event()
                    event.record(stream)
            return values, event
        return to_device(store.gather(rows, check=False), device), None

    def _start_fetch(self, ids: torch.Tensor, asynchronous: bool) -> _Fetch:
        self.check_ids(ids)
        device = self.offsets.device
        flat = self.fused_ids(ids).reshape(-1).cpu()
        unique, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
        fetch = _Fetch(ids, unique, to_device(inverse, device), counts, device)
        rows = unique
        cache = self._cache_on(device)
        if cache is not None:
            hit, slots = cache.lookup(unique, counts)
            if bool(hit.any()):
                fetch.hit_pos, fetch.miss_pos = hit.nonzero().squeeze(1), (~hit).nonzero().squeeze(1)
                fetch.hit_values = cache.read(slots)  # a copy, taken now on the current stream
                rows = unique[fetch.miss_pos]
        if asynchronous and self.store.device.type == "cpu" and rows.numel():
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engram-prefetch")
            fetch._miss = self._executor.submit(self._load_rows, rows, device)
        else:
            fetch._miss = self._load_rows(rows, device)
        return fetch

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start fetching the rows of ``ids`` ([..., H] per-head hash ids; CPU ids avoid a device sync) for the
        forward that will be called with the same ids. Cache hits are copied now; misses are gathered by a
        worker thread (and copied on a side stream on CUDA). Writes made through :meth:`update_rows` /
        :meth:`write_rows` before that forward are patched into the fetched rows; a write made directly to the
        store drops the prefetch. Does nothing when :attr:`prefetch_enabled` is False."""
        if not self.prefetch_enabled:
            return
        self._check_store_version()
        self._pending.append(self._start_fetch(ids, asynchronous=True))
        while len(self._pending) > self.max_pending:
            self._pending.popleft()

    def _take_prefetch(self, ids: torch.Tensor) -> _Fetch | None:
        for i, fetch in enumerate(self._pending):
            if fetch.matches(ids):
                del self._pending[i]
                return fetch
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [..., H]`` per-head hash ids -> rows ``[..., H, head_dim]`` on the compute device.

        With autograd on (and :attr:`trainable`), the batch's unique rows are kept with their gradient until
        :meth:`zero_grad`; evaluate under ``torch.no_grad()`` so that nothing is kept.
        """
        self._check_store_version()
        fetch = self._take_prefetch(ids) or self._start_fetch(ids, asynchronous=False)
        values = fetch.result()
        if self.cache is not None and self.cache.device == fetch.device:
            self.cache.offer(fetch.unique, fetch.counts, *fetch.missed())
        if torch.is_grad_enabled() and self.trainable:
            values = values.detach().requires_grad_(True)
            self._captures.append((fetch.unique, values))
        # embedding, not values[inverse]: on the CPU the backward of advanced indexing sums the gradients of
        # repeated rows in an order that varies with the threads, so two runs (or a run and its resume) differ
        return F.embedding(fetch.inverse, values).view(*ids.shape, self.head_dim)

    def wait_for_prefetches(self) -> None:
        """Block until every pending prefetch has its rows (before the store is written or copied directly)."""
        for fetch in self._pending:
            fetch.result()

    # ------------------------------------------------------------------ gradients and writes
    def row_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The gradient captured since the last :meth:`zero_grad`, coalesced over forwards:
        ``(rows [n] sorted unique on the CPU, grad [n, head_dim] float32 on the compute device)``, or None."""
        rows = [r for r, leaf in self._captures if leaf.grad is not None]
        grads = [leaf.grad.float() for _, leaf in self._captures if leaf.grad is not None]
        if not rows:
            return None
        if len(rows) == 1:
            return rows[0], grads[0]
        unique, inverse = torch.unique(torch.cat(rows), sorted=True, return_inverse=True)
        grad = torch.cat(grads)
        total = torch.zeros(unique.numel(), self.head_dim, dtype=torch.float32, device=grad.device)
        return unique, total.index_add_(0, to_device(inverse, grad.device), grad)

    def row_grad_tensors(self) -> list[torch.Tensor]:
        """The captured leaves whose ``.grad`` holds the row gradients, one per forward since :meth:`zero_grad`.
        Pass them to a global-norm clip with the model's parameters: scaling their ``.grad`` in place scales what
        :meth:`row_grads` returns."""
        return [leaf for _, leaf in self._captures if leaf.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget captured row gradients (and zero any parameter gradients, as ``nn.Module.zero_grad``)."""
        super().zero_grad(set_to_none)
        self._captures.clear()

    def update_rows(self, rows: torch.Tensor, delta: torch.Tensor, scale: float | torch.Tensor | None = None) -> None:
        """``rows = scale * rows + delta`` in the table's tier, keeping the cache and pending prefetches coherent
        (their copies of these rows are replaced by the new values). ``rows``: unique CPU int64 ``[n]``,
        ``delta``: ``[n, head_dim]`` on any device, ``scale``: a number or one factor per row ``[n, 1]``."""
        rows, order = self._prepare_write(rows, delta)
        delta = delta[to_device(order, delta.device)]
        if isinstance(scale, torch.Tensor):
            scale = scale[to_device(order, scale.device)]
        new = self.store.apply_update(rows, delta, scale, check=False)
        self._refresh_copies(rows, new)

    def write_rows(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """``rows = values`` in the table's tier, keeping the cache and pending prefetches coherent."""
        rows, order = self._prepare_write(rows, values)
        values = values[to_device(order, values.device)]
        self.store.scatter(rows, values, check=False)
        self._refresh_copies(rows, values)

    def _prepare_write(self, rows: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Check a write and make it safe; returns ``(rows sorted, the order that sorts them)``."""
        check_rows(rows, self.num_rows, unique=True)
        if values.shape != (rows.numel(), self.head_dim):
            raise ValueError(
                f"expected [{rows.numel()}, {self.head_dim}] values for {rows.numel()} rows, got {tuple(values.shape)}"
            )
        self._check_store_version()
        self.wait_for_prefetches()  # no gather may still be reading the rows we are about to write
        return torch.sort(rows.cpu())

    def _refresh_copies(self, rows: torch.Tensor, new: torch.Tensor) -> None:
        new = to_device(new, self.offsets.device)
        if self.cache is not None:
            self.cache.update(rows, new)
        for fetch in self._pending:
            fetch.patch(rows, new)
        self._known_version = self.store.version

    # ------------------------------------------------------------------ reporting
    @property
    def cache_stats(self) -> CacheStats | None:
        return None if self.cache is None else self.cache.stats

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, store={self.store!r}, cache_bytes={self.cache_bytes}"


def _rows_into_state_dict(table: OffloadedEmbedding, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """The rows under ``prefix + "weight"``, as a view of the store (no copy; a disk table stays mapped)."""
    if not table.rows_in_state_dict:
        return
    state_dict[prefix + "weight"] = table.store.read_range(0, table.num_rows).detach()


def _rows_from_state_dict(
    table: OffloadedEmbedding,
    state_dict: dict,
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """Write ``prefix + "weight"`` into the store chunk by chunk, and take the key out of what the module's own
    loading sees (it is no parameter of the module)."""
    key = prefix + "weight"
    if not table.rows_in_state_dict:
        return
    if key not in state_dict:
        if strict:
            missing_keys.append(key)
        return
    weight = state_dict.pop(key)
    if tuple(weight.shape) != (table.num_rows, table.head_dim):
        error_msgs.append(
            f"size mismatch for {key}: checkpoint has {tuple(weight.shape)}, this table is "
            f"{(table.num_rows, table.head_dim)}"
        )
        return
    store = table.store
    table.wait_for_prefetches()
    copy_in_chunks(
        lambda start, stop: weight[start:stop].to(store.device, store.dtype),
        store.write_range,
        table.num_rows,
        chunk_rows_for(store.row_bytes),
    )
    store.flush()


def offload_tables(
    model: nn.Module,
    tier: str = "host",
    *,
    path_dir: str | os.PathLike | None = None,
    cache_bytes: int = 0,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, OffloadedEmbedding]:
    """Replace every :class:`MultiHeadEmbedding` in ``model`` by an :class:`OffloadedEmbedding` in ``tier``.

    A table with data is copied exactly (its device stays the compute device). A table on the meta device (a
    model built with ``device="meta"``, so that no table was ever allocated) is created directly in the tier,
    ``normal(0, init_std)`` with seed ``seed + i`` for the i-th table, and computes on the CPU until the model
    is moved. Disk tables go to ``path_dir/<module name>.rows``. Returns the new tables by module name.
    """
    if (tier == "disk") != (path_dir is not None):
        raise ValueError("path_dir= is needed for, and only for, the disk tier")
    replaced: dict[str, OffloadedEmbedding] = {}
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MultiHeadEmbedding)]
    if not targets:
        raise ValueError("the model holds no MultiHeadEmbedding to offload")
    for i, (name, table) in enumerate(targets):
        path = None if path_dir is None else os.path.join(path_dir, f"{name or 'table'}.rows")
        if table.weight.device.type == "meta":
            new = OffloadedEmbedding.create(
                table.head_sizes,
                table.head_dim,
                tier=tier,
                dtype=table.weight.dtype,
                init_std=table.init_std,
                seed=seed + i,
                path=path,
                cache_bytes=cache_bytes,
                overwrite=overwrite,
                progress=progress,
            )
        else:
            new = OffloadedEmbedding.from_multihead(
                table, tier, path=path, cache_bytes=cache_bytes, overwrite=overwrite, progress=progress
            )
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        if parent is None:
            raise ValueError(
                "offload_tables replaces tables inside a model; convert a lone table with "
                "OffloadedEmbedding.from_multihead"
            )
        setattr(parent, attr, new)
        replaced[name] = new
    return replaced
