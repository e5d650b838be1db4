"""The rank-frequency plot of an access profile is written as a PNG."""

import torch

from engram.reports.profile_plot import plot_rank_frequency
from engram.storage import zipf_profile


def test_rank_frequency_plot_is_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = torch.arange(1, 2001, dtype=torch.float64) ** -1.0
    ids = torch.multinomial(p / p.sum(), 20000, replacement=True, generator=g)
    path = plot_rank_frequency(zipf_profile(ids), tmp_path / "zipf.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
