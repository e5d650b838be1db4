"""Fine-tuning a frozen Hugging Face causal LM through whatever it has made trainable (an Engram adapter, LoRA).

One loop for every kind of adapter, so that a comparison between them differs only in the adapter: the same
batches (a seeded generator over the same token file), the same optimizer recipe (:func:`engram.train.optim
.build_optimizers` on the trainable parameters: Engram tables at 5x the rate, the rest AdamW; offloaded tables
row-wise in their tier with :class:`engram.storage.SparseRowOptimizer`), the same schedule and the same
evaluation (mean next-token cross-entropy over consecutive windows of validation splits).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config import EngramConfig
from ..tokenizer import vocab_fingerprint
from ..train.data import (
    Corpus,
    TextTokenizer,
    TokenizedCorpus,
    build_token_files,
    default_cache_dir,
    eval_batches,
    random_batch,
)
from ..train.optim import LRSchedule, OptimConfig, build_optimizers, clip_grad_norm


@dataclass
class FinetuneConfig:
    """Steps and batches of an adapter fine-tune (defaults sized for a 135M model on a few CPU cores)."""

    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    table_lr_mult: float = 5.0
    table_optimizer: str = "adam"  # or "rowwise" (one scalar of state per row); host/disk tables are always row-wise
    warmup_steps: int = 20
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 16
    seed: int = 0
    progress: bool = True

    def optim(self) -> OptimConfig:
        """The optimizer recipe: AdamW without weight decay (the base stays put; the adapter starts at zero),
        Engram tables at ``table_lr_mult`` x, a constant rate after warmup."""
        return OptimConfig(
            lr=self.lr,
            weight_decay=0.0,
            muon=False,
            table_lr_mult=self.table_lr_mult,
            table_optimizer=self.table_optimizer,
            warmup_steps=self.warmup_steps,
            schedule="constant",
            grad_clip=self.grad_clip,
        )


def text_tokenizer(tokenizer: Any, name: str = "hf") -> TextTokenizer:
    """Wrap a transformers tokenizer for :func:`engram.train.data.build_token_files` (documents end with EOS)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {name!r} has no eos_token_id; documents are joined with it")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TextTokenizer(
        tokenizer, name=name, eos_id=eos, pad_id=pad, fingerprint=vocab_fingerprint(dict(tokenizer.get_vocab()))
    )


def tokenize(corpus: Corpus, tokenizer: TextTokenizer, progress: bool = True) -> TokenizedCorpus:
    """Token files of ``corpus`` in the shared cache, keyed by corpus and tokenizer (reruns reuse them)."""
    key = f"hf-{corpus.fingerprint('train')[:10]}-{corpus.fingerprint('val')[:10]}-{tokenizer.fingerprint[:12]}"
    return build_token_files(corpus, tokenizer, default_cache_dir() / "tokens" / key, progress=progress)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of an HF causal LM on ``x`` with targets ``y`` (already shifted)."""
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int | None,
    device: torch.device,
) -> dict:
    """Loss, perplexity and forward tokens/s over consecutive ``seq_len`` windows (each token predicted once)."""
    was_training = model.training
    model.eval()
    total, count, seconds = 0.0, 0, 0.0
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
        t0 = time.perf_counter()
        loss = lm_loss(model, x.to(device), y.to(device))
        seconds += time.perf_counter() - t0
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count, "tokens_per_s": count / max(seconds, 1e-9)}


@dataclass
class FinetuneResult:
    history: list[dict]  # {"step", "loss"} per logged training step
    evals: list[dict]  # {"step", "val_loss", <name>_loss for every evaluation split}
    before: dict[str, dict]  # evaluate() of each split before training
    after: dict[str, dict]  # and after
    tokens_per_s: float  # training throughput (forward + backward + step)
    trainable_parameters: int


def _table_optimizer(model: nn.Module, optim: OptimConfig):
    from ..storage import OffloadedEmbedding, SparseRowOptimizer

    if not any(isinstance(m, OffloadedEmbedding) for m in model.modules()):
        return None
    return SparseRowOptimizer(
        model,
        lr=optim.lr * optim.table_lr_mult,
        beta2=optim.betas[1],
        eps=optim.eps,
        weight_decay=optim.table_weight_decay,
    )


def finetune(
    model: nn.Module,
    train_tokens: np.ndarray,
    eval_sets: dict[str, np.ndarray],
    cfg: FinetuneConfig,
    *,
    device: torch.device | str = "cpu",
    desc: str = "finetune",
) -> FinetuneResult:
    """Train the parameters of ``model`` that require grad for ``cfg.steps`` steps on random windows of
    ``train_tokens``; evaluate every split of ``eval_sets`` before, every ``eval_every`` steps and after.

    The first split of ``eval_sets`` is the in-domain validation split (``val_loss`` in :attr:`evals`).
    With nothing trainable (``cfg.steps == 0`` or a frozen model) it only evaluates: the "train nothing" arm.
    """
    device = torch.device(device)
    if not eval_sets:
        raise ValueError("eval_sets needs at least the in-domain validation split")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    first = next(iter(eval_sets))
    optim = cfg.optim()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizers = build_optimizers(model, optim) if trainable and cfg.steps else []
    table_opt = _table_optimizer(model, optim) if cfg.steps else None
    schedule = LRSchedule(optimizers + ([table_opt] if table_opt is not None else []), optim, max(cfg.steps, 1))
    n_trainable = sum(p.numel() for p in trainable) if cfg.steps else 0  # what this run trains
    if not optimizers and table_opt is None and cfg.steps:
        raise ValueError("the model has nothing trainable: add an adapter (engram.hf.add_engram, peft) or use steps=0")

    def run_eval(step: int) -> dict[str, dict]:
        results = {
            name: evaluate(
                model, toks, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches, device=device
            )
            for name, toks in eval_sets.items()
        }
        evals.append(
            {
                "step": step,
                "val_loss": results[first]["loss"],
                **{f"{name}_loss": r["loss"] for name, r in results.items()},
            }
        )
        return results

    history: list[dict] = []
    evals: list[dict] = []
    before = run_eval(0)
    model.train()
    seconds = 0.0
    bar = tqdm(total=cfg.steps, desc=desc, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    for step in range(cfg.steps):
        x, y = random_batch(train_tokens, cfg.batch_size, cfg.seq_len, gen)
        t0 = time.perf_counter()
        loss = lm_loss(model, x.to(device), y.to(device))
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            clip_grad_norm([*trainable, *(table_opt.grad_tensors() if table_opt is not None else [])], cfg.grad_clip)
        for o in optimizers:
            o.step()
        if table_opt is not None:
            table_opt.step()
            table_opt.zero_grad()
        schedule.step()
        seconds += time.perf_counter() - t0
        loss_v = loss.detach().item()
        if not math.isfinite(loss_v):
            raise FloatingPointError(f"loss became {loss_v} at step {step + 1}; lower the learning rate")
        history.append({"step": step + 1, "loss": loss_v})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_v:.3f}", tok_s=f"{cfg.batch_size * cfg.seq_len * (step + 1) / seconds:,.0f}")
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            run_eval(step + 1)
    bar.close()
    after = run_eval(cfg.steps) if cfg.steps else before
    model.eval()
    tok_s = cfg.batch_size * cfg.seq_len * cfg.steps / seconds if seconds else 0.0
    return FinetuneResult(history, evals, before, after, tok_s, n_trainable)


def write_report(results: dict[str, FinetuneResult], out_dir: str | Path, title: str) -> Path:
    """``report.md`` (before/after per split, tokens/s) and ``loss_curves.png`` for the named runs."""
    from ..reports.figures import plot_loss_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(
        {name: {"history": r.history, "evals": r.evals} for name, r in results.items()}, out / "loss_curves.png"
    )
    splits = list(next(iter(results.values())).before)
    cells = " | ".join(f"{s} loss before -> after" for s in splits)
    head = f"| run | trainable params | {cells} | train tokens/s |"
    lines = [f"# {title}", "", head, "|" + "---|" * (len(splits) + 3)]
    for name, r in results.items():
        cells = [f"{r.before[s]['loss']:.4f} -> {r.after[s]['loss']:.4f}" for s in splits]
        lines.append(f"| {name} | {r.trainable_parameters:,} | " + " | ".join(cells) + f" | {r.tokens_per_s:,.0f} |")
    lines += ["", "![loss curves](loss_curves.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def adapter_config(
    tokenizer: Any,
    layers: list[int],
    *,
    rows_per_head: int = 32768,
    max_ngram_size: int = 3,
    n_embed_per_ngram: int = 256,
    n_head_per_ngram: int = 4,
) -> EngramConfig:
    """An EngramConfig for an adapter on ``tokenizer``'s model: the pad id is the tokenizer's pad (or EOS) id."""

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token id; Engram needs one for the sequence start")
    return EngramConfig(
        engram_vocab_size=[rows_per_head] * (max_ngram_size - 1),
        max_ngram_size=max_ngram_size,
        n_embed_per_ngram=n_embed_per_ngram,
        n_head_per_ngram=n_head_per_ngram,
        layer_ids=list(layers),
        pad_id=int(pad),
    )


def finetune_adapter(
    base: str,
    out_dir: str | Path,
    layers: list[int],
    cfg: FinetuneConfig,
    *,
    data: str | None = None,
    max_bytes: int | None = 8_000_000,
    forget_data: str | None = None,
    table_tier: str = "device",
    device: str = "cpu",
    **config_kwargs: Any,
) -> dict:
    """``engram finetune``: load ``base``, add Engram at ``layers``, train on ``data``, write the adapter and a report.

    ``out_dir`` receives the adapter (``adapter.safetensors`` + ``adapter_config.json``), ``report.md``,
    ``loss_curves.png`` and ``results.json`` with the validation loss before and after on ``data`` (and on
    ``forget_data``, a second corpus that measures forgetting, when given).
    """
    from ..train.data import load_corpus
    from .adapter import add_engram, save_adapter
    from .base import load_base

    out = Path(out_dir)
    model, tok = load_base(base)
    model.to(device)
    ttok = text_tokenizer(tok, Path(base).name or base)
    domain = tokenize(load_corpus(data, max_bytes=max_bytes), ttok, cfg.progress)
    eval_sets = {"domain": domain.val.tokens}
    if forget_data is not None:
        eval_sets["forgetting"] = tokenize(load_corpus(forget_data, max_bytes=max_bytes), ttok, cfg.progress).val.tokens
    factory = None
    if table_tier != "device":
        from ..storage import table_factory

        factory = table_factory(table_tier, path_dir=out / "tables" if table_tier == "disk" else None, overwrite=True)
    adapter = add_engram(model, tok, adapter_config(tok, layers, **config_kwargs), table_factory=factory)
    result = finetune(model, domain.train.tokens, eval_sets, cfg, device=device, desc="engram adapter")
    save_adapter(model, out)
    write_report({"engram adapter": result}, out, f"Engram adapter on {base}")
    summary = {
        "base": base,
        "layers": list(layers),
        "steps": cfg.steps,
        "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "trainable_parameters": adapter.trainable_parameters(),
        "activated_parameters_per_token": adapter.activated_parameters_per_token(),
        "train_tokens_per_s": result.tokens_per_s,
        "before": {k: v["loss"] for k, v in result.before.items()},
        "after": {k: v["loss"] for k, v in result.after.items()},
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
