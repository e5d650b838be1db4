"""Ablation sweep (paper section 3.4, Fig. 5): the reference Engram model against one change at a time.

The reference is a fixed MoE backbone with mHC (``hc_mult`` > 1, so that branch-specific fusion can be removed)
plus an Engram memory of a fixed table budget at two blocks, trained with tables at 5x the base learning rate.
Each variant changes exactly what its name says:

=====================  ==========================================================================================
variant                change against ``reference`` (table parameters kept unless noted)
=====================  ==========================================================================================
moe                    no Engram at all (the backbone)
no-gating              ``gating = False`` (alpha = 1; drops the W_K projections)
no-compress            ``compress_tokens = False`` (hash raw ids)
no-conv                ``short_conv = False``
no-multi-branch        ``multi_branch = False``: one fusion on the H_pre-mixed hidden state, written back by H_post
4-grams                ``max_ngram_size = 4``; per-order rows cut to keep the table parameters
block-B                one module at block B holding the whole budget: the same rows per head, heads twice as
                       wide (the reference splits it over two modules of half the width, as the paper does)
one-row-table          every head at the smallest prime >= 2 (distinct primes: 2, 3, 5, ...): capacity control
table-lr-1x            tables at 1x the base learning rate instead of 5x (model unchanged)
dense                  the backbone with a dense SwiGLU in every block instead of MoE (no Engram)
dense+engram-iso       ``dense`` with its FFN narrowed to pay for an Engram: same total parameters
dense+engram-extra     ``dense`` plus the reference's Engram (parameters added)
=====================  ==========================================================================================
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..accounting import engram_counts
from ..config import EngramConfig
from ..model.config import ModelConfig
from ..model.params import count_params, match_table_budget
from ..train.optim import OptimConfig
from ..train.trainer import RunConfig, TrainConfig
from .plotting import pyplot
from .runner import SweepPoint, summarize


@dataclass
class Variant:
    name: str
    model: ModelConfig
    optim: OptimConfig


def with_engram(backbone: ModelConfig, engram: EngramConfig) -> ModelConfig:
    return backbone.replace(family="engram", engram=engram.to_dict())


def allocate_dense(dense: ModelConfig, ffn_share: float, engram: EngramConfig) -> ModelConfig:
    """Dense + Engram at ``dense``'s total parameters: every block's FFN loses ``ffn_share`` of its width, and the
    freed parameters, less Engram's own projections, become table rows (:func:`match_table_budget`, so the total
    is matched up to one prime step per head). ``engram`` gives the shape; its sizes are replaced.

    The result has family ``engram`` with ``first_k_dense = num_layers``, i.e. no MoE block. Activated
    parameters drop by about the freed FFN share: this is the iso-total comparison asked about in
    deepseek-ai/Engram#20, not an iso-compute one.
    """
    if dense.family != "dense":
        raise ValueError(f"allocate_dense() starts from a 'dense' config, got family {dense.family!r}")
    if not 0.0 < ffn_share < 1.0:
        raise ValueError(f"ffn_share must be in (0, 1), got {ffn_share}")
    width = max(1, round(dense.intermediate_size * (1.0 - ffn_share)))
    narrow = dense.replace(intermediate_size=width)
    freed = count_params(dense).total - count_params(narrow).total
    hc = dense.hc_mult if engram.multi_branch else 1
    probe = dataclasses.replace(engram, engram_vocab_size=[2] * engram.num_orders)
    proj = engram_counts(probe, dense.hidden_size, hc).dense_params
    min_tables = engram_counts(probe, dense.hidden_size, hc).table_params
    if freed - proj < min_tables:
        raise ValueError(
            f"ffn_share={ffn_share} frees {freed:,} parameters, fewer than Engram's {proj:,} "
            f"projection parameters plus tables; raise ffn_share or shrink n_embed_per_ngram"
        )
    eng = match_table_budget(engram, freed - proj)
    return narrow.replace(family="engram", first_k_dense=dense.num_layers, engram=eng.to_dict())


def ablation_variants(
    backbone: ModelConfig, reference: EngramConfig, optim: OptimConfig, dense_ffn_share: float = 0.5
) -> list[Variant]:
    """The variants of the module docstring, ``reference`` first."""
    if backbone.family != "moe":
        raise ValueError(f"the ablation backbone must be a 'moe' config, got family {backbone.family!r}")
    if backbone.hc_mult < 2:
        raise ValueError("the multi-branch ablation needs a backbone with hc_mult >= 2 (mHC); set model.hc_mult=2")
    if len(reference.layer_ids) < 1:
        raise ValueError("the reference needs at least one Engram layer")
    ref = dataclasses.replace
    one_x = dataclasses.replace(optim, table_lr_mult=1.0)
    out = [Variant("reference", with_engram(backbone, reference), optim), Variant("moe", backbone, optim)]
    for name, field in (
        ("no-gating", "gating"),
        ("no-compress", "compress_tokens"),
        ("no-conv", "short_conv"),
        ("no-multi-branch", "multi_branch"),
    ):
        out.append(Variant(name, with_engram(backbone, ref(reference, **{field: False})), optim))
    budget = engram_counts(reference, backbone.hidden_size).table_params
    four = match_table_budget(ref(reference, max_ngram_size=4, engram_vocab_size=[2, 2, 2]), budget)
    out.append(Variant("4-grams", with_engram(backbone, four), optim))
    widen = len(reference.layer_ids)
    for b in range(backbone.num_layers):
        single = ref(reference, layer_ids=[b], n_embed_per_ngram=reference.n_embed_per_ngram * widen)
        out.append(Variant(f"block-{b}", with_engram(backbone, match_table_budget(single, budget)), optim))
    one_row = ref(reference, engram_vocab_size=[2] * reference.num_orders)
    out.append(Variant("one-row-table", with_engram(backbone, one_row), optim))
    out.append(Variant("table-lr-1x", with_engram(backbone, reference), one_x))
    dense = backbone.replace(family="dense")
    out.append(Variant("dense", dense, optim))
    out.append(Variant("dense+engram-iso", allocate_dense(dense, dense_ffn_share, reference), optim))
    extra = with_engram(backbone, reference).replace(first_k_dense=backbone.num_layers)  # every block dense
    out.append(Variant("dense+engram-extra", extra, optim))
    return out


def ablation_points(
    backbone: ModelConfig,
    reference: EngramConfig,
    train: TrainConfig,
    optim: OptimConfig,
    dense_ffn_share: float = 0.5,
    only: list[str] | None = None,
) -> list[SweepPoint]:
    """One point per variant (``only`` picks a subset by name)."""
    variants = ablation_variants(backbone, reference, optim, dense_ffn_share)
    if only:
        unknown = sorted(set(only) - {v.name for v in variants})
        if unknown:
            raise ValueError(f"unknown ablation variants {unknown}; known: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in only]
    return [
        SweepPoint(v.name, RunConfig(model=v.model, train=copy.deepcopy(train), optim=v.optim), {"variant": v.name})
        for v in variants
    ]


def plot_ablation(rows: list[dict], path: str | Path) -> Path:
    """Left: each variant's loss (mean and min-max over seeds; n = seeds where more than one) against the reference,
    the MoE and the dense backbones. Right: the single-module placement."""
    stats = {s["variant"]: s for s in summarize(rows, "variant")}
    blocks = sorted((int(k.split("-")[1]), s) for k, s in stats.items() if k.startswith("block-"))
    others = [k for k in stats if not k.startswith("block-")]
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.4), gridspec_kw={"width_ratios": [1.6, 1]})
    ys = range(len(others))
    ax.errorbar(
        [stats[k]["mean"] for k in others],
        list(ys),
        xerr=[
            [stats[k]["mean"] - stats[k]["min"] for k in others],
            [stats[k]["max"] - stats[k]["mean"] for k in others],
        ],
        fmt="o",
        color="C0",
        capsize=3,
    )
    ax.set_yticks(list(ys), [k if stats[k]["n"] == 1 else f"{k} (n={stats[k]['n']})" for k in others], fontsize=8)
    ax.invert_yaxis()
    for key, color in (("reference", "C2"), ("moe", "gray"), ("dense", "C4")):
        if key in stats:
            ax.axvline(stats[key]["mean"], color=color, ls="--", lw=1, label=key)
    ax.set_xlabel("validation loss (nats/token)")
    ax.set_title("Ablations (one change each against the reference)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if blocks:
        bx.errorbar(
            [b for b, _ in blocks],
            [s["mean"] for _, s in blocks],
            yerr=[[s["mean"] - s["min"] for _, s in blocks], [s["max"] - s["mean"] for _, s in blocks]],
            fmt="o-",
            color="C1",
            capsize=3,
            label="one module at block (min-max over seeds)",
        )
        for key, color in (("reference", "C2"), ("moe", "gray")):
            if key in stats:
                bx.axhline(stats[key]["mean"], color=color, ls="--", lw=1, label=key)
        bx.set_xticks([b for b, _ in blocks])
        bx.set_xlabel("block (0-based) of the single Engram module")
        bx.set_ylabel("validation loss")
        bx.set_title("Placement at the same table budget", fontsize=10)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=8)
    else:
        bx.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
