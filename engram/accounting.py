"""Parameter and FLOP accounting for Engram layers, computed from the config alone (no table is allocated)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import EngramConfig
from .hashing import table_primes


@dataclass
class EngramCounts:
    """Counts for all Engram layers of a model.

    ``table_params`` are the embedding rows (the sparse memory); ``dense_params`` the projections, norms and
    conv. ``activated_params`` per token = the d_mem table values actually read per layer + all dense params.
    ``flops_per_token`` counts multiply-adds as 2 FLOPs (projections, gate dot products, conv).
    """

    layers: int
    table_rows: int
    table_params: int
    dense_params: int
    activated_params: int
    flops_per_token: int

    @property
    def total_params(self) -> int:
        return self.table_params + self.dense_params

    def as_dict(self) -> dict[str, int]:
        d = asdict(self)
        d["total_params"] = self.total_params
        return d


def engram_dense_params(config: EngramConfig, hidden_size: int, hc_mult: int) -> int:
    """Non-table parameters of one Engram layer (W_V, M W_K with biases, 2M gate norms, ShortConv)."""
    d_mem, d, m = config.memory_dim, hidden_size, hc_mult
    n_proj = (1 + m) if config.gating else 1
    proj = n_proj * (d_mem * d + d)
    norms = 2 * m * d if config.gating else 0
    conv = (m * d + m * d * config.kernel_size) if config.short_conv else 0
    return proj + norms + conv


def engram_counts(config: EngramConfig, hidden_size: int, hc_mult: int = 1) -> EngramCounts:
    """Parameter / activated-parameter / FLOP counts of the config's Engram layers."""
    primes = table_primes(config)
    rows = sum(p for per_order in primes.values() for heads in per_order for p in heads)
    n_layers = len(config.layer_ids)
    dense_one = engram_dense_params(config, hidden_size, hc_mult)
    d_mem, d, m = config.memory_dim, hidden_size, hc_mult
    n_proj = (1 + m) if config.gating else 1
    flops_one = 2 * n_proj * d_mem * d
    if config.gating:
        flops_one += 2 * 2 * m * d  # q.k dot product per branch + gating multiply
    if config.short_conv:
        flops_one += 2 * m * d * config.kernel_size + m * d  # depthwise conv + residual add
    return EngramCounts(
        layers=n_layers,
        table_rows=rows,
        table_params=rows * config.head_dim,
        dense_params=n_layers * dense_one,
        activated_params=n_layers * (d_mem + dense_one),
        flops_per_token=n_layers * flops_one,
    )
