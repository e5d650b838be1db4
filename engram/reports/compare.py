"""Engram against its matched MoE: the same total and activated parameters, the same data, steps and recipe.

:func:`compare` trains a pure-MoE base config and the Engram config :func:`engram.model.allocate` derives from
it at ratio rho (routed experts traded for table rows), then writes a report folder. :func:`demo` is that on the
embedded default corpus at a size that fits 2 CPU cores in about 10 minutes.

The trained runs are never lost to the report: each report step (figures, samples, summary, markdown) runs on
its own; one that fails is left out, the others are written, and :class:`ReportError` then names what failed.
A rerun finds the runs finished in ``out_dir/runs`` and only redoes the report.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import EngramConfig
from ..errors import EngramError
from ..files import atomic_write, write_json
from ..model.config import ModelConfig
from ..model.generate import SamplingConfig, generate
from ..model.params import allocate, count_params
from ..train.data import TextTokenizer
from ..train.optim import OptimConfig
from ..train.trainer import RunConfig, TrainConfig, prepare_data, train
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
            sample_text: str = SAMPLE_TEXT, prompts: list[str] | None = None) -> dict:
    """Train the matched pair and write ``out_dir/report.md`` with its figures; returns the summary dict."""
    optim = optim or OptimConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(train_cfg)
    tok: TextTokenizer = data[0]
    base = base.replace(vocab_size=tok.vocab_size)
    configs = {"moe": base, "engram": allocate(base, rho, engram)}
    runs, rows, models = {}, [], {}
    for name, cfg in configs.items():
        tcfg = dataclasses.replace(train_cfg, out_dir=str(out / "runs" / name))
        r = train(RunConfig(model=cfg, train=tcfg, optim=optim), data=data, desc=name)
        if r.interrupted:
            raise KeyboardInterrupt(f"{name} run interrupted; rerun the same command to resume")
        c = count_params(r.model.cfg)
        runs[name] = {"history": r.history, "evals": r.evals}
        models[name] = r.model
        rows.append({"model": name, "total": c.total, "activated": c.activated, "engram": c.engram,
                     "routed_experts": c.routed_experts, "val_loss": r.final["val_loss"],
                     "val_ppl": r.final["val_ppl"], "val_bpb": r.final["val_bpb"], "tokens_per_s": r.tokens_per_s,
                     "expert_load": r.final.get("expert_load"), "gates": r.final.get("gates")})
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
                           "python": platform.python_version(), "threads": torch.get_num_threads()},
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
    """The README's main job: Engram vs its matched MoE on the Python standard library, in about 10 minutes."""
    tcfg = TrainConfig(out_dir=str(out_dir), steps=steps, batch_size=16, seq_len=128, eval_every=max(steps // 6, 1),
                       eval_batches=20, log_every=10, ckpt_every=max(steps // 3, 1), max_bytes=max_bytes,
                       vocab_size=4096, device=device, progress=progress)
    return compare(demo_base(), rho, tcfg, OptimConfig(lr=2e-3, warmup_steps=min(50, steps // 10)),
                   demo_engram_template(), out_dir)
