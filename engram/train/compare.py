"""Engram against its matched MoE: the same total and activated parameters, the same data, steps and recipe.

:func:`compare` trains a pure-MoE base config and the Engram config :func:`engram.model.allocate` derives from
it at ratio rho (routed experts traded for table rows), then writes a report folder. :func:`demo` is that on the
embedded default corpus at a size that fits 2 CPU cores in about 10 minutes.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path

import torch

from ..config import EngramConfig
from ..model.config import ModelConfig
from ..model.generate import SamplingConfig, generate
from ..model.params import allocate, count_params
from .data import TextTokenizer
from .optim import OptimConfig
from .report import comparison_table, plot_gate_heatmap, plot_loss_curves
from .trainer import RunConfig, TrainConfig, prepare_data, train

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
    plot_loss_curves(runs, out / "loss_curves.png")
    plot_gate_heatmap(models["engram"], tok, sample_text, out / "gate_heatmap.png")
    samples = {}
    for name, model in models.items():
        outs = generate(model, tok.encode(prompts or PROMPTS),
                        SamplingConfig(max_new_tokens=48, temperature=0.0, eos_id=tok.eos_id), pad_id=tok.pad_id)
        samples[name] = [p + tok.decode(o) for p, o in zip(prompts or PROMPTS, outs)]
    delta = rows[1]["val_loss"] - rows[0]["val_loss"]
    summary = {"rho": rho, "rows": rows, "delta_val_loss": delta, "samples": samples,
               "train": dataclasses.asdict(train_cfg), "optim": optim.to_dict(),
               "configs": {k: v.to_dict() for k, v in configs.items()},
               "machine": {"device": str(next(models["moe"].parameters()).device), "torch": torch.__version__,
                           "python": platform.python_version(), "threads": torch.get_num_threads()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "report.md").write_text(_markdown(summary, train_cfg))
    return summary


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
        "![loss curves](loss_curves.png)", "",
        "## Which tokens open the memory gate", "",
        "![gate heatmap](gate_heatmap.png)", "",
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
