"""The long-context figure: accuracy against length, one panel per task, one line per model, and the tail loss.

Input is one or more results of :func:`engram.train.long_context.evaluate_long_context` (``engram eval
--long-context --out``), keyed by a label; the comparison of matched models passes several.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_long_context(results: Mapping[str, dict], path: str | Path) -> Path:
    """Accuracy (%) vs length (log2 axis) per task, and the tail loss vs length in the last panel."""
    if not results:
        raise ValueError("plot_long_context needs at least one result")
    tasks = list(next(iter(results.values()))["accuracy"])
    n_panels = len(tasks) + 1
    cols = min(4, n_panels)
    rows = math.ceil(n_panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    flat = axes.ravel()
    for i, (label, r) in enumerate(results.items()):
        lengths = r["settings"]["lengths"]
        for ax, task in zip(flat, tasks):
            points = [(L, 100 * r["accuracy"][task][str(L)]) for L in lengths if r["accuracy"][task][str(L)] is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=f"C{i}", label=label)
        tail = [(L, r["tail_loss"][str(L)]["loss"]) for L in lengths if r["tail_loss"][str(L)]["loss"] is not None]
        if tail:
            flat[len(tasks)].plot(*zip(*tail), "o-", color=f"C{i}", label=label)
    settings = next(iter(results.values()))["settings"]
    samples = settings["samples"]
    for ax, task in zip(flat, tasks):
        ax.set_title(f"{task} ({samples} samples per point)", fontsize=9)
        ax.set_ylim(-5, 105)
        ax.set_ylabel("exact match (%)")
    flat[len(tasks)].set_title(f"loss on the last {100 * settings['tail_fraction']:.0f}% of each window", fontsize=9)
    flat[len(tasks)].set_ylabel("nats / token")
    lengths = sorted({L for r in results.values() for L in r["settings"]["lengths"]})
    for ax in flat[:n_panels]:
        ax.set_xscale("log", base=2)
        ax.set_xlim(lengths[0] / 1.4, lengths[-1] * 1.4)
        ax.set_xticks(lengths, [str(L) for L in lengths])
        ax.minorticks_off()
        ax.set_xlabel("length (tokens)")
        ax.grid(alpha=0.3)
        if not ax.lines:
            ax.text(0.5, 0.5, "does not fit\nthese lengths", ha="center", va="center", transform=ax.transAxes)
    for ax in flat[n_panels:]:
        ax.set_axis_off()
    flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
