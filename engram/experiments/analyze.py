"""The ``engram analyze`` commands: load trained models, run one analysis, write a figure and its numbers.

A model is named by any of: a model folder (``.../model``), a trainer run folder (``.../run``) or a sweep point
folder (``.../points/NAME``). Its corpus is read back from the run's ``config.json`` (train section), so the
analysis sees the same validation split the model was evaluated on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..model.io import load_model
from ..model.model import EngramLM
from ..train.data import (
    TextTokenizer,
    TokenizedCorpus,
    build_token_files,
    default_cache_dir,
    eval_batches,
    load_corpus,
    load_tokenizer,
)
from ..train.metrics import read_metrics
from .cka import MinibatchCKA, layer_features, plot_cka, soft_alignment_index
from .logit_lens import logit_lens, plot_logit_lens
from .plotting import pyplot
from .sensitivity import BigramStats, SplitRule, engram_off_eval, plot_engram_off, split_eval
from .token_classes import identifier_ends, word_pieces


def resolve_model_dir(path: str | Path) -> Path:
    p = Path(path)
    for cand in (p, p / "model", p / "run" / "model"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise FileNotFoundError(f"no saved model at {path} (looked in ., model/, run/model/); has that run finished?")


def load_trained(path: str | Path) -> tuple[EngramLM, TextTokenizer, TokenizedCorpus]:
    """The model, its tokenizer and its corpus's token files (train/val) as it was trained on."""
    model_dir = resolve_model_dir(path)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, map_location="cpu")
    model.eval()
    run_cfg = model_dir.parent / "config.json"
    train = json.loads(run_cfg.read_text()).get("train", {}) if run_cfg.is_file() else {}
    corpus = load_corpus(
        train.get("data"), max_bytes=train.get("max_bytes", 4_000_000), val_fraction=train.get("val_fraction", 0.05)
    )
    key = f"{corpus.fingerprint('train')[:12]}-{corpus.fingerprint('val')[:8]}-{tok.fingerprint[:12]}"
    cache = Path(train["cache_dir"]) if train.get("cache_dir") else default_cache_dir()
    return model, tok, build_token_files(corpus, tok, cache / "tokens" / key, progress=False)


def _same_tokenizer(toks: list[TextTokenizer]) -> None:
    if len({t.fingerprint for t in toks}) != 1:
        raise ValueError(
            "the models were trained with different tokenizers; layer-wise comparisons need the same "
            "token positions, so pick models from the same corpus and tokenizer"
        )


def _write(out_png: str | Path, data: dict) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2))
    return out


def analyze_logit_lens(models: list[str], labels: list[str], out_png: str | Path, *, max_batches: int = 8) -> dict:
    """Per-block KL(final || block) of each model on the same validation windows; one plot."""
    loaded = [load_trained(m) for m in models]
    _same_tokenizer([t for _, t, _ in loaded])
    curves = {lab: logit_lens(m, c.val.tokens, max_batches=max_batches) for lab, (m, _, c) in zip(labels, loaded)}
    out = _write(out_png, {"models": dict(zip(labels, models)), "kl_per_block": curves})
    plot_logit_lens(curves, out)
    return curves


def analyze_cka(
    model_a: str,
    model_b: str,
    labels: tuple[str, str],
    out_png: str | Path,
    *,
    n_tokens: int = 4096,
    batch_tokens: int = 256,
    k: int = 5,
) -> dict:
    """Minibatch linear CKA between every layer of A (rows) and B (columns) at identifier-final tokens, a_j."""
    (ma, tok, corpus), (mb, tok_b, _) = load_trained(model_a), load_trained(model_b)
    _same_tokenizer([tok, tok_b])
    is_word, leading = word_pieces(tok.decode, tok.vocab_size)
    acc = MinibatchCKA(ma.cfg.num_layers, mb.cfg.num_layers)
    buf_a: list[list[torch.Tensor]] = [[] for _ in range(ma.cfg.num_layers)]
    buf_b: list[list[torch.Tensor]] = [[] for _ in range(mb.cfg.num_layers)]
    held = used = 0
    seq_len = min(128, ma.cfg.max_seq_len, mb.cfg.max_seq_len)
    for x, _ in eval_batches(corpus.val.tokens, 8, seq_len):
        mask = torch.from_numpy(identifier_ends(x.numpy(), is_word, leading))
        if not mask.any():
            continue
        for buf, feats in ((buf_a, layer_features(ma, x, mask)), (buf_b, layer_features(mb, x, mask))):
            for layer, f in zip(buf, feats):
                layer.append(f)
        held += int(mask.sum())
        while held >= batch_tokens and used < n_tokens:
            xs = [torch.cat(layer) for layer in buf_a]
            ys = [torch.cat(layer) for layer in buf_b]
            acc.update([x_[:batch_tokens] for x_ in xs], [y_[:batch_tokens] for y_ in ys])
            buf_a = [[x_[batch_tokens:]] for x_ in xs]
            buf_b = [[y_[batch_tokens:]] for y_ in ys]
            held -= batch_tokens
            used += batch_tokens
        if used >= n_tokens:
            break
    s = acc.result()
    a = soft_alignment_index(s, k)
    data = {
        "models": {labels[0]: model_a, labels[1]: model_b},
        "rows": labels[0],
        "columns": labels[1],
        "tokens": used,
        "batch_tokens": batch_tokens,
        "k": k,
        "cka": s.tolist(),
        "alignment_index": a.tolist(),
        "positions": "last piece of each multi-token identifier in the validation split",
    }
    plot_cka(s, _write(out_png, data), labels[0], labels[1], k)
    return data


def _eval_history(path: str | Path) -> list[dict]:
    """The eval records of a trained run, from a point, run or model folder's ``metrics.jsonl``."""
    run_dir = resolve_model_dir(path).parent
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]
    if not evals:
        raise ValueError(f"{run_dir} logged no evaluations; train with train.eval_every below train.steps")
    return evals


def analyze_curves(models: list[str], labels: list[str], out_png: str | Path) -> dict:
    """Validation loss against training step for each model, and each model's gap to the first one."""
    hist = {lab: _eval_history(m) for lab, m in zip(labels, models)}
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    base = {r["step"]: r["val_loss"] for r in hist[labels[0]]}
    gaps = {}
    for i, (lab, ev) in enumerate(hist.items()):
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", color=f"C{i}", label=lab)
        if i:
            gaps[lab] = {r["step"]: r["val_loss"] - base[r["step"]] for r in ev if r["step"] in base}
            bx.plot(list(gaps[lab]), list(gaps[lab].values()), "o-", color=f"C{i}", label=f"{lab} - {labels[0]}")
    ax.set(xlabel="step", ylabel="validation loss (nats/token)", title="Validation loss during training")
    bx.axhline(0, color="gray", lw=1)
    bx.set(xlabel="step", ylabel="loss difference (nats/token)", title=f"Gap to {labels[0]}")
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    out = _write(
        out_png,
        {
            "models": dict(zip(labels, models)),
            "val_loss": {lab: {r["step"]: r["val_loss"] for r in ev} for lab, ev in hist.items()},
            "gap_to_first": gaps,
        },
    )
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"gap_to_first": gaps}


def analyze_engram_off(
    model: str,
    out_png: str | Path,
    *,
    baseline: str | None = None,
    rule: SplitRule = SplitRule(),
    max_batches: int = 40,
) -> dict:
    """Accuracy with Engram on and zeroed on fact-heavy / context-heavy validation tokens (see sensitivity.py);
    ``baseline``, a model trained without Engram on the same data, is scored on the same tokens."""
    m, tok, corpus = load_trained(model)
    stats = BigramStats.from_tokens(np.asarray(corpus.train.tokens), tok.vocab_size)
    is_word, _ = word_pieces(tok.decode, tok.vocab_size)
    result = engram_off_eval(m, corpus.val.tokens, stats, is_word, rule=rule, max_batches=max_batches)
    data = {"model": model, "rule": rule.__dict__, "result": result}
    base = None
    if baseline is not None:
        mb, tok_b, _ = load_trained(baseline)
        _same_tokenizer([tok, tok_b])
        base = split_eval(mb, corpus.val.tokens, stats, is_word, rule=rule, max_batches=max_batches)
        data.update(baseline=baseline, baseline_result=base)
    plot_engram_off(result, _write(out_png, data), baseline=base)
    return data
