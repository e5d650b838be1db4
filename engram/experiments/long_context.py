"""The paper's long-context comparison (section 4.4, its RULER table) at a scale we can run.

Pipeline, one preset (:data:`PRESETS`) fixing every size:

1. **Data.** The corpus (default: the Python standard library) with RULER-style task documents mixed into its
   training split (:func:`engram.train.long_context.training_documents`: prompt + answer, the haystack from the
   training split), ``task_share`` of the training tokens. Validation is the corpus's validation split alone, so
   "validation loss" is language-model loss on real text for both models.
2. **Pre-training.** A pure MoE and the Engram model :func:`engram.model.allocate` derives from it at ``rho`` (the
   demo's allocation: routed experts traded for table rows, total and activated parameters matched), the same
   data, steps and recipe, at context ``seq_len``; checkpoints kept at every evaluation.
3. **Extension.** Each model continues at ``extend_seq_len`` with YaRN (:mod:`engram.train.extend`; s = ``factor``,
   alpha = 1, beta = 32, f = 0.707 as in the paper) on task documents up to the new length, for ``extend_steps``
   steps at about the pre-training tokens per step (the paper: 5,000 steps after 50,000).
4. **Readings** (the paper's two): *equal steps* -- both models extended from their final pre-training step;
   *equal loss* -- the Engram model extended from its first pre-training checkpoint whose validation loss is at or
   below the MoE's final one (the paper's Engram-27B at 46k vs MoE-27B at 50k). When Engram never reaches it, the
   reading is reported as not available.
5. **Evaluation.** Accuracy per task and length (exact match, greedy, :func:`evaluate_long_context`), tail loss,
   and the short-context validation loss before and after the extension (what the extension costs at ``seq_len``).

``OUT/summary.json`` holds every number, ``OUT/report.md`` the tables, ``OUT/accuracy_equal_steps.png`` /
``OUT/accuracy_equal_loss.png`` the figures; per-sample predictions are in ``OUT/eval/*.json``. Training runs live in
``OUT/runs`` and resume when the command is rerun; finished evaluations are not redone.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EngramConfig
from ..errors import ConfigError
from ..files import atomic_write, write_json
from ..model.config import ModelConfig
from ..model.params import allocate, count_params
from ..train.data import Corpus, TextTokenizer, TokenizedCorpus, build_token_files, load_corpus, load_tokenizer
from ..train.evaluate import evaluate
from ..train.extend import extension_run
from ..train.long_context import TASKS, EngramRunner, evaluate_long_context, training_documents
from ..train.optim import OptimConfig
from ..train.trainer import RunConfig, TrainConfig, pick_device


@dataclass
class LongContextPreset:
    """Every size of one comparison. Lengths are in tokens of the preset's own BPE tokenizer."""

    name: str
    base: ModelConfig  # the pure MoE; max_seq_len is replaced by seq_len
    engram: EngramConfig  # Engram's shape; its table rows come from allocate(base, rho, engram)
    rho: float
    seq_len: int  # pre-training context L
    batch_size: int
    steps: int
    evals: int  # evaluations (and kept checkpoints) during pre-training: the equal-loss granularity
    extend_seq_len: int  # the extended context L'
    factor: float  # YaRN s
    extend_batch_size: int
    extend_steps: int
    task_share: float  # share of the training tokens that are task documents
    train_lengths: tuple[int, ...]  # task document lengths in pre-training
    extend_lengths: tuple[int, ...]  # task document lengths in the extension
    eval_lengths: tuple[int, ...]
    tasks: tuple[str, ...] = TASKS
    samples: int = 20  # evaluation samples per task and length
    lr: float = 2e-3
    extend_lr: float = 1e-3
    max_bytes: int = 2_000_000
    vocab_size: int = 2048
    eval_batches: int = 20
    data: str | None = None  # the corpus (None = the Python standard library)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.extend_seq_len <= self.seq_len:
            raise ConfigError(f"extend_seq_len {self.extend_seq_len} must exceed seq_len {self.seq_len}")
        if not 0 < self.task_share < 1:
            raise ConfigError(f"task_share must be in (0, 1), got {self.task_share}")
        if max(self.train_lengths) > self.seq_len or max(self.extend_lengths) > self.extend_seq_len:
            raise ConfigError("task document lengths must fit the context of their stage")
        if max(self.eval_lengths) > self.extend_seq_len:
            raise ConfigError(f"eval lengths {self.eval_lengths} must fit the extended context {self.extend_seq_len}")


def _base(width: int, layers: int, experts: int, expert_width: int, heads: int = 4) -> ModelConfig:
    return ModelConfig(
        family="moe",
        vocab_size=2048,
        hidden_size=width,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=3 * width,
        moe_intermediate_size=expert_width,
        n_shared_experts=1,
        n_routed_experts=experts,
        num_experts_per_tok=2,
        first_k_dense=1,
    )


def _engram(rows: int, width_per_order: int, layer_ids: list[int]) -> EngramConfig:
    return EngramConfig(
        engram_vocab_size=[rows, rows],
        max_ngram_size=3,
        n_embed_per_ngram=width_per_order,
        n_head_per_ngram=4,
        layer_ids=layer_ids,
        pad_id=1,
    )


PRESETS = {
    # the test suite's smoke run: seconds, accuracy ~0 by construction
    "tiny": LongContextPreset(
        name="tiny",
        base=_base(32, 2, 8, 32, heads=2),
        engram=_engram(200, 16, [1]),
        rho=0.75,
        seq_len=256,
        batch_size=4,
        steps=8,
        evals=2,
        extend_seq_len=512,
        factor=2.5,
        extend_batch_size=2,
        extend_steps=4,
        task_share=0.5,
        train_lengths=(256,),
        extend_lengths=(512,),
        eval_lengths=(256, 512),
        tasks=("niah_single", "vt"),
        samples=2,
        max_bytes=1_200_000,
        eval_batches=2,
    ),
    # the demo's MoE (width 128, 4 blocks, 16 routed experts) and Engram shape: 34 minutes measured on 2 cores
    # shared with other jobs (load 8-13, about 850 training tokens/s per process, --jobs 2)
    "cpu": LongContextPreset(
        name="cpu",
        base=_base(128, 4, 16, 128),
        engram=_engram(1000, 32, [1]),
        rho=0.75,
        seq_len=256,
        batch_size=8,
        steps=500,
        evals=5,
        extend_seq_len=1024,
        factor=5.0,
        extend_batch_size=2,
        extend_steps=50,
        task_share=0.6,
        train_lengths=(256,),
        extend_lengths=(256, 512, 1024),
        eval_lengths=(256, 512, 1024),
        samples=10,
        eval_batches=10,
    ),
    # the easiest setting in which small models may retrieve at all: one needle, short contexts, 75% task tokens,
    # a width-64 backbone (twice the steps of "cpu" in the same time)
    "cpu-niah": LongContextPreset(
        name="cpu-niah",
        base=_base(64, 4, 16, 64),
        engram=_engram(1000, 16, [1]),
        rho=0.75,
        seq_len=128,
        batch_size=8,
        steps=1000,
        evals=10,
        extend_seq_len=512,
        factor=5.0,
        extend_batch_size=2,
        extend_steps=60,
        task_share=0.75,
        train_lengths=(96, 128),
        extend_lengths=(128, 256, 512),
        eval_lengths=(128, 256, 512),
        tasks=("niah_single",),
        samples=20,
        eval_batches=10,
    ),
    # one GPU: a 12-block width-512 MoE at 1024 tokens, extended 8x with the paper's s = 10
    "gpu": LongContextPreset(
        name="gpu",
        base=_base(512, 12, 32, 256, heads=8),
        engram=_engram(40_000, 128, [1, 5]),
        rho=0.75,
        seq_len=1024,
        batch_size=32,
        steps=20_000,
        evals=20,
        extend_seq_len=8192,
        factor=10.0,
        extend_batch_size=4,
        extend_steps=2000,
        task_share=0.3,
        train_lengths=(256, 512, 1024),
        extend_lengths=(1024, 2048, 4096, 8192),
        eval_lengths=(512, 1024, 2048, 4096, 8192),
        samples=50,
        lr=1e-3,
        extend_lr=3e-4,
        max_bytes=200_000_000,
        vocab_size=16384,
    ),
}


# ---------------------------------------------------------------------------------------------------- data
def _with_tasks(
    corpus: Corpus, tok: TextTokenizer, lengths: tuple[int, ...], tasks: tuple[str, ...], n: int, seed: int
) -> Corpus:
    docs = list(training_documents(tok, corpus, list(lengths), n, tasks=list(tasks), seed=seed))
    names = [f"task:{i}" for i in range(len(docs))]
    return Corpus(
        name=f"{corpus.name}+tasks",
        train=corpus.train + docs,
        val=corpus.val,
        train_names=corpus.train_names + names,
        val_names=corpus.val_names,
    )


def _token_files(corpus: Corpus, tok: TextTokenizer, folder: Path) -> TokenizedCorpus:
    return build_token_files(corpus, tok, folder / f"{corpus.fingerprint('train')[:12]}-{tok.fingerprint[:8]}")


def task_documents_needed(corpus_tokens: int, share: float, lengths: tuple[int, ...]) -> int:
    """How many task documents make ``share`` of the training tokens, next to ``corpus_tokens`` of real text."""
    return max(1, math.ceil(share / (1 - share) * corpus_tokens / (sum(lengths) / len(lengths))))


# ---------------------------------------------------------------------------------------------------- runs
def _pretrain_runs(p: LongContextPreset, vocab_size: int, out: Path, device: str) -> dict[str, RunConfig]:
    base = p.base.replace(vocab_size=vocab_size, max_seq_len=p.seq_len)
    configs = {"moe": base, "engram": allocate(base, p.rho, p.engram)}
    every = max(1, p.steps // p.evals)
    train = TrainConfig(
        steps=p.steps,
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        eval_every=every,
        eval_batches=p.eval_batches,
        log_every=max(1, every // 5),
        ckpt_every=every,
        keep_last=p.evals + 1,  # every evaluated step stays: the equal-loss reading extends one of them
        seed=p.seed,
        device=device,
        data=p.data,
        max_bytes=p.max_bytes,
        val_fraction=0.1,
        vocab_size=p.vocab_size,
        progress=False,
    )
    optim = OptimConfig(lr=p.lr, warmup_steps=max(1, p.steps // 20))
    return {
        name: RunConfig(
            model=cfg, train=dataclasses.replace(train, out_dir=str(out / "runs" / f"{name}-pretrain")), optim=optim
        )
        for name, cfg in configs.items()
    }


def equal_loss_step(moe_final: float, engram_evals: list[dict]) -> int | None:
    """The first pre-training step whose Engram validation loss is at or below the MoE's final one (None: never)."""
    for e in engram_evals:
        if e["val_loss"] <= moe_final:
            return int(e["step"])
    return None


def _extension(p: LongContextPreset, pre: RunConfig, out_dir: Path, init_from: str) -> RunConfig:
    ext = extension_run(
        pre,
        seq_len=p.extend_seq_len,
        steps=p.extend_steps,
        out_dir=str(out_dir),
        factor=p.factor,
        optim=OptimConfig(lr=p.extend_lr, warmup_steps=max(1, p.extend_steps // 10)),
        init_from=init_from,
    )
    every = max(1, p.extend_steps // 2)
    ext.train = dataclasses.replace(
        ext.train,
        batch_size=p.extend_batch_size,
        eval_every=every,
        ckpt_every=every,
        keep_last=1,
        log_every=max(1, every // 5),
    )
    return ext


def _train_all(runs: dict[str, RunConfig], data, jobs: int) -> dict[str, dict]:
    """:func:`engram.reports.compare.train_runs`, imported here: that module loads matplotlib."""
    from ..reports.compare import train_runs

    return train_runs(runs, data, jobs)


# ---------------------------------------------------------------------------------------------------- evaluation
def short_context_loss(model, tokens: TokenizedCorpus, p: LongContextPreset, device: torch.device) -> float:
    """Validation loss at the pre-training context, with the pre-training evaluation's settings (so the value
    before the extension is the pre-training run's own last evaluation)."""
    amp = torch.bfloat16 if device.type == "cuda" else None
    r = evaluate(
        model.to(device),
        tokens.val,
        batch_size=p.batch_size,
        seq_len=p.seq_len,
        max_batches=p.eval_batches,
        device=device,
        autocast_dtype=amp,
    )
    return r["loss"]


def _long_context(model, tok, corpus, p: LongContextPreset, lengths, device, path: Path) -> dict:
    """The evaluation of one model, kept in ``path``; a rerun with the same settings reads it back."""
    key = {"tasks": list(p.tasks), "lengths": list(lengths), "samples": p.samples, "seed": p.seed}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["result"]
    r = evaluate_long_context(
        EngramRunner(model.to(device).eval(), tok),
        tok,
        corpus,
        tasks=list(p.tasks),
        lengths=list(lengths),
        samples=p.samples,
        seed=p.seed,
        progress=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "result": r})
    return r


def mean_accuracy(result: dict, lengths) -> float:
    """Accuracy averaged over the tasks and the given lengths."""
    cells = [result["accuracy"][t][str(L)] for t in result["accuracy"] for L in lengths]
    return sum(cells) / len(cells)


def run_comparison(
    preset: str | LongContextPreset, out_dir: str | Path, *, device: str = "auto", jobs: int | None = None
) -> dict:
    """Run the whole comparison (module docstring); returns the summary written to ``OUT/summary.json``.

    ``jobs`` = 2 trains two runs at once in spawned processes (default on a CPU with 2+ threads), 1 one after the
    other (the default on a GPU).
    """
    if isinstance(preset, str) and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    jobs = jobs if jobs is not None else (2 if dev.type == "cpu" and torch.get_num_threads() >= 2 else 1)
    clock = {"start": time.perf_counter()}

    def lap(name: str) -> None:
        clock[name] = time.perf_counter() - clock["start"] - sum(v for k, v in clock.items() if k != "start")

    corpus = load_corpus(p.data, max_bytes=p.max_bytes, val_fraction=0.1)
    tok = load_tokenizer("bpe", corpus.train, vocab_size=p.vocab_size, cache_dir=out / "tokenizers")
    real = _token_files(corpus, tok, out / "tokens")
    n_pre = task_documents_needed(len(real.train.tokens), p.task_share, p.train_lengths)
    n_ext = task_documents_needed(len(real.train.tokens), p.task_share, p.extend_lengths)
    pre_corpus = _with_tasks(corpus, tok, p.train_lengths, p.tasks, n_pre, p.seed)
    ext_corpus = _with_tasks(corpus, tok, p.extend_lengths, p.tasks, n_ext, p.seed + 1)
    pre_data = (tok, _token_files(pre_corpus, tok, out / "tokens"))
    ext_data = (tok, _token_files(ext_corpus, tok, out / "tokens"))
    lap("data_s")

    pre_runs = _pretrain_runs(p, tok.vocab_size, out, device)
    pre = _finished(_train_all(pre_runs, pre_data, jobs), "pre-training")
    lap("pretrain_s")
    moe_final = pre["moe"]["final"]["val_loss"]
    k = equal_loss_step(moe_final, pre["engram"]["evals"])
    ext_runs = {
        name: _extension(p, run, out / "runs" / f"{name}-extended", str(Path(run.train.out_dir) / "model"))
        for name, run in pre_runs.items()
    }
    if k is not None and k < p.steps:
        step_dir = Path(pre_runs["engram"].train.out_dir) / "checkpoints" / f"step_{k:08d}"
        ext_runs["engram-equal-loss"] = _extension(
            p, pre_runs["engram"], out / "runs" / "engram-equal-loss-extended", str(step_dir)
        )
    ext = _finished(_train_all(ext_runs, ext_data, jobs), "extension")
    lap("extend_s")

    start_loss = {"moe": moe_final, "engram": pre["engram"]["final"]["val_loss"]}
    if "engram-equal-loss" in ext_runs:
        start_loss["engram-equal-loss"] = next(e["val_loss"] for e in pre["engram"]["evals"] if e["step"] == k)
    models = {}
    for name in ext_runs:
        after = short_context_loss(ext[name]["model"], real, p, dev)
        models[name] = {
            "pretrain_step": k if name == "engram-equal-loss" else p.steps,
            "pretrain_val_loss": start_loss[name],
            "short_loss_after_extension": after,
            "short_loss_change": after - start_loss[name],
            "extension_val_loss": ext[name]["final"]["val_loss"],
        }
    params = {name: count_params(r["model"].cfg).as_dict() for name, r in pre.items()}
    evals = {}
    short_lengths = [L for L in p.eval_lengths if L <= p.seq_len]
    for name in pre_runs:
        evals[f"{name}-pretrained"] = _long_context(
            pre[name]["model"], tok, corpus, p, short_lengths, dev, out / "eval" / f"{name}-pretrained.json"
        )
    for name in ext_runs:
        evals[name] = _long_context(
            ext[name]["model"], tok, corpus, p, p.eval_lengths, dev, out / "eval" / f"{name}.json"
        )
    lap("eval_s")

    readings = {"equal_steps": {"MoE": "moe", "Engram": "engram"}}
    if k == p.steps:
        readings["equal_loss"] = {"MoE": "moe", f"Engram (step {k})": "engram"}
    elif k is not None:
        readings["equal_loss"] = {"MoE": "moe", f"Engram (step {k})": "engram-equal-loss"}
    summary = {
        "preset": dataclasses.asdict(p) | {"base": p.base.to_dict(), "engram": p.engram.to_dict()},
        "device": str(dev),
        "jobs": jobs,
        "threads": torch.get_num_threads(),
        "task_documents": {"pretrain": n_pre, "extension": n_ext},
        "tokens": {
            "corpus_train": len(real.train.tokens),
            "pretrain_train": len(pre_data[1].train.tokens),
            "extension_train": len(ext_data[1].train.tokens),
            "per_pretrain_step": p.batch_size * p.seq_len,
            "per_extension_step": p.extend_batch_size * p.extend_seq_len,
        },
        "params": params,
        "moe_final_val_loss": moe_final,
        "engram_evals": [{"step": e["step"], "val_loss": e["val_loss"]} for e in pre["engram"]["evals"]],
        "moe_evals": [{"step": e["step"], "val_loss": e["val_loss"]} for e in pre["moe"]["evals"]],
        "equal_loss_step": k,
        "models": models,
        "readings": readings,
        "long_context": {name: _slim(r) for name, r in evals.items()},
        "wall_s": {name: round(v, 1) for name, v in clock.items() if name != "start"},
    }
    write_json(out / "summary.json", summary)
    write_report(summary, out)
    return summary


def _finished(results: dict[str, dict], stage: str) -> dict[str, dict]:
    for name, r in results.items():
        if r["interrupted"]:
            raise KeyboardInterrupt(f"{name} {stage} was interrupted (checkpoint saved); rerun the same command")
    return results


def _slim(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "samples"}


# ---------------------------------------------------------------------------------------------------- report
def _table(summary: dict, labels: dict[str, str]) -> list[str]:
    lengths = summary["preset"]["eval_lengths"]
    head = "| task | " + " | ".join(f"{label} @ {L}" for L in lengths for label in labels) + " |"
    lines = [head, "|---|" + "---|" * (len(lengths) * len(labels))]
    tasks = summary["preset"]["tasks"]
    for task in tasks:
        cells = [
            100 * summary["long_context"][name]["accuracy"][task][str(L)] for L in lengths for name in labels.values()
        ]
        lines.append(f"| {task} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    means = [mean_accuracy(summary["long_context"][name], [L]) * 100 for L in lengths for name in labels.values()]
    lines.append("| mean | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    tails = [summary["long_context"][name]["tail_loss"][str(L)]["loss"] for L in lengths for name in labels.values()]
    lines.append("| tail loss | " + " | ".join("-" if t is None else f"{t:.3f}" for t in tails) + " |")
    return lines


def write_report(summary: dict, out: Path) -> Path:
    """``OUT/report.md`` (tables of both readings, short-context losses) and one accuracy figure per reading."""
    from ..reports.long_context_plot import plot_long_context

    p = summary["preset"]
    lines = [
        f"# Long-context comparison, preset `{p['name']}`",
        "",
        f"MoE vs Engram (rho {p['rho']}), pre-trained {p['steps']} steps x {p['batch_size']} x {p['seq_len']} tokens "
        f"({100 * p['task_share']:.0f}% task documents), extended with YaRN (s = {p['factor']:g}, alpha = 1, "
        f"beta = 32, f = 0.707) to {p['extend_seq_len']} tokens for {p['extend_steps']} steps x "
        f"{p['extend_batch_size']}. Accuracy in %, {p['samples']} samples per cell, exact match.",
        "",
        f"MoE final validation loss {summary['moe_final_val_loss']:.4f}; Engram reached it at step "
        f"{summary['equal_loss_step'] if summary['equal_loss_step'] is not None else '(never)'}.",
        "",
        "| model | pre-train step | val loss then | short-context loss after extension | change |",
        "|---|---|---|---|---|",
    ]
    for name, m in summary["models"].items():
        lines.append(
            f"| {name} | {m['pretrain_step']} | {m['pretrain_val_loss']:.4f} | "
            f"{m['short_loss_after_extension']:.4f} | {m['short_loss_change']:+.4f} |"
        )
    for reading, labels in summary["readings"].items():
        lines += ["", f"## {reading.replace('_', ' ')}", ""] + _table(summary, labels)
        plot_long_context(
            {label: summary["long_context"][name] for label, name in labels.items()}, out / f"accuracy_{reading}.png"
        )
        lines += ["", f"![accuracy, {reading}](accuracy_{reading}.png)"]
    if "equal_loss" not in summary["readings"]:
        lines += ["", "## equal loss", "", "Not available: Engram never reached the MoE's final validation loss."]
    before = {n: r for n, r in summary["long_context"].items() if n.endswith("-pretrained")}
    lines += ["", "## before extension (pre-trained models, lengths up to the pre-training context)", ""]
    for name, r in before.items():
        acc = ", ".join(
            f"{t} {100 * mean_accuracy({'accuracy': {t: r['accuracy'][t]}}, r['settings']['lengths']):.0f}"
            for t in r["accuracy"]
        )
        lines.append(f"- {name}: {acc}")
    lines += ["", f"Wall time (s): {summary['wall_s']}", ""]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path
