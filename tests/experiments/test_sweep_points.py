"""The allocation and memory sweeps build the points they promise."""

import numpy as np
import pytest

from engram.experiments.allocation import allocation_points
from engram.experiments.memory import fit_log_slope, memory_fits, memory_points, table_params
from engram.experiments.presets import cpu_optim, cpu_train, engram_template, moe_backbone
from engram.model import count_params


def test_allocation_points_hold_total_params_and_trade_experts_for_rows():
    base = moe_backbone()
    pts = allocation_points(base, [1.0, 0.8, 0.4], engram_template(), cpu_train(), cpu_optim())
    assert [p.name for p in pts] == ["rho-1.00", "rho-0.80", "rho-0.40"]
    assert pts[0].run.model == base and [p.params["rho"] for p in pts] == [1.0, 0.8, 0.4]
    counts = [count_params(p.run.model) for p in pts]
    for c in counts:
        assert c.total == pytest.approx(counts[0].total, rel=0.01)
    assert counts[0].routed_experts > counts[1].routed_experts > counts[2].routed_experts
    assert 0 == counts[0].engram < counts[1].engram < counts[2].engram


def test_memory_points_give_overencoding_the_engram_table_params():
    pts = memory_points(moe_backbone(), engram_template(), [128, 2048], cpu_train(), cpu_optim())
    assert [p.name for p in pts] == ["moe", "engram-128", "overencoding-128", "engram-2048", "overencoding-2048"]
    by = {p.name: p for p in pts}
    for rows in (128, 2048):
        e, o = by[f"engram-{rows}"], by[f"overencoding-{rows}"]
        assert o.run.model.family == "overencoding" and e.run.model.family == "engram"
        assert table_params(o.run.model) == pytest.approx(table_params(e.run.model), rel=0.005)
        assert e.params["table_params"] == table_params(e.run.model)
        # the backbone is fixed: only the memory is added
        assert o.run.model.replace(family="moe", overencoding=None) == by["moe"].run.model
        assert e.run.model.replace(family="moe", engram=None) == by["moe"].run.model


def test_fit_log_slope_recovers_a_known_power_law():
    params = [1e3, 1e4, 1e5, 1e6]
    a, b = fit_log_slope(params, [3.0 - 0.05 * np.log10(p) for p in params])
    assert a == pytest.approx(3.0) and b == pytest.approx(-0.05)


def test_memory_fits_average_seeds_per_size():
    rows = [
        {"method": "engram", "table_params": p, "val_loss": v}
        for p, v in ((10, 2.0), (10, 2.2), (100, 1.9), (1000, 1.8))
    ]
    f = memory_fits(rows)["engram"]
    assert [s["mean"] for s in f["points"]] == pytest.approx([2.1, 1.9, 1.8])
    assert f["slope_per_decade"] == pytest.approx(-0.15)
