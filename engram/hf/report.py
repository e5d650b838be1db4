"""Figures of adapter comparisons (matplotlib lives here, not in the adapter or training code)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_adapter_comparison(rows: dict[str, dict], path: str | Path) -> Path:
    """Two panels: in-domain validation loss before/after and loss on the forgetting corpus before/after, per arm.

    ``rows[arm]`` holds ``before`` / ``after`` dicts of loss per split (first split = in-domain)."""
    arms = list(rows)
    splits = list(rows[arms[0]]["before"])
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.8))
    for ax, split in zip(axes if len(splits) > 1 else [axes], splits):
        before = [rows[a]["before"][split] for a in arms]
        after = [rows[a]["after"][split] for a in arms]
        x = range(len(arms))
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="before", color="0.7")
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="after", color="C0")
        for i, (b, a) in enumerate(zip(before, after)):
            ax.text(i + 0.2, a, f"{a - b:+.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), arms)
        lo = min(before + after)
        ax.set_ylim(lo * 0.9, max(before + after) * 1.03)
        ax.set_title(f"{split} validation loss (nats/token)")
        ax.grid(axis="y", alpha=0.3)
    (axes[0] if len(splits) > 1 else axes).legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return Path(path)
