"""Parameter / FLOP accounting and the sparsity-allocation rule (paper section 3.1).

Definitions (paper): ``P_tot`` = trainable parameters excluding the token embedding and the LM head;
``P_act`` = parameters activated per token (same exclusion); ``P_sparse = P_tot - P_act``. The allocation ratio
rho is the share of ``P_sparse`` kept in routed experts: ``P_MoE_sparse = rho * P_sparse`` and the rest,
``(1 - rho) * P_sparse``, goes to Engram table rows. rho = 1 is the pure MoE.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..accounting import engram_counts
from ..config import EngramConfig
from ..module import MultiHeadEmbedding
from ..tokenizer import CompressedTokenizer
from .config import ModelConfig
from .ffn import MoE


@dataclass
class ParamCounts:
    """All counts exclude the token embedding and LM head unless the name says ``with_embeddings``."""

    total: int  # P_tot
    activated: int  # P_act
    engram: int  # Engram table + projection parameters (all layers)
    engram_table_rows: int
    routed_experts: int  # routed experts per MoE layer
    routed_expert_params: int  # all routed-expert parameters
    embeddings: int  # token embedding + (untied) LM head
    flops_per_token: int  # forward FLOPs per token (2 per multiply-add; attention at mean causal context)

    @property
    def sparse(self) -> int:
        return self.total - self.activated

    @property
    def total_with_embeddings(self) -> int:
        return self.total + self.embeddings

    @property
    def activated_with_head(self) -> int:
        """Activated incl. the LM head (the paper's dense-model figures count it)."""
        return self.activated + (self.embeddings // 2 if self.embeddings else 0)

    def as_dict(self) -> dict[str, int]:
        d = dataclasses.asdict(self)
        d.update(sparse=self.sparse, total_with_embeddings=self.total_with_embeddings)
        return d


def _counting_tokenizer(cfg: ModelConfig) -> CompressedTokenizer | None:
    # Table sizes depend only on the config; V' only changes the multipliers, which hold no parameters.
    return CompressedTokenizer.identity(cfg.vocab_size) if cfg.family == "engram" else None


def count_params(cfg: ModelConfig) -> ParamCounts:
    """Count a config's parameters by building it on the meta device (nothing is allocated)."""
    from .model import EngramLM

    with torch.device("meta"):
        model = EngramLM(cfg, _counting_tokenizer(cfg))
    embeddings = model.tok_emb.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    total = sum(p.numel() for p in model.parameters()) - embeddings
    inactive = 0
    routed_params = 0
    for m in model.modules():
        if isinstance(m, MoE):
            expert_params = sum(p.numel() for p in m.parameters() if p.dim() == 3)
            routed_params += expert_params
            inactive += expert_params * (m.n_routed_experts - m.top_k) // m.n_routed_experts
        elif isinstance(m, MultiHeadEmbedding):
            n_heads = len(m.head_sizes)
            inactive += (m.num_rows - n_heads) * m.head_dim  # one row per head is read per token
    activated = total - inactive
    engram_params = 0
    rows = 0
    if cfg.family == "engram":
        c = engram_counts(cfg.engram, cfg.hidden_size, cfg.hc_mult if cfg.engram.multi_branch else 1)
        engram_params, rows = c.total_params, c.table_rows
    # FLOPs: every activated weight does one multiply-add per token, except table rows (a copy, no math).
    table_act = sum(len(m.head_sizes) * m.head_dim for m in model.modules() if isinstance(m, MultiHeadEmbedding))
    matmul = activated - table_act + (model.lm_head.weight.numel())
    if cfg.attention == "mla":
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.attn_head_dim
    attn = 2 * cfg.num_layers * (cfg.max_seq_len // 2) * cfg.num_heads * (qk + v)
    return ParamCounts(
        total=total,
        activated=activated,
        engram=engram_params,
        engram_table_rows=rows,
        routed_experts=cfg.n_routed_experts if cfg.is_moe else 0,
        routed_expert_params=routed_params,
        embeddings=embeddings,
        flops_per_token=2 * matmul + attn,
    )


def match_table_budget(engram: EngramConfig, target: int) -> EngramConfig:
    """``engram`` with one per-head size for every order, chosen so its table parameters come closest to ``target``.

    Table sizes are distinct primes climbing from the configured size (one per head, layer and order), so the
    parameters are not simply rows x heads x width; this searches the configured size instead of estimating it.
    """

    def params(rows: int) -> int:
        return engram_counts(dataclasses.replace(engram, engram_vocab_size=[rows] * engram.num_orders), 1).table_params

    lo, hi = 2, 2
    while params(hi) < target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # params() is non-decreasing in rows: largest rows with params(rows) <= target is lo
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid) <= target else (lo, mid)
    best = min((lo, hi), key=lambda r: abs(params(r) - target))
    return dataclasses.replace(engram, engram_vocab_size=[best] * engram.num_orders)


def default_engram_template(base: ModelConfig) -> EngramConfig:
    """A small-model Engram template: 2/3-grams, 4 heads, memory width = hidden, blocks 1 and L/2."""
    layers = sorted({min(1, base.num_layers - 1), base.num_layers // 2})
    return EngramConfig(
        engram_vocab_size=[1000, 1000],
        max_ngram_size=3,
        n_embed_per_ngram=base.hidden_size // 2,
        n_head_per_ngram=4,
        layer_ids=layers,
        pad_id=0,
    )


def allocate(base: ModelConfig, rho: float, engram: EngramConfig | None = None) -> ModelConfig:
    """The config that keeps ``rho`` of ``base``'s sparse budget in routed experts and gives the rest to Engram.

    ``base`` must be a pure ``moe`` config. Routed experts drop from E to ``k + round(rho * (E - k))`` (the
    activated top-k stays), and the freed parameters (less Engram's own projections) become table rows, one size
    for every order chosen by :func:`match_table_budget`, so the total matches ``base``'s up to one prime step
    per head (the primes climb from that size), and the activated parameters are ``base``'s plus Engram's projections
    and the d_mem table values it reads per token (reported by :func:`allocation_table`).

    ``engram`` gives the memory's shape (orders, heads, width, layers); its ``engram_vocab_size`` is replaced.
    """
    if base.family != "moe":
        raise ValueError(f"allocate() starts from a pure 'moe' config, got family {base.family!r}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho is a share of the sparse budget and must be in [0, 1], got {rho}")
    if rho == 1.0:
        return base
    engram = engram or default_engram_template(base)
    k, e = base.num_experts_per_tok, base.n_routed_experts
    e_new = k + int(math.floor(rho * (e - k) + 0.5))  # round half up (paper: rho=0.4 of 106 -> 46)
    if e_new == e:
        raise ValueError(f"rho={rho} keeps all {e} routed experts (too few experts to move); use rho=1 or more experts")
    # everything the dropped experts held: their weights and their rows of every router
    freed = count_params(base).total - count_params(base.replace(n_routed_experts=e_new)).total
    hc = base.hc_mult if engram.multi_branch else 1
    probe = dataclasses.replace(engram, engram_vocab_size=[2] * engram.num_orders)
    dense = engram_counts(probe, base.hidden_size, hc).dense_params
    if freed - dense < engram_counts(probe, base.hidden_size, hc).table_params:
        raise ValueError(
            f"rho={rho} frees {freed:,} parameters, not enough for Engram's {dense:,} projection parameters plus "
            f"tables; lower rho or shrink n_embed_per_ngram"
        )
    eng = match_table_budget(engram, freed - dense)
    eng.validate(base.num_layers)
    return base.replace(family="engram", n_routed_experts=e_new, engram=eng.to_dict())


def dense_counterpart(base: ModelConfig) -> ModelConfig:
    """The dense model with ``base``'s activated FFN width: every block a SwiGLU of (shared + top-k) experts' width."""
    if not base.is_moe:
        raise ValueError(f"dense_counterpart() takes an MoE config, got family {base.family!r}")
    width = (base.n_shared_experts + base.num_experts_per_tok) * base.moe_intermediate_size
    return base.replace(family="dense", intermediate_size=width, engram=None, overencoding=None)


def allocation_table(base: ModelConfig, rhos: list[float], engram: EngramConfig | None = None) -> list[dict]:
    """One row per rho: total, activated, sparse, Engram params, routed experts, table rows, FLOPs/token."""
    rows = []
    for rho in rhos:
        cfg = allocate(base, rho, engram)
        c = count_params(cfg)
        rows.append(
            {
                "rho": rho,
                "family": cfg.family,
                "total": c.total,
                "activated": c.activated,
                "sparse": c.sparse,
                "engram": c.engram,
                "routed_experts": c.routed_experts,
                "table_rows": c.engram_table_rows,
                "flops_per_token": c.flops_per_token,
            }
        )
    return rows


def format_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`allocation_table` rows."""
    cols = [
        "rho",
        "family",
        "total",
        "activated",
        "sparse",
        "engram",
        "routed_experts",
        "table_rows",
        "flops_per_token",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if c == "rho":
                cells.append(f"{v:.2f}")
            elif isinstance(v, (int, np.integer)) and c not in ("routed_experts",):
                cells.append(format_count(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
