"""Sparsity-allocation sweep (paper section 3.1, Fig. 3): the U-curve of validation loss over rho.

At a fixed compute budget -- total parameters P_tot, activated parameters P_act and training tokens all held --
rho is the share of the sparse budget P_tot - P_act kept in routed experts; the rest becomes Engram table rows
(:func:`engram.model.allocate`). rho = 1 is the pure MoE. The paper finds a U-shape with its minimum at
rho = 0.75-0.8 at two budgets.
"""

from __future__ import annotations

import copy
from pathlib import Path

from ..config import EngramConfig
from ..model.config import ModelConfig
from ..model.params import allocate, count_params, format_count
from ..train.optim import OptimConfig
from ..train.trainer import RunConfig, TrainConfig
from .plotting import pyplot
from .runner import SweepPoint, summarize

DEFAULT_RHOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def allocation_points(
    base: ModelConfig, rhos: list[float], engram: EngramConfig, train: TrainConfig, optim: OptimConfig
) -> list[SweepPoint]:
    """One point per rho: ``allocate(base, rho, engram)``, same data, steps and recipe."""
    if len(set(rhos)) != len(rhos):
        raise ValueError(f"rhos must be distinct, got {rhos}")
    points = []
    for rho in rhos:
        cfg = allocate(base, float(rho), engram)
        points.append(
            SweepPoint(
                f"rho-{rho:.2f}", RunConfig(model=cfg, train=copy.deepcopy(train), optim=optim), {"rho": float(rho)}
            )
        )
    return points


def budget(base: ModelConfig, train: TrainConfig) -> dict:
    """The compute budget the sweep holds: P_tot, P_act, training tokens, and 6 * P_act * tokens."""
    c = count_params(base)
    tokens = train.steps * train.batch_size * train.seq_len
    return {"total": c.total, "activated": c.activated, "tokens": tokens, "approx_flops": 6 * c.activated * tokens}


def plot_u_curve(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Validation loss against rho (mean over seeds with min-max bars where there are several; open markers for
    single-seed points), the pure MoE as a dashed line."""
    stats = sorted(summarize(rows, "rho"), key=lambda s: s["rho"])
    rhos = [s["rho"] for s in stats]
    means = [s["mean"] for s in stats]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(rhos, means, "-", color="C0", lw=1.2)
    multi = [s for s in stats if s["n"] > 1]
    single = [s for s in stats if s["n"] == 1]
    if multi:
        ax.errorbar(
            [s["rho"] for s in multi],
            [s["mean"] for s in multi],
            yerr=[[s["mean"] - s["min"] for s in multi], [s["max"] - s["mean"] for s in multi]],
            fmt="o",
            color="C0",
            capsize=3,
            label=f"MoE + Engram: mean, min-max over {max(s['n'] for s in multi)} seeds",
        )
    if single:
        ax.plot(
            [s["rho"] for s in single],
            [s["mean"] for s in single],
            "o",
            mfc="white",
            color="C0",
            label="MoE + Engram: one seed",
        )
    moe = [s for s in stats if s["rho"] == 1.0]
    if moe:
        ax.axhline(moe[0]["mean"], color="gray", ls="--", lw=1, label="pure MoE (rho = 1)")
    best = min(stats, key=lambda s: s["mean"])
    ax.plot([best["rho"]], [best["mean"]], "*", color="C3", ms=13, label=f"lowest loss: rho = {best['rho']:.2f}")
    ax.set_xlabel("rho: share of the sparse budget kept in routed experts")
    ax.set_ylabel("validation loss (nats/token)")
    first = rows[0]
    ax.set_title(
        title or f"Allocation at P_tot {format_count(first['total'])}, {format_count(first['tokens'])} tokens",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
