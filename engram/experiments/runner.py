"""Sweep bookkeeping: train a list of points, each in its own folder, resumably and optionally in parallel.

A sweep folder looks like::

    OUT/
      results.json               every finished point's row, plus the sweep name (rewritten after each point)
      results.csv                the same rows as a table
      points/NAME/point.json     the exact RunConfig, sweep coordinates, git revision (+ dirty flag), versions
      points/NAME/result.json    metrics, written once the point has finished -- its presence marks it done
      points/NAME/run/           the trainer's out_dir: metrics.jsonl, config.json, model/ (checkpoints while running)

Resuming: a point with a ``result.json`` whose config equals the requested one is not rerun; a point that was
interrupted resumes from its trainer checkpoint. A folder that already holds a *different* config for a point
name is refused rather than silently mixed.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import csv
import dataclasses
import io
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..files import atomic_write, write_json
from ..model.params import count_params
from ..train.trainer import RunConfig, prepare_data, train

# Columns every results table has, in this order; a sweep's own coordinates (``SweepPoint.params``) follow.
COMMON_COLUMNS = (
    "sweep",
    "name",
    "seed",
    "family",
    "total",
    "activated",
    "engram",
    "table_rows",
    "routed_experts",
    "flops_per_token",
    "tokens",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "tokens_per_s",
    "wall_s",
    "git_revision",
    "git_dirty",
)


@dataclass
class SweepPoint:
    """One training run of a sweep.

    ``name`` is unique in the sweep and names its folder; ``params`` are the sweep's coordinates of this point
    (``{"rho": 0.8}``, ``{"variant": "no-gating"}``), which become columns of the results table.
    """

    name: str
    run: RunConfig
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"point name {self.name!r} must be a plain folder name")


def with_seeds(points: list[SweepPoint], seeds: list[int]) -> list[SweepPoint]:
    """Replicate every point once per seed (data order and initialisation).

    A replica keeps the point's name when the seed is the one its config already has, else it is ``NAME-seedS``,
    so names do not depend on the order of ``seeds`` and later invocations with more seeds add to the same table.
    """
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"need distinct seeds, got {seeds}")
    out = []
    for p in points:
        for s in seeds:
            run = copy.deepcopy(p.run)
            run.train = dataclasses.replace(run.train, seed=int(s))
            name = p.name if int(s) == p.run.train.seed else f"{p.name}-seed{s}"
            out.append(SweepPoint(name, run, dict(p.params)))
    return out


def git_revision(repo: Path | None = None) -> dict[str, Any]:
    """``{"revision": HEAD sha, "dirty": bool}`` of the repository holding this package (None when not in git).

    Dirty means uncommitted changes, untracked files included, under ``engram/``: the code that shapes a result.
    """
    repo = repo or Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "engram"], cwd=repo, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}
    return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _point_run(point: SweepPoint, folder: Path) -> RunConfig:
    run = copy.deepcopy(point.run)
    run.train = dataclasses.replace(run.train, out_dir=str(folder / "run"), progress=False)
    return run


def _check_same(folder: Path, file: str, config: dict) -> dict | None:
    """The JSON record in ``folder/file`` if it exists; refuses one that holds a different config."""
    path = folder / file
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec.get("config") != config:
        raise ValueError(
            f"{path} holds a different config for point {folder.name!r} than this sweep asks for; use another "
            f"--out folder, or delete {folder} to rerun that point"
        )
    return rec


def _run_point(
    sweep: str, name: str, params: dict, config: dict, folder: str, threads: int | None, keep_checkpoints: bool
) -> dict:
    """Train one point (in this process or a worker) and write its ``result.json``; returns the result record."""
    if threads:
        torch.set_num_threads(threads)
    run = RunConfig.from_dict(copy.deepcopy(config))
    t0 = time.perf_counter()
    r = train(run, data=prepare_data(run.train), desc=name)
    if r.interrupted:
        return {"interrupted": True, "name": name}
    c = count_params(r.model.cfg)
    tcfg = run.train
    metrics = {
        "family": r.model.cfg.family,
        "total": c.total,
        "activated": c.activated,
        "engram": c.engram,
        "table_rows": c.engram_table_rows,
        "routed_experts": c.routed_experts,
        "flops_per_token": c.flops_per_token,
        "tokens": r.steps_done * tcfg.batch_size * tcfg.seq_len,
        "val_loss": r.final["val_loss"],
        "val_ppl": r.final["val_ppl"],
        "val_bpb": r.final["val_bpb"],
        "tokens_per_s": r.tokens_per_s,
        "wall_s": time.perf_counter() - t0,
        "gates": r.final.get("gates"),
        "evals": r.evals,
    }
    result = {
        "sweep": sweep,
        "name": name,
        "params": params,
        "config": config,
        "git": git_revision(),
        "metrics": metrics,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(Path(folder) / "result.json", result)
    if not keep_checkpoints:
        shutil.rmtree(Path(folder) / "run" / "checkpoints", ignore_errors=True)
    return result


def result_row(result: dict) -> dict:
    """The flat results-table row of a ``result.json`` record."""
    m = result["metrics"]
    row = {"sweep": result["sweep"], "name": result["name"], "seed": result["config"]["train"]["seed"]}
    row.update({k: m[k] for k in COMMON_COLUMNS if k in m})
    row["git_revision"], row["git_dirty"] = result["git"]["revision"], result["git"]["dirty"]
    row.update(result["params"])
    return row


def write_results(out: Path, sweep: str, rows: list[dict]) -> None:
    """``results.json`` (``{"sweep", "columns", "rows"}``) and ``results.csv`` with the same columns."""
    extra = []
    for r in rows:
        extra += [k for k in r if k not in COMMON_COLUMNS and k not in extra]
    columns = list(COMMON_COLUMNS) + extra
    write_json(out / "results.json", {"sweep": sweep, "columns": columns, "rows": rows})
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=columns, restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write(out / "results.csv", table.getvalue())


def load_results(out: str | Path) -> list[dict]:
    """The rows of a sweep folder's ``results.json``."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json in {out}; run the sweep first")
    return json.loads(path.read_text())["rows"]


def run_sweep(
    sweep: str,
    points: list[SweepPoint],
    out_dir: str | Path,
    *,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    keep_checkpoints: bool = False,
) -> list[dict]:
    """Train every unfinished point; return the rows of every finished point in the folder.

    Rows keep the order of the folder's existing ``results.json``, new points following in ``points`` order, so
    a later invocation with more seeds or variants adds to the same table.

    ``jobs`` > 1 trains that many points at once in separate (spawned) processes, each limited to ``threads``
    torch threads (default: the machine's cores divided by ``jobs``). Rows and files are written as points
    finish, so an interrupted sweep keeps what it has.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise ValueError(f"point names must be unique, got duplicates in {names}")
    out = Path(out_dir)
    (out / "points").mkdir(parents=True, exist_ok=True)
    if threads is None and jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
    git = git_revision()
    done: dict[str, dict] = {}
    todo: list[tuple[SweepPoint, dict, Path]] = []
    for p in points:
        folder = out / "points" / p.name
        config = _point_run(p, folder).to_dict()
        prev = _check_same(folder, "result.json", config)
        if prev is not None:
            done[p.name] = prev
            continue
        _check_same(folder, "point.json", config)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(
            folder / "point.json",
            {
                "sweep": sweep,
                "name": p.name,
                "params": p.params,
                "config": config,
                "git": git,
                "env": {
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "jobs": jobs,
                    "threads": threads or torch.get_num_threads(),
                },
            },
        )
        todo.append((p, config, folder))

    # The folder is the sweep: points finished by earlier invocations (other seeds, other variants) stay in the
    # table, in the order they were first written, followed by this invocation's new points.
    prior = [r["name"] for r in load_results(out)] if (out / "results.json").is_file() else []
    for folder in sorted((out / "points").iterdir()):
        if folder.name not in names and (folder / "result.json").is_file():
            done.setdefault(folder.name, json.loads((folder / "result.json").read_text()))
    order = [n for n in prior if n in done or n in names] + [n for n in names if n not in prior]
    order += sorted(n for n in done if n not in order)

    def flush() -> list[dict]:
        rows = [result_row(done[n]) for n in order if n in done]
        write_results(out, sweep, rows)
        return rows

    flush()
    for tcfg in {json.dumps(dataclasses.asdict(p.run.train), sort_keys=True): p.run.train for p, _, _ in todo}.values():
        prepare_data(dataclasses.replace(tcfg, progress=False))  # build tokenizer/token caches once, not per worker
    bar = tqdm(
        total=len(points),
        initial=sum(n in done for n in names),
        desc=f"sweep {sweep}",
        unit="point",
        disable=not progress,
        dynamic_ncols=True,
    )
    failures: list[str] = []

    def finished(res: dict) -> None:
        if res.get("interrupted"):
            raise KeyboardInterrupt(f"point {res['name']} was interrupted (checkpoint saved); rerun to resume")
        done[res["name"]] = res
        bar.update(1)
        bar.set_postfix(last=f"{res['name']}: {res['metrics']['val_loss']:.4f}")
        flush()

    args = [(sweep, p.name, p.params, config, str(folder), threads, keep_checkpoints) for p, config, folder in todo]
    if jobs == 1:
        for a in args:
            try:
                finished(_run_point(*a))
            except (ValueError, RuntimeError, FloatingPointError) as e:
                failures.append(f"{a[1]}: {e}")
    else:
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_run_point, *a): a[1] for a in args}
            for fut in cf.as_completed(futures):
                try:
                    finished(fut.result())
                except (ValueError, RuntimeError, FloatingPointError) as e:
                    failures.append(f"{futures[fut]}: {e}")
    bar.close()
    rows = flush()
    if failures:
        raise RuntimeError(
            f"{len(failures)} point(s) failed (the others are recorded in {out}): " + "; ".join(failures)
        )
    return rows


def summarize(rows: list[dict], key: str, value: str = "val_loss") -> list[dict]:
    """Rows grouped by ``key`` (seeds pooled), in first-seen order: ``{key, "mean", "std", "n", "min", "max"}``."""
    groups: dict[Any, list[float]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(float(r[value]))
    out = []
    for k, vals in groups.items():
        t = torch.tensor(vals, dtype=torch.float64)
        out.append(
            {
                key: k,
                "mean": float(t.mean()),
                "std": float(t.std()) if len(vals) > 1 else 0.0,
                "n": len(vals),
                "min": float(t.min()),
                "max": float(t.max()),
            }
        )
    return out
