"""The ``engram sweep`` commands: a spec -> points -> :func:`run_sweep` -> results table + figure + summary.

Each sweep starts from a default spec (:mod:`.presets`) that a YAML file and ``--set`` overrides modify, trains its
points (resumably, ``jobs`` at a time) and writes ``OUT/results.{csv,json}``, ``OUT/summary.json`` and a PNG.
"""

from __future__ import annotations

from pathlib import Path

from ..files import write_json
from .ablation import ablation_points, plot_ablation
from .allocation import DEFAULT_RHOS, allocation_points, budget, plot_u_curve
from .memory import DEFAULT_ROWS, memory_fits, memory_points, plot_memory
from .presets import engram_template, merge, moe_backbone, parse_spec, spec
from .runner import run_sweep, summarize, with_seeds

SWEEPS = ("allocation", "memory", "ablate")


def default_spec(sweep: str) -> dict:
    """The CPU-scale spec of a sweep (see :mod:`.presets`)."""
    if sweep in ("allocation", "memory"):
        return spec(moe_backbone(), engram_template())
    if sweep == "ablate":
        # mHC with 2 branches so "no multi-branch" means something; 8 routed experts keep the backbone small
        # next to a 0.26M-parameter table (the paper: 1.6B of Engram on a 3B MoE).
        return spec(moe_backbone(hc_mult=2, n_routed_experts=8), engram_template(rows=2000))
    raise ValueError(f"unknown sweep {sweep!r}; choose one of {SWEEPS}")


def run(
    sweep: str,
    out_dir: str | Path,
    *,
    overrides: dict | None = None,
    seeds: list[int] | None = None,
    jobs: int = 1,
    threads: int | None = None,
    figure: str | Path | None = None,
    rhos: list[float] | None = None,
    rows: list[int] | None = None,
    variants: list[str] | None = None,
    dense_ffn_share: float = 0.5,
    progress: bool = True,
) -> dict:
    """Run one sweep; returns its summary (also written to ``OUT/summary.json``)."""
    d = merge(default_spec(sweep), overrides or {})
    model, engram, train, optim = parse_spec(d)
    out = Path(out_dir)
    if sweep == "allocation":
        points = allocation_points(model, list(rhos or DEFAULT_RHOS), engram, train, optim)
    elif sweep == "memory":
        points = memory_points(model, engram, list(rows or DEFAULT_ROWS), train, optim)
    else:
        points = ablation_points(model, engram, train, optim, dense_ffn_share, variants)
    points = with_seeds(points, seeds or [train.seed])
    results = run_sweep(sweep, points, out, jobs=jobs, threads=threads, progress=progress)
    fig = Path(figure) if figure else out / f"{sweep}.png"
    fig.parent.mkdir(parents=True, exist_ok=True)
    summary: dict = {"sweep": sweep, "spec": d, "points": len(results), "figure": str(fig)}
    if sweep == "allocation":
        plot_u_curve(results, fig)
        summary["budget"] = budget(model, train)
        summary["by_rho"] = summarize(results, "rho")
    elif sweep == "memory":
        plot_memory(results, fig)
        summary["fits"] = memory_fits(results)
    else:
        plot_ablation(results, fig)
        summary["by_variant"] = summarize(results, "variant")
    write_json(out / "summary.json", summary)
    return summary
