"""The long-context figure draws several models, with empty cells (a task that does not fit a length) left out."""

import pytest

from engram.reports.long_context_plot import plot_long_context


def result(acc_256, acc_512):
    return {
        "settings": {"lengths": [256, 512], "samples": 4, "tail_fraction": 0.25},
        "accuracy": {"niah_single": {"256": acc_256, "512": acc_512}, "niah_multivalue": {"256": None, "512": 0.5}},
        "tail_loss": {"256": {"loss": 2.0}, "512": {"loss": None}},
    }


def test_two_models_with_empty_cells_make_a_png(tmp_path):
    path = plot_long_context({"engram": result(1.0, 0.75), "moe": result(0.5, 0.25)}, tmp_path / "lc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_results_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one result"):
        plot_long_context({}, tmp_path / "lc.png")
