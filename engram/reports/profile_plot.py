"""The rank-frequency plot of an Engram table's access profile (:func:`engram.storage.zipf_profile`)."""

from __future__ import annotations

import os

import numpy as np

from ..storage.profile import ZipfProfile


def plot_rank_frequency(profile: ZipfProfile, path: str | os.PathLike, title: str | None = None) -> str:
    """Save the rank-frequency curve (log-log) with the fitted Zipf line as a PNG; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = profile.counts.numpy()
    ranks = np.arange(1, counts.size + 1)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(ranks, counts, ".", markersize=2, label="rows")
    fit_ranks = np.array([1, profile.fit_max_rank], dtype=np.float64)
    ax.loglog(fit_ranks, np.exp(profile.fit_intercept) * fit_ranks ** -profile.exponent, "-",
              label=f"Zipf s = {profile.exponent:.2f} (R$^2$ {profile.fit_r2:.2f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("accesses")
    ax.set_title(title or f"{profile.accesses:,} accesses, {profile.distinct_rows:,} distinct rows")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)
