"""Memory-scaling sweep (paper section 3.3, Fig. 4): a fixed MoE backbone plus ever larger n-gram tables.

Engram's table rows are swept over a log range; against each, OverEncoding (hashed n-gram *input* embeddings,
:class:`engram.model.OverEncodingConfig`) gets the same number of table parameters. The paper reports loss
linear in log(memory) for both, with a much steeper slope for Engram. Parameters are added, not traded: the
backbone stays fixed, so total parameters grow along the x-axis.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np

from ..accounting import engram_counts
from ..config import EngramConfig
from ..model.config import ModelConfig, OverEncodingConfig
from ..model.overencoding import overencoding_hasher
from ..model.params import count_params, format_count
from ..train.optim import OptimConfig
from ..train.trainer import RunConfig, TrainConfig
from .plotting import pyplot
from .runner import SweepPoint, summarize

DEFAULT_ROWS = (128, 512, 2048, 8192, 32768)


def table_params(cfg: ModelConfig) -> int:
    """Parameters in the model's n-gram tables (Engram rows or OverEncoding rows), from the config."""
    if cfg.family == "engram":
        return engram_counts(cfg.engram, cfg.hidden_size).table_params
    if cfg.family == "overencoding":
        return count_params(cfg).total - count_params(cfg.replace(family="moe", overencoding=None)).total
    return 0


def _oe_table_params(hidden: int, table_size: int, max_ngram_size: int) -> int:
    sizes = overencoding_hasher(OverEncodingConfig(table_size, max_ngram_size), 2, hidden, 0).table_sizes[0]
    return sum(p for heads in sizes for p in heads) * hidden


def overencoding_for(backbone: ModelConfig, params: int, max_ngram_size: int) -> ModelConfig:
    """OverEncoding on ``backbone`` whose tables (one hidden-wide table per order, prime rows) come closest to
    ``params`` parameters."""
    d = backbone.hidden_size
    lo, hi = 2, 2
    while _oe_table_params(d, hi, max_ngram_size) < params:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # non-decreasing in table_size: find the last size at or below the target
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _oe_table_params(d, mid, max_ngram_size) <= params else (lo, mid)
    size = min((lo, hi), key=lambda s: abs(_oe_table_params(d, s, max_ngram_size) - params))
    return backbone.replace(
        family="overencoding", overencoding=dataclasses.asdict(OverEncodingConfig(size, max_ngram_size))
    )


def memory_points(
    backbone: ModelConfig, engram: EngramConfig, rows_per_head: list[int], train: TrainConfig, optim: OptimConfig
) -> list[SweepPoint]:
    """The backbone alone, then for each size an Engram point and an OverEncoding point with equal table params."""
    if backbone.family != "moe":
        raise ValueError(f"the memory sweep adds tables to a fixed 'moe' backbone, got family {backbone.family!r}")
    run = lambda cfg: RunConfig(model=cfg, train=copy.deepcopy(train), optim=optim)  # noqa: E731
    points = [SweepPoint("moe", run(backbone), {"method": "none", "rows_per_head": 0, "table_params": 0})]
    for rows in rows_per_head:
        eng = dataclasses.replace(engram, engram_vocab_size=[int(rows)] * engram.num_orders)
        e_cfg = backbone.replace(family="engram", engram=eng.to_dict())
        p = table_params(e_cfg)
        o_cfg = overencoding_for(backbone, p, engram.max_ngram_size)
        points.append(
            SweepPoint(
                f"engram-{rows}", run(e_cfg), {"method": "engram", "rows_per_head": int(rows), "table_params": p}
            )
        )
        points.append(
            SweepPoint(
                f"overencoding-{rows}",
                run(o_cfg),
                {"method": "overencoding", "rows_per_head": int(rows), "table_params": table_params(o_cfg)},
            )
        )
    return points


def fit_log_slope(params: list[float], losses: list[float]) -> tuple[float, float]:
    """Least-squares ``loss = a + b * log10(params)``; returns (a, b), b = loss change per 10x memory."""
    if len(params) < 2:
        raise ValueError(f"a slope needs at least 2 points, got {len(params)}")
    x = np.log10(np.asarray(params, dtype=np.float64))
    b, a = np.polyfit(x, np.asarray(losses, dtype=np.float64), 1)
    return float(a), float(b)


def memory_fits(rows: list[dict]) -> dict[str, dict]:
    """Per method: the seed-averaged points and the fitted log-linear slope."""
    out = {}
    for method in ("engram", "overencoding"):
        stats = sorted(
            summarize([r for r in rows if r["method"] == method], "table_params"), key=lambda s: s["table_params"]
        )
        if len(stats) >= 2:
            a, b = fit_log_slope([s["table_params"] for s in stats], [s["mean"] for s in stats])
            out[method] = {"points": stats, "intercept": a, "slope_per_decade": b}
    return out


def plot_memory(rows: list[dict], path: str | Path) -> Path:
    """Loss against table parameters (log x) for both methods, with their fitted lines and slopes."""
    fits = memory_fits(rows)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 3.9))
    labels = {"engram": "MoE + Engram", "overencoding": "MoE + OverEncoding"}
    for i, (method, f) in enumerate(fits.items()):
        xs = [s["table_params"] for s in f["points"]]
        ys = [s["mean"] for s in f["points"]]
        ax.plot(xs, ys, "o", color=f"C{i}")
        grid = np.logspace(math.log10(min(xs)), math.log10(max(xs)), 50)
        ax.plot(
            grid,
            f["intercept"] + f["slope_per_decade"] * np.log10(grid),
            "-",
            color=f"C{i}",
            label=f"{labels[method]}: {f['slope_per_decade']:+.4f} / decade",
        )
    base = [r["val_loss"] for r in rows if r["method"] == "none"]
    if base:
        ax.axhline(float(np.mean(base)), color="gray", ls="--", lw=1, label="MoE backbone alone")
    ax.set_xscale("log")
    ax.set_xlabel("n-gram table parameters")
    ax.set_ylabel("validation loss (nats/token)")
    moe = [r for r in rows if r["method"] == "none"]
    backbone = f" on a {format_count(moe[0]['total'])} MoE" if moe else ""
    ax.set_title(f"Memory scaling{backbone}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
