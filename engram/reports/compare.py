"""Engram against its matched MoE: the same total and activated parameters, the same data, steps and recipe.

:func:`compare` trains a pure-MoE base config and the Engram config :func:`engram.model.allocate` derives from
it at ratio rho (routed experts traded for table rows), then writes a report folder. :func:`demo` is that on the
embedded default corpus at a size meant for 2 CPU cores in about 5 minutes (estimated; see the README).

The trained runs are never lost to the report: each report step (figures, samples, summary, markdown) runs on
its own; one that fails is left out, the others are written, and :class:`ReportError` then names what failed.
A rerun finds the runs finished in ``out_dir/runs`` and only redoes the report.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import multiprocessing
import platform
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..config import EngramConfig
from ..errors import EngramError
from ..files import atomic_write, write_json
from ..model.config import ModelConfig
from ..model.generate import SamplingConfig, generate
from ..model.io import load_model
from ..model.params import allocate, count_params
from ..train.data import TextTokenizer
from ..train.optim import OptimConfig
from ..train.trainer import RunConfig, TrainConfig, pick_device, prepare_data, train
from .figures import comparison_table, plot_gate_heatmap, plot_loss_curves

logger = logging.getLogger(__name__)

# A code snippet full of fixed multi-token idioms: the analogue of the paper's "Alexander the Great".
SAMPLE_TEXT = '''import os
from collections import OrderedDict


class Cache(object):
    def __init__(self, maxsize=128):
        self.maxsize = maxsize
        self._data = OrderedDict()

    def get(self, key, default=None):
        if key not in self._data:
            raise KeyError(key)
        return self._data[key]

    def __repr__(self):
        return "%s(%r)" % (self.__class__.__name__, self.maxsize)
'''

PROMPTS = ["def __init__(self", "import os\nimport sys\n\n\ndef main(", "    raise ValueError("]


class ReportError(EngramError, RuntimeError):
    """Report steps failed after training; the runs and the other report parts are written. ``summary`` is what
    was written to ``summary.json``; ``failures`` maps each failed step to its error."""

    def __init__(self, message: str, summary: dict, failures: dict[str, str]):
        super().__init__(message)
        self.summary = summary
        self.failures = failures


def demo_base() -> ModelConfig:
    """The demo's pure-MoE baseline: 4 blocks of width 128, 1 dense + 3 MoE (1 shared + 16 routed, top-2)."""
    return ModelConfig(family="moe", vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, max_seq_len=128,
                       intermediate_size=384, moe_intermediate_size=128, n_shared_experts=1, n_routed_experts=16,
                       num_experts_per_tok=2, first_k_dense=1, hc_mult=1)


def demo_engram_template() -> EngramConfig:
    """Engram's shape in the demo: 2/3-grams, 4 heads x 8 dims per order (d_mem 64 = d/2, as in the paper's
    27B model), one module at block 1 (the paper's best single placement, "layer 2")."""
    return EngramConfig(engram_vocab_size=[1000, 1000], max_ngram_size=3, n_embed_per_ngram=32, n_head_per_ngram=4,
                        layer_ids=[1], pad_id=1)


def compare(base: ModelConfig, rho: float, train_cfg: TrainConfig, optim: OptimConfig | None = None,
            engram: EngramConfig | None = None, out_dir: str | Path = "reports/compare",
            sample_text: str = SAMPLE_TEXT, prompts: list[str] | None = None, jobs: int | None = None) -> dict:
    """Train the matched pair and write ``out_dir/report.md`` with its figures; returns the summary dict.

    ``jobs`` = 2 trains the two models at once in two processes, each with half of this process's torch threads;
    1 trains them one after the other here; None picks 2 on a CPU with at least 2 threads (see
    :func:`parallel_jobs`). Every run's result depends only on its own seed, data and thread count.
    """
    optim = optim or OptimConfig()
    keep_freed_memory()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(train_cfg)
    tok: TextTokenizer = data[0]
    base = base.replace(vocab_size=tok.vocab_size)
    configs = {"moe": base, "engram": allocate(base, rho, engram)}
    run_cfgs = {name: RunConfig(model=cfg, train=dataclasses.replace(train_cfg, out_dir=str(out / "runs" / name)),
                                optim=optim) for name, cfg in configs.items()}
    jobs = parallel_jobs(train_cfg) if jobs is None else jobs
    results = train_runs(run_cfgs, data, jobs)
    runs, rows, models = {}, [], {}
    for name, r in results.items():
        if r["interrupted"]:
            raise KeyboardInterrupt(f"{name} run interrupted; rerun the same command to resume")
        model = r["model"]
        c = count_params(model.cfg)
        runs[name] = {"history": r["history"], "evals": r["evals"]}
        models[name] = model
        final = r["final"]
        rows.append({"model": name, "total": c.total, "activated": c.activated, "engram": c.engram,
                     "routed_experts": c.routed_experts, "val_loss": final["val_loss"],
                     "val_ppl": final["val_ppl"], "val_bpb": final["val_bpb"], "tokens_per_s": r["tokens_per_s"],
                     "expert_load": final.get("expert_load"), "gates": final.get("gates")})
    failures: dict[str, str] = {}

    def attempt(step: str, target: Path | None, fn: Callable[[], Any]) -> Any:
        if target is not None:
            target.unlink(missing_ok=True)   # a failed step must not leave an older run's file behind
        try:
            return fn()
        except Exception as e:  # a report step must not lose the trained runs: record it, carry on
            logger.warning("report step %r failed: %s: %s", step, type(e).__name__, e)
            failures[step] = f"{type(e).__name__}: {e}"
            return None

    attempt("loss curves", out / "loss_curves.png", lambda: plot_loss_curves(runs, out / "loss_curves.png"))
    attempt("gate heatmap", out / "gate_heatmap.png",
            lambda: plot_gate_heatmap(models["engram"], tok, sample_text, out / "gate_heatmap.png"))
    samples = attempt("greedy samples", None, lambda: _samples(models, tok, prompts or PROMPTS)) or {}
    delta = rows[1]["val_loss"] - rows[0]["val_loss"]
    summary = {"rho": rho, "rows": rows, "delta_val_loss": delta, "samples": samples,
               "train": dataclasses.asdict(train_cfg), "optim": optim.to_dict(),
               "configs": {k: v.to_dict() for k, v in configs.items()},
               "machine": {"device": str(next(models["moe"].parameters()).device), "torch": torch.__version__,
                           "python": platform.python_version(), "training_jobs": jobs,
                           "threads_per_job": results["moe"]["threads"]},
               "report_failures": failures}
    write_json(out / "summary.json", summary)
    attempt("report.md", out / "report.md", lambda: atomic_write(out / "report.md", _markdown(summary, train_cfg)))
    if failures:
        raise ReportError(f"the runs in {out / 'runs'} trained and the report in {out} is written without: "
                          + "; ".join(f"{k} ({v})" for k, v in failures.items())
                          + ". Fix the cause and rerun the same command: the finished runs are reused",
                          summary, failures)
    return summary


def _samples(models: dict, tok: TextTokenizer, prompts: list[str], max_new_tokens: int = 48) -> dict[str, list[str]]:
    """Greedy continuations of each prompt. A model's context bounds prompt and continuation together: prompts are
    cut to their last ``max_seq_len // 2`` tokens and the continuation to the room left."""
    samples = {}
    for name, model in models.items():
        window = model.cfg.max_seq_len
        ids = [p[-(window // 2):] for p in tok.encode(prompts)]
        room = min(max_new_tokens, window - max(len(p) for p in ids))
        outs = generate(model, ids, SamplingConfig(max_new_tokens=room, temperature=0.0, eos_id=tok.eos_id),
                        pad_id=tok.pad_id)
        samples[name] = [p + tok.decode(o) for p, o in zip(prompts, outs)]
    return samples


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    By default a block over 32 MiB (the demo's logits and their gradient are exactly 16 x 128 x 4096 floats) is
    mmap'ed and unmapped again every step, so every step faults its pages back in and the kernel zeroes them:
    measured here, 4x fewer page faults and 13-25% less CPU time per demo train step (1 thread) with large
    thresholds. Numbers are unchanged. Does nothing where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return


def parallel_jobs(train_cfg: TrainConfig) -> int:
    """2 on a CPU with >= 2 torch threads, else 1. The demo's models are small: two threads on one of them
    speed its step up far less than 2x (measured 1.6x on 2 cores), while two single-threaded runs side by side
    each keep a core busy. On an accelerator the runs stay in this process, one after the other."""
    return 2 if pick_device(train_cfg.device).type == "cpu" and torch.get_num_threads() >= 2 else 1


def train_runs(run_cfgs: dict[str, RunConfig], data, jobs: int) -> dict[str, dict]:
    """Train every run on the same prepared ``data``: ``jobs`` > 1 in that many spawned processes, else here.
    Returns per run ``{"model", "history", "evals", "final", "tokens_per_s", "interrupted", "threads"}``."""
    return _train_parallel(run_cfgs, data, jobs) if jobs > 1 else _train_here(run_cfgs, data)


def _train_here(run_cfgs: dict[str, RunConfig], data) -> dict[str, dict]:
    out = {}
    for name, run in run_cfgs.items():
        r = train(run, data=data, desc=name)
        out[name] = {"model": r.model, "history": r.history, "evals": r.evals, "final": r.final,
                     "tokens_per_s": r.tokens_per_s, "interrupted": r.interrupted, "threads": torch.get_num_threads()}
    return out


def _train_job(run: RunConfig, data, threads: int) -> dict:
    """One training in a worker process; the model is written to its run folder, not sent back."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    r = train(run, data=data)
    return {"history": r.history, "evals": r.evals, "final": r.final, "tokens_per_s": r.tokens_per_s,
            "interrupted": r.interrupted, "threads": threads}


def _train_parallel(run_cfgs: dict[str, RunConfig], data, jobs: int) -> dict[str, dict]:
    """The runs in ``jobs`` spawned processes sharing this process's threads; their progress bars here follow
    the runs' metrics.jsonl. The trained models are loaded back from their run folders."""
    threads = max(1, torch.get_num_threads() // jobs)
    progress = next(iter(run_cfgs.values())).train.progress
    quiet = {name: dataclasses.replace(run, train=dataclasses.replace(run.train, progress=False))
             for name, run in run_cfgs.items()}
    bars = {name: tqdm(total=run.train.steps, desc=name, position=i, unit="step", disable=not progress,
                       dynamic_ncols=True) for i, (name, run) in enumerate(run_cfgs.items())}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_train_job, run, data, threads) for name, run in quiet.items()}
        while not all(f.done() for f in futures.values()):
            for name, run in run_cfgs.items():
                _follow(bars[name], Path(run.train.out_dir) / "metrics.jsonl")
            wait(list(futures.values()), timeout=1.0, return_when=FIRST_EXCEPTION)
        results = {name: f.result() for name, f in futures.items()}
    for name, run in run_cfgs.items():
        _follow(bars[name], Path(run.train.out_dir) / "metrics.jsonl")
        bars[name].close()
        if not results[name]["interrupted"]:
            results[name]["model"] = load_model(Path(run.train.out_dir) / "model")
    return results


def _follow(bar: tqdm, metrics: Path) -> None:
    """Move a progress bar to the last training record of a run's metrics file."""
    if bar.disable or not metrics.is_file():
        return
    lines = [line for line in metrics.read_text().splitlines() if '"kind": "train"' in line]
    if lines:
        rec = json.loads(lines[-1])
        bar.update(rec["step"] - bar.n)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:,.0f}")


def _rel(rows: list[dict], key: str) -> str:
    return f"{100 * (rows[1][key] / rows[0][key] - 1):+.1f}%"


def _markdown(s: dict, tcfg: TrainConfig) -> str:
    rows = s["rows"]
    verdict = ("Engram beats its matched MoE" if s["delta_val_loss"] < 0 else
               "Engram does NOT beat its matched MoE in this run")
    lines = [
        "# Engram vs matched MoE", "",
        f"Engram keeps rho = {s['rho']:.2f} of the MoE's sparse budget in routed experts and turns the rest into "
        f"table rows; same data, steps ({tcfg.steps} x {tcfg.batch_size} x {tcfg.seq_len} tokens) and recipe. "
        f"Parameters (without embeddings and LM head) differ by {_rel(rows, 'total')} in total and "
        f"{_rel(rows, 'activated')} activated per token (Engram's own projections and the rows it reads).", "",
        comparison_table(rows), "",
        f"**{verdict}**: validation loss difference (engram - moe) = {s['delta_val_loss']:+.4f} nats/token.", "",
        *([] if "loss curves" in s["report_failures"] else ["![loss curves](loss_curves.png)", ""]),
        "## Which tokens open the memory gate", "",
        *([] if "gate heatmap" in s["report_failures"] else ["![gate heatmap](gate_heatmap.png)", ""]),
        "Gate statistics at the last evaluation (mean alpha per branch, share of tokens with alpha > 0.5):", "",
    ]
    for layer, g in (rows[1].get("gates") or {}).items():
        mean = ", ".join(f"{v:.3f}" for v in g["mean"])
        frac = ", ".join(f"{v:.2f}" for v in g["open_frac"])
        lines.append(f"- block {layer}: mean [{mean}], open [{frac}]")
    lines += ["", "Expert load at the last evaluation (max/mean, 1 = perfectly balanced):", ""]
    for r in rows:
        loads = ", ".join(f"{k}: {v['max_over_mean']:.2f}" for k, v in (r.get("expert_load") or {}).items())
        lines.append(f"- {r['model']}: {loads}")
    lines += ["", "## Greedy samples", ""]
    for name, texts in s["samples"].items():
        lines.append(f"### {name}")
        for t in texts:
            lines += ["```python", t, "```"]
    if s["report_failures"]:
        lines += ["", "## Report steps that failed", ""]
        lines += [f"- {step}: {error}" for step, error in s["report_failures"].items()]
    lines += ["", f"Machine: {s['machine']}", ""]
    return "\n".join(lines)


def demo(out_dir: str | Path = "reports/demo", steps: int = 600, rho: float = 0.75, device: str = "auto",
         max_bytes: int = 4_000_000, progress: bool = True) -> dict:
    """The README's main job: Engram vs its matched MoE on the Python standard library (about 5 minutes on 2 idle
    CPU cores, estimated from per-step measurements; the two trainings run side by side there)."""
    tcfg = TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=16, seq_len=128, eval_every=max(steps // 6, 1),
                       eval_batches=20, log_every=10, ckpt_every=max(steps // 3, 1), max_bytes=max_bytes,
                       vocab_size=4096, device=device, progress=progress)
    return compare(demo_base(), rho, tcfg, OptimConfig(lr=2e-3, warmup_steps=min(50, steps // 10)),
                   demo_engram_template(), out_dir)
