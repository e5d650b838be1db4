"""A hot-row cache in the fast tier, sized in bytes, admitting rows by access frequency.

Paper section 5 proposes a cache hierarchy because n-gram accesses are Zipf-distributed: a small set of rows
takes most accesses, so keeping those in HBM (or host DRAM, in front of a disk table) serves most lookups
without touching the slow tier. :func:`~engram.storage.profile.zipf_profile` measures how much an ideal cache
of a given size would catch on real hash ids; this module is the cache.

Policy (TinyLFU-style frequency admission with LFU eviction):

* Every access (each occurrence of a row in a batch) is counted in a count-min sketch on the CPU
  (4 hash rows x ``width`` int32 counters, ``width`` the power of two >= 2 x capacity): the frequency estimate
  of a row is the minimum of its 4 counters. The sketch covers rows that are not cached, which a per-slot
  counter cannot, and its size does not grow with the table.
* Aging: after ``aging_period`` accesses (default 10 x capacity) all counters are halved, so a row that was
  hot an hour ago does not keep its slot forever.
* Admission: after a batch, the rows it missed are offered, most frequent first. Free slots take them as they
  come; once the cache is full a candidate replaces the least frequent cached row only if its estimate is
  strictly higher (ties keep the incumbent, so one-off rows do not churn the cache).
* Cost: admitting n unique rows costs O(n log capacity) plus O(capacity) memory passes (a selection over one
  int32 per slot and merging the sorted index), never a re-estimate or re-sort of every cached row. The
  frequency of a cached row is read from the sketch when the row is admitted or accessed and halved with it at
  aging; collisions that raise its sketch counters in between are not seen until its next access.
* Deferred admission (:meth:`HotRowCache.offer`, what :class:`~engram.storage.OffloadedEmbedding` calls): the
  O(capacity) passes and the sketch updates are a fixed cost per admission round, a few dozen small ops, which
  at a decode step of 4 x 16 lookups cost many times the lookups themselves. So a batch's accesses and missed
  rows are only queued, and one admission round runs once ``admit_every`` accesses have queued up (default: an
  eighth of the capacity in rows): the per-access cost becomes O(log capacity) plus a share of one round. A large
  training batch fills the queue at once and is admitted at once, as before. Lookups are never deferred. A
  row missed again while queued is served from the store meanwhile (correct, just not yet a hit). Writes,
  invalidations and :meth:`clear` first settle the queue (admit it, or drop it), so a queued value is never
  admitted after the row was written.

When the cache cannot pay off: rows in a host table on a CPU compute device already sit in DRAM, so a cache
hit saves no read; :class:`~engram.storage.OffloadedEmbedding` logs a warning when asked for one there. It pays
in front of a disk table (a miss is a page read when the file is not in the page cache) and of a host table
serving a GPU (a miss crosses PCIe); ``benchmarks/bench_offload.py`` measures both sides.

The capacity is ``capacity_bytes // (dim * itemsize)`` rows of payload on the cache's device; the index
(slot -> row, and a sorted copy for lookups) and the sketch live on the CPU and are not counted.

Coherence: the cache holds copies of rows. Whoever writes the backing table must either write the new values
through (:meth:`HotRowCache.update`) or drop the copies (:meth:`HotRowCache.invalidate` / :meth:`clear`);
:class:`~engram.storage.OffloadedEmbedding` writes through on its own updates and clears the cache when it sees
the table was written behind its back (the store's version changed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .tiers import to_device

_SKETCH_DEPTH = 4


def same_memory_reason(store_device: torch.device, cache_device: torch.device) -> str | None:
    """Why a hot-row cache on ``cache_device`` cannot save a read of rows kept on ``store_device`` (both the
    same memory: a host table on a CPU compute device, or a device table), or None when it can."""
    if torch.device(store_device) == torch.device(cache_device):
        return (
            f"the table's rows and the cache would both live in {torch.device(cache_device)} memory, so a hit saves "
            f"no read but every lookup and admission costs time; use cache_bytes=0 here (a cache pays in front of a "
            f"disk table or of a host table serving a GPU)"
        )
    return None


@dataclass
class CacheStats:
    """Counts since construction (or :meth:`HotRowCache.reset_stats`). Hits and misses count accesses: each
    occurrence of a row in a batch, so that ``hit_rate`` is comparable with
    :attr:`~engram.storage.profile.ZipfProfile.ideal_hit_rate`."""

    hits: int = 0
    misses: int = 0
    admissions: int = 0
    evictions: int = 0
    invalidations: int = 0
    bytes_used: int = 0
    capacity_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class HotRowCache:
    """Up to ``capacity_bytes`` of table rows on ``device``, admitted by access frequency.

    The caller drives it once per batch of unique rows: :meth:`lookup` (which rows are here),
    :meth:`read` (their values), then :meth:`offer` (the batch's accesses and the rows that missed, with their
    values; admitted in rounds, see the module docstring), or :meth:`record` and :meth:`admit` for one
    admission round now.
    """

    def __init__(
        self,
        capacity_bytes: int,
        dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        aging_period: int | None = None,
        admit_every: int | None = None,
        seed: int = 0,
    ):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim, self.dtype, self.device = int(dim), dtype, torch.device(device)
        self.row_bytes = self.dim * torch.empty((), dtype=dtype).element_size()
        if capacity_bytes < self.row_bytes:
            raise ValueError(
                f"cache of {capacity_bytes} bytes holds no row: one row is {self.row_bytes} bytes "
                f"({dim} x {dtype}); give at least that, or no cache"
            )
        self.capacity_rows = int(capacity_bytes) // self.row_bytes
        self.capacity_bytes = self.capacity_rows * self.row_bytes
        self.values = torch.empty(self.capacity_rows, self.dim, dtype=dtype, device=self.device)
        self.slot_rows = torch.full((self.capacity_rows,), -1, dtype=torch.int64)  # row held by each slot, -1 free
        self._sorted_rows = torch.empty(0, dtype=torch.int64)  # cached rows, ascending, for searchsorted
        self._sorted_slots = torch.empty(0, dtype=torch.int64)
        self._slot_est = torch.zeros(self.capacity_rows, dtype=torch.int32)  # frequency of each slot's row
        width = 1 << max(10, (2 * self.capacity_rows - 1).bit_length())
        self._sketch = torch.zeros(_SKETCH_DEPTH, width, dtype=torch.int32)
        self._shift = 64 - (width.bit_length() - 1)
        rng = np.random.default_rng(seed)
        # odd multipliers for multiply-shift hashing (the top bits of row * a mod 2^64)
        self._multipliers = [
            int(m) | 1 for m in rng.integers(-(1 << 63), (1 << 63) - 1, size=_SKETCH_DEPTH, dtype=np.int64)
        ]
        self.aging_period = int(aging_period) if aging_period is not None else 10 * self.capacity_rows
        if self.aging_period <= 0:
            raise ValueError(f"aging_period must be positive, got {aging_period}")
        self._since_aging = 0
        self._stats = CacheStats(capacity_bytes=self.capacity_bytes)
        self.admit_every = int(admit_every) if admit_every is not None else max(1, self.capacity_rows // 8)
        if self.admit_every <= 0:
            raise ValueError(f"admit_every must be positive, got {admit_every}")
        # offered batches not admitted yet: (rows, counts) accessed, (rows, values) missed; accesses queued
        self._queued: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._queued_accesses = 0

    # ------------------------------------------------------------------ state
    @property
    def size(self) -> int:
        """Rows held now."""
        return self._sorted_rows.numel()

    @property
    def bytes_used(self) -> int:
        return self.size * self.row_bytes

    @property
    def stats(self) -> CacheStats:
        s = self._stats
        return CacheStats(
            s.hits, s.misses, s.admissions, s.evictions, s.invalidations, self.bytes_used, self.capacity_bytes
        )

    def reset_stats(self) -> None:
        self._stats = CacheStats(capacity_bytes=self.capacity_bytes)

    def cached_rows(self) -> torch.Tensor:
        """The rows held now, ascending (a copy)."""
        return self._sorted_rows.clone()

    # ------------------------------------------------------------------ frequency sketch
    def _buckets(self, rows: torch.Tensor) -> list[torch.Tensor]:
        mask = (1 << (64 - self._shift)) - 1
        # int64 products wrap mod 2^64; the arithmetic shift's sign bits are cut off by the mask
        return [((rows * a) >> self._shift) & mask for a in self._multipliers]

    def estimate(self, rows: torch.Tensor) -> torch.Tensor:
        """Estimated recent access counts of ``rows`` (never an underestimate before aging)."""
        rows = rows.cpu()
        counts = [self._sketch[i][b] for i, b in enumerate(self._buckets(rows))]
        return torch.stack(counts).amin(0) if counts else torch.empty(0, dtype=torch.int32)

    def record(self, rows: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Count accesses: ``counts[i]`` occurrences of ``rows[i]`` (1 each by default)."""
        rows = rows.cpu()
        counts = torch.ones_like(rows, dtype=torch.int32) if counts is None else counts.cpu().to(torch.int32)
        for i, b in enumerate(self._buckets(rows)):
            self._sketch[i].index_add_(0, b, counts)
        self._since_aging += int(counts.sum())
        while self._since_aging >= self.aging_period:
            self._sketch.bitwise_right_shift_(1)
            self._slot_est.bitwise_right_shift_(1)  # min(c_i >> 1) == min(c_i) >> 1: still the estimate
            self._since_aging -= self.aging_period
        if self.size and rows.numel():
            pos = torch.searchsorted(self._sorted_rows, rows).clamp_(max=self.size - 1)
            cached = self._sorted_rows[pos] == rows
            self._slot_est[self._sorted_slots[pos[cached]]] = self.estimate(rows[cached])

    # ------------------------------------------------------------------ reads
    def lookup(self, rows: torch.Tensor, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For unique CPU ``rows``: ``(hit_mask [n] bool, slots [hits])``; counts hits/misses in :attr:`stats`
        (``counts[i]`` accesses for ``rows[i]``, 1 each by default)."""
        rows = rows.cpu()
        if self.size == 0:
            hit = torch.zeros(rows.numel(), dtype=torch.bool)
            slots = torch.empty(0, dtype=torch.int64)
            hits = 0
        else:
            # index_select / masked_select: the same values as [pos] / [hit] in fewer dispatches
            pos = torch.searchsorted(self._sorted_rows, rows).clamp_(max=self.size - 1)
            hit = self._sorted_rows.index_select(0, pos) == rows
            slots = self._sorted_slots.index_select(0, pos.masked_select(hit))
            hits = slots.numel() if counts is None else int(torch.dot(counts.cpu().to(torch.int64), hit.long()))
        total = rows.numel() if counts is None else int(counts.sum())
        self._stats.hits += hits
        self._stats.misses += total - hits
        return hit, slots

    def read(self, slots: torch.Tensor) -> torch.Tensor:
        """Values in ``slots`` (from :meth:`lookup`), ``[n, dim]`` on the cache's device."""
        return self.values[to_device(slots, self.device)]

    # ------------------------------------------------------------------ deferred admission
    def offer(self, rows: torch.Tensor, counts: torch.Tensor, missed: torch.Tensor, values: torch.Tensor) -> None:
        """Queue one batch: its unique ``rows`` with their access ``counts``, and the rows that ``missed`` with
        their ``values`` ``[n, dim]``; runs an admission round once :attr:`admit_every` accesses are queued."""
        if values.shape != (missed.numel(), self.dim):
            raise ValueError(f"values must be [{missed.numel()}, {self.dim}], got {tuple(values.shape)}")
        self._queued.append((rows.cpu(), counts.cpu().to(torch.int32), missed.cpu(), values))
        self._queued_accesses += int(counts.sum())
        if self._queued_accesses >= self.admit_every:
            self.flush()

    def flush(self) -> None:
        """Run the admission round of every queued batch now (:meth:`record`, then :meth:`admit`)."""
        if not self._queued:
            return
        queued, self._queued, self._queued_accesses = self._queued, [], 0
        rows, counts, missed, values = (list(x) for x in zip(*queued))
        self.record(torch.cat(rows), torch.cat(counts))
        missed = torch.cat(missed)
        values = torch.cat([v.to(self.device, self.dtype) for v in values])
        # a row missed in several queued batches is offered once, with its latest value (all equal: writes
        # settle the queue first)
        unique, inverse = torch.unique(missed, return_inverse=True)
        last = torch.zeros(unique.numel(), dtype=torch.int64).scatter_reduce_(
            0, inverse, torch.arange(missed.numel()), "amax", include_self=False
        )
        self.admit(unique, values[to_device(last, self.device)])

    def _drop_queue(self) -> None:
        self._queued, self._queued_accesses = [], 0

    # ------------------------------------------------------------------ writes
    def admit(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Offer rows that missed (unique, CPU) with their current values ``[n, dim]``; see the module docstring
        for who gets a slot. Call :meth:`record` for the batch first so that the estimates include it."""
        rows = rows.cpu()
        if values.shape != (rows.numel(), self.dim):
            raise ValueError(f"values must be [{rows.numel()}, {self.dim}], got {tuple(values.shape)}")
        if rows.numel() == 0:
            return
        if self.size:
            already = self._contains(rows)
            keep = (~already).nonzero().squeeze(1)
            rows, values = rows[keep], values[to_device(keep, values.device)]
        est = self.estimate(rows)
        order = torch.argsort(est, descending=True, stable=True)
        ranked, est = rows[order], est[order]  # candidates, most frequent first
        if self.size < self.capacity_rows:
            free = (self.slot_rows < 0).nonzero().squeeze(1)
        else:
            free = torch.empty(0, dtype=torch.int64)
        n_free = min(free.numel(), ranked.numel())
        slots, n_take = [free[:n_free]], n_free
        evicted = torch.empty(0, dtype=torch.int64)  # positions in the sorted index
        rest = ranked.numel() - n_free
        if rest and self.size:
            occupied = self._sorted_slots
            k = min(rest, occupied.numel())
            victim_est, victim_idx = torch.topk(self._slot_est[occupied], k, largest=False, sorted=True)
            # candidates descend, victims ascend: the candidates that beat their victim form a prefix
            wins = int((est[n_free : n_free + k] > victim_est).sum())
            evicted = victim_idx[:wins]
            slots.append(occupied[evicted])
            n_take += wins
            self._stats.evictions += wins
        slots = torch.cat(slots)
        if n_take:
            self.slot_rows[slots] = ranked[:n_take]
            self._slot_est[slots] = est[:n_take]
            src = to_device(order[:n_take], values.device)
            self.values[to_device(slots, self.device)] = values[src].to(self.device, self.dtype)
            self._stats.admissions += n_take
            self._merge_index(evicted, ranked[:n_take], slots)

    def update(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write-through: the new ``values`` of ``rows`` (unique, CPU) replace the cached copies of those that are
        cached; the others are ignored. Queued offers are admitted first, so they see the new values too."""
        self.flush()
        rows = rows.cpu()
        if self.size == 0 or rows.numel() == 0:
            return
        pos = torch.searchsorted(self._sorted_rows, rows).clamp_(max=self.size - 1)
        hit = self._sorted_rows[pos] == rows
        idx = hit.nonzero().squeeze(1)
        if idx.numel():
            slots = self._sorted_slots[pos[idx]]
            new = values[to_device(idx, values.device)]
            self.values[to_device(slots, self.device)] = new.to(self.device, self.dtype)

    def invalidate(self, rows: torch.Tensor) -> None:
        """Drop the cached copies of ``rows`` (their frequency counts stay, so hot rows come back); queued offers
        are admitted first, so none of them brings a dropped row back later."""
        self.flush()
        rows = rows.cpu()
        if self.size == 0 or rows.numel() == 0:
            return
        pos = torch.searchsorted(self._sorted_rows, rows).clamp_(max=self.size - 1)
        hit = self._sorted_rows[pos] == rows
        if bool(hit.any()):
            self.slot_rows[self._sorted_slots[pos[hit]]] = -1
            self._stats.invalidations += int(hit.sum())
            self._reindex()

    def clear(self) -> None:
        """Drop every cached row and every queued offer (statistics and frequency counts stay)."""
        self._drop_queue()
        self._stats.invalidations += self.size
        self.slot_rows.fill_(-1)
        self._reindex()

    # ------------------------------------------------------------------ index
    def _contains(self, rows: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self._sorted_rows, rows).clamp_(max=self.size - 1)
        return self._sorted_rows[pos] == rows

    def _merge_index(self, removed: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Drop positions ``removed`` of the sorted index and insert ``rows`` (not cached yet) held in ``slots``,
        in one O(size) pass instead of a re-sort."""
        keep = torch.ones(self.size, dtype=torch.bool)
        keep[removed] = False
        kept_rows, kept_slots = self._sorted_rows[keep], self._sorted_slots[keep]
        rows, order = torch.sort(rows)
        pos = torch.searchsorted(kept_rows, rows) + torch.arange(rows.numel())
        is_new = torch.zeros(kept_rows.numel() + rows.numel(), dtype=torch.bool)
        is_new[pos] = True
        merged_rows = torch.empty(is_new.numel(), dtype=torch.int64)
        merged_slots = torch.empty(is_new.numel(), dtype=torch.int64)
        merged_rows[pos], merged_slots[pos] = rows, slots[order]
        merged_rows[~is_new], merged_slots[~is_new] = kept_rows, kept_slots
        self._sorted_rows, self._sorted_slots = merged_rows, merged_slots

    def _reindex(self) -> None:
        occupied = (self.slot_rows >= 0).nonzero().squeeze(1)
        self._sorted_rows, perm = torch.sort(self.slot_rows[occupied])
        self._sorted_slots = occupied[perm]

    def __repr__(self) -> str:
        s = self.stats
        return (
            f"HotRowCache({self.size}/{self.capacity_rows} rows, {s.bytes_used}/{s.capacity_bytes} bytes on "
            f"{self.device}, hit_rate={s.hit_rate:.3f})"
        )
