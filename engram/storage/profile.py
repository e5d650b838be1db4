"""Access-frequency profile of Engram table rows: is it Zipf, and what would a cache of B bytes catch?

Paper section 5 motivates a cache hierarchy (hot rows in HBM / DRAM, the tail on SSD) by the Zipf distribution
of n-gram accesses, without giving the exponent or hit rates. :func:`zipf_profile` measures both on real hash
ids (fused row ids, i.e. per-head ids plus the table's ``offsets``; ``OffloadedEmbedding.fused_ids`` or
``MultiHeadEmbedding.fused_ids`` give them):

* ``exponent``: s in ``frequency(rank) ~ rank^-s``, from a least-squares line through (log rank, log count) at
  log-spaced ranks (so the head and the tail weigh alike) among the rows seen at least ``min_count`` times
  (below that, counts are sampling noise and the curve flattens into a plateau of ones).
* ``coverage(x)``: the fraction of accesses that go to the top x of rows.
* ``ideal_hit_rate(bytes)``: the hit rate of an ideal frequency cache of that size: one that holds, from the
  start, the ``bytes // (dim * itemsize)`` rows most accessed over the profiled stream. No cache that keeps a
  fixed set of rows does better on that stream; an adaptive cache can only beat it where popularity drifts along
  the stream. :class:`~engram.storage.HotRowCache` can be compared with it (:func:`simulate_cache`).

:func:`profile_corpus` hashes a token stream with a model's :class:`~engram.hashing.NgramHasher` and profiles
every Engram layer's table; ``engram profile`` is its command line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .cache import CacheStats, HotRowCache

_COALESCE_AT = 1 << 22  # merge partial (row, count) lists when they reach this many entries


@dataclass
class ZipfProfile:
    """Result of :func:`zipf_profile`. ``counts`` holds the access count of every distinct row, descending."""

    counts: torch.Tensor
    exponent: float
    fit_intercept: float
    fit_r2: float
    fit_max_rank: int
    num_rows: int | None = None
    row_bytes: int | None = None

    @property
    def accesses(self) -> int:
        return int(self.counts.sum())

    @property
    def distinct_rows(self) -> int:
        return self.counts.numel()

    def coverage(self, fraction: float) -> float:
        """Fraction of accesses to the top ``fraction`` of rows: of the table's ``num_rows`` when known, else of
        the distinct rows seen."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        base = self.num_rows if self.num_rows is not None else self.distinct_rows
        return self._top(math.ceil(fraction * base))

    def ideal_hit_rate(self, cache_bytes: int) -> float:
        """Hit rate of an ideal frequency cache of ``cache_bytes`` (module docstring)."""
        if self.row_bytes is None:
            raise ValueError("ideal_hit_rate needs the row size: pass dim= (and dtype=) to zipf_profile")
        return self._top(int(cache_bytes) // self.row_bytes)

    def _top(self, k: int) -> float:
        total = self.accesses
        return float(self.counts[:k].sum()) / total if total else 0.0

    def summary(self, top_fractions: Iterable[float] = (0.001, 0.01, 0.1), cache_bytes: Iterable[int] = ()) -> str:
        """A markdown table of the profile."""
        lines = [
            "| metric | value |",
            "|---|---|",
            f"| accesses | {self.accesses:,} |",
            f"| distinct rows | {self.distinct_rows:,} |",
        ]
        if self.num_rows is not None:
            lines.append(f"| table rows | {self.num_rows:,} ({self.distinct_rows / self.num_rows:.2%} touched) |")
        lines.append(
            f"| Zipf exponent s | {self.exponent:.3f} (R^2 {self.fit_r2:.3f}, ranks 1..{self.fit_max_rank:,}) |"
        )
        of = "table rows" if self.num_rows is not None else "distinct rows"
        for x in top_fractions:
            lines.append(f"| accesses to the top {x:.1%} of {of} | {self.coverage(x):.2%} |")
        for b in cache_bytes:
            lines.append(f"| ideal cache hit rate, {_human_bytes(b)} | {self.ideal_hit_rate(b):.2%} |")
        return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _as_ids(batch) -> torch.Tensor:
    ids = torch.as_tensor(batch)
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"row ids must be integers, got {ids.dtype}")
    ids = ids.reshape(-1).to("cpu", torch.int64)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("row ids must be non-negative (pass fused row ids: per-head ids plus offsets)")
    return ids


def count_rows(ids: torch.Tensor | Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, counts)`` of a tensor of row ids or an iterable of batches of them (any shapes)."""
    batches = [ids] if isinstance(ids, (torch.Tensor, np.ndarray)) else ids
    rows, counts, pending = [], [], 0
    for batch in batches:
        r, c = torch.unique(_as_ids(batch), return_counts=True)
        rows.append(r)
        counts.append(c)
        pending += r.numel()
        if pending >= _COALESCE_AT and len(rows) > 1:
            merged_rows, merged_counts = _merge(rows, counts)
            rows, counts, pending = [merged_rows], [merged_counts], merged_rows.numel()
    if not rows:
        return torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)
    return _merge(rows, counts)


def _merge(rows: list[torch.Tensor], counts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    r, inverse = torch.unique(torch.cat(rows), return_inverse=True)
    return r, torch.zeros(r.numel(), dtype=torch.int64).index_add_(0, inverse, torch.cat(counts))


def fit_zipf(counts: torch.Tensor, min_count: int = 5, points: int = 64) -> tuple[float, float, float, int]:
    """``(exponent s, intercept, R^2, largest rank used)`` of the line ``log count = intercept - s log rank``
    fitted to descending ``counts``."""
    counts = counts.to(torch.float64)
    usable = int((counts >= min_count).sum())
    if usable < 3:
        raise ValueError(
            f"only {usable} rows were accessed >= {min_count} times; too few to fit a Zipf exponent "
            f"(profile more batches or lower min_count)"
        )
    ranks = np.unique(np.round(np.logspace(0, math.log10(usable), points)).astype(np.int64))
    x = np.log(ranks.astype(np.float64))
    y = np.log(counts[torch.from_numpy(ranks - 1)].numpy())
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    total = y - y.mean()
    r2 = 1.0 - float(residual @ residual) / float(total @ total) if float(total @ total) > 0 else 1.0
    return float(-slope), float(intercept), r2, usable


def zipf_profile(
    ids: torch.Tensor | Iterable,
    *,
    num_rows: int | None = None,
    dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    min_count: int = 5,
) -> ZipfProfile:
    """Access-frequency profile of fused row ids (a tensor, or an iterable of batches).

    ``num_rows`` (the table size) makes :meth:`ZipfProfile.coverage` relative to the table; ``dim`` and
    ``dtype`` give the row size for :meth:`ZipfProfile.ideal_hit_rate`.
    """
    rows, counts = count_rows(ids)
    if rows.numel() == 0:
        raise ValueError("no row ids to profile")
    if num_rows is not None and int(rows.max()) >= num_rows:
        raise ValueError(f"row id {int(rows.max())} is outside a table of {num_rows} rows")
    counts = torch.sort(counts, descending=True).values
    exponent, intercept, r2, max_rank = fit_zipf(counts, min_count=min_count)
    row_bytes = None if dim is None else int(dim) * torch.empty((), dtype=dtype).element_size()
    return ZipfProfile(counts, exponent, intercept, r2, max_rank, num_rows, row_bytes)


def corpus_row_batches(
    hasher, tokens, layer_id: int, *, seq_len: int = 256, batch_size: int = 16, max_tokens: int | None = None
) -> Iterator[torch.Tensor]:
    """Fused row ids ``[batch_size, seq_len, (N-1)K]`` of ``layer_id``'s table for a stream of raw token ids.

    The stream is cut into consecutive windows of ``seq_len`` tokens (each hashed from a fresh, padded start,
    as a training window is), ``batch_size`` windows per batch; a last partial window is dropped.
    """
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if layer_id not in hasher.offsets:
        raise ValueError(f"layer {layer_id} has no Engram table; the hasher's layers are {sorted(hasher.offsets)}")
    n = len(tokens) if max_tokens is None else min(len(tokens), int(max_tokens))
    step = seq_len * batch_size
    offsets = hasher.offsets[layer_id]
    for start in range(0, n - seq_len + 1, step):
        stop = min(n, start + step)
        stop -= (stop - start) % seq_len
        raw = torch.from_numpy(np.asarray(tokens[start:stop]).astype(np.int64)).view(-1, seq_len)
        yield hasher.hash_tokens(raw)[layer_id] + offsets


def profile_corpus(
    hasher,
    tokens,
    *,
    dim: int,
    dtype: torch.dtype = torch.float32,
    seq_len: int = 256,
    batch_size: int = 16,
    max_tokens: int | None = None,
    min_count: int = 5,
    layer_ids: Iterable[int] | None = None,
) -> dict[int, ZipfProfile]:
    """The :class:`ZipfProfile` of every Engram layer's table (``dim`` = the table's row width) over a stream of
    raw token ids, hashed as :func:`corpus_row_batches` does."""
    layers = list(hasher.offsets) if layer_ids is None else list(layer_ids)
    return {
        layer: zipf_profile(
            corpus_row_batches(hasher, tokens, layer, seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens),
            num_rows=hasher.num_rows[layer],
            dim=dim,
            dtype=dtype,
            min_count=min_count,
        )
        for layer in layers
    }


def simulate_cache(
    batches: Iterable[torch.Tensor], cache_bytes: int, dim: int, dtype: torch.dtype = torch.float32
) -> CacheStats:
    """Replay batches of fused row ids through a :class:`HotRowCache` of ``cache_bytes`` (on the CPU, with
    placeholder values) in the order :class:`~engram.storage.OffloadedEmbedding` drives it: look up, count,
    admit the misses. Returns its statistics; compare ``hit_rate`` with :meth:`ZipfProfile.ideal_hit_rate`."""
    cache = HotRowCache(cache_bytes, dim, dtype, "cpu")
    placeholder = torch.zeros(1, dim, dtype=dtype)
    for batch in batches:
        unique, counts = torch.unique(_as_ids(batch), return_counts=True)
        hit, _ = cache.lookup(unique, counts)
        cache.record(unique, counts)
        missed = unique[~hit]
        cache.admit(missed, placeholder.expand(missed.numel(), dim))
    return cache.stats
