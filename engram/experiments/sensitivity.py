"""Engram switched off at inference (paper section 6.2, Fig. 6), on fact-heavy versus context-heavy tokens.

The paper zeroes the Engram output of a trained model, keeps the backbone as it is, and reports how much of each
benchmark's score survives: factual QA keeps 29-44 %, reading comprehension 81-93 %. This corpus is code, so the
two kinds of evaluation are two disjoint sets of *target tokens* of the validation split:

- **fact-heavy**: the next token is what the training data says follows the current local bigram. The bigram
  (x_{t-1}, x_t) occurred at least ``min_count`` times in training and its most frequent continuation -- with
  probability at least ``min_prob`` -- is the target. Static, local knowledge (``self`` -> ``.``, ``import`` ->
  `` os``, ``__init__`` -> ``(``): what an n-gram memory can answer alone.
- **context-heavy**: the target is an identifier piece that already occurred earlier in the same window (at
  least ``min_distance`` tokens back, beyond any n-gram the memory sees), and the training data gives it
  probability below ``max_local_prob`` after the current bigram. Predicting it means copying from context
  (a variable, argument or class name defined earlier in the file), which no static table can do.

Performance is top-1 next-token accuracy on each set; the *retained fraction* is accuracy with Engram zeroed over
accuracy with it on (losses are reported beside). As the paper notes, zeroing a module the backbone was trained
with is a train/inference mismatch, so only the contrast between the two sets is meaningful.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..model.model import EngramLM
from ..train.data import eval_batches
from .plotting import pyplot


@contextmanager
def engram_disabled(model: EngramLM) -> Iterator[EngramLM]:
    """Inside the block every Engram module's output Y is replaced by zeros (the backbone is untouched)."""
    layers = list(model.engram_layers.values())
    if not layers:
        raise ValueError(f"this {model.cfg.family!r} model has no Engram layers to switch off")
    handles = [e.register_forward_hook(lambda mod, args, out: torch.zeros_like(out)) for e in layers]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


@dataclass
class BigramStats:
    """For every bigram seen in training: how often, and its most frequent next token with that count.

    ``keys`` (sorted int64, ``a * V + b``), ``counts``, ``top_next``, ``top_count``; ``trigram_keys`` /
    ``trigram_counts`` (sorted ``(a * V + b) * V + c``) give the count of every observed trigram.
    """

    vocab_size: int
    keys: np.ndarray
    counts: np.ndarray
    top_next: np.ndarray
    top_count: np.ndarray
    trigram_keys: np.ndarray
    trigram_counts: np.ndarray

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, vocab_size: int) -> "BigramStats":
        t = np.asarray(tokens, dtype=np.int64)
        if len(t) < 3:
            raise ValueError(f"need at least 3 training tokens, got {len(t)}")
        v = int(vocab_size)
        if v**3 >= 2**63:
            raise ValueError(f"vocab size {v} is too large for int64 trigram keys")
        tri = (t[:-2] * v + t[1:-1]) * v + t[2:]
        tri_keys, tri_counts = np.unique(tri, return_counts=True)
        bigram = tri_keys // v
        keys, starts = np.unique(bigram, return_index=True)
        counts = np.add.reduceat(tri_counts, starts)
        order = np.lexsort((-tri_counts, bigram))  # grouped by bigram, most frequent continuation first
        top_pos = order[np.searchsorted(bigram[order], keys)]
        return cls(v, keys, counts, tri_keys[top_pos] % v, tri_counts[top_pos], tri_keys, tri_counts)

    def lookup(self, prev: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For bigrams (prev, cur): (count, top next token or -1, top count), elementwise."""
        key = prev.astype(np.int64) * self.vocab_size + cur.astype(np.int64)
        idx = np.clip(np.searchsorted(self.keys, key), 0, len(self.keys) - 1)
        hit = self.keys[idx] == key
        return (
            np.where(hit, self.counts[idx], 0),
            np.where(hit, self.top_next[idx], -1),
            np.where(hit, self.top_count[idx], 0),
        )

    def trigram_count(self, prev: np.ndarray, cur: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        key = (prev.astype(np.int64) * self.vocab_size + cur.astype(np.int64)) * self.vocab_size + nxt.astype(np.int64)
        idx = np.clip(np.searchsorted(self.trigram_keys, key), 0, len(self.trigram_keys) - 1)
        return np.where(self.trigram_keys[idx] == key, self.trigram_counts[idx], 0)


@dataclass
class SplitRule:
    min_count: int = 5
    min_prob: float = 0.5
    min_distance: int = 4
    max_local_prob: float = 0.05


def split_masks(
    x: np.ndarray, y: np.ndarray, stats: BigramStats, is_word: np.ndarray, rule: SplitRule = SplitRule()
) -> tuple[np.ndarray, np.ndarray]:
    """(fact [B, T], context [B, T]) boolean masks over the targets ``y`` of windows ``x`` (see the module doc).

    Position 0 of each window has no previous token in the window and is in neither set.
    """
    b, t = x.shape
    prev = np.concatenate([np.zeros((b, 1), dtype=x.dtype), x[:, :-1]], axis=1)
    count, top, top_count = stats.lookup(prev, x)
    tri = stats.trigram_count(prev, x, y)
    valid = np.ones((b, t), dtype=bool)
    valid[:, 0] = False
    fact = valid & (count >= rule.min_count) & (top == y) & (top_count >= rule.min_prob * np.maximum(count, 1))
    # earlier occurrence of the target in the window, at least min_distance tokens before the target's position
    seen = np.zeros((b, t), dtype=bool)
    for row in range(b):
        first: dict[int, int] = {}
        for i, tok in enumerate(x[row].tolist()):
            first.setdefault(tok, i)
        for i, tok in enumerate(y[row].tolist()):
            j = first.get(tok)
            seen[row, i] = j is not None and (i + 1) - j >= rule.min_distance
    local_prob = tri / np.maximum(count, 1)
    context = valid & is_word[y] & seen & (local_prob < rule.max_local_prob) & ~fact
    return fact, context


@torch.no_grad()
def split_eval(
    model: EngramLM,
    val_tokens: np.ndarray,
    stats: BigramStats,
    is_word: np.ndarray,
    *,
    rule: SplitRule = SplitRule(),
    batch_size: int = 8,
    seq_len: int = 128,
    max_batches: int | None = 40,
) -> dict:
    """Top-1 accuracy and mean loss of ``model`` on the fact-heavy, context-heavy and all target tokens.

    Returns ``{split: {"n", "acc", "loss"}}`` for ``split`` in fact / context / all.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = {s: {"n": 0, "acc": 0.0, "loss": 0.0} for s in ("fact", "context", "all")}
    for x, y in eval_batches(val_tokens, batch_size, min(seq_len, model.cfg.max_seq_len), max_batches):
        fact, context = split_masks(x.numpy(), y.numpy(), stats, is_word, rule)
        logits = model(x.to(device)).logits.float().cpu()
        correct = logits.argmax(-1) == y
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        for split, m in (
            ("fact", torch.from_numpy(fact)),
            ("context", torch.from_numpy(context)),
            ("all", torch.ones_like(y, dtype=torch.bool)),
        ):
            sums[split]["n"] += int(m.sum())
            sums[split]["acc"] += float(correct[m].sum())
            sums[split]["loss"] += float(loss[m].sum())
    model.train(was_training)
    return {
        k: {"n": v["n"], "acc": v["acc"] / max(v["n"], 1), "loss": v["loss"] / max(v["n"], 1)} for k, v in sums.items()
    }


def engram_off_eval(
    model: EngramLM,
    val_tokens: np.ndarray,
    stats: BigramStats,
    is_word: np.ndarray,
    *,
    rule: SplitRule = SplitRule(),
    batch_size: int = 8,
    seq_len: int = 128,
    max_batches: int | None = 40,
) -> dict:
    """Accuracy and loss on the fact-heavy, context-heavy and all tokens, with Engram on and zeroed.

    Returns ``{split: {"n", "acc_on", "acc_off", "loss_on", "loss_off", "retained"}}``.
    """
    kw = dict(rule=rule, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches)
    on = split_eval(model, val_tokens, stats, is_word, **kw)
    with engram_disabled(model):
        off = split_eval(model, val_tokens, stats, is_word, **kw)
    out = {}
    for split in on:
        r = {
            "n": on[split]["n"],
            "acc_on": on[split]["acc"],
            "acc_off": off[split]["acc"],
            "loss_on": on[split]["loss"],
            "loss_off": off[split]["loss"],
        }
        r["retained"] = r["acc_off"] / r["acc_on"] if r["acc_on"] > 0 else float("nan")
        out[split] = r
    return out


def plot_engram_off(
    result: dict,
    path: str | Path,
    title: str = "",
    baseline: dict | None = None,
    baseline_label: str = "baseline without Engram",
) -> Path:
    """Bars: accuracy with Engram on and zeroed for each split, labelled with the retained fraction; with
    ``baseline`` (a :func:`split_eval` result) a third bar per split for a model trained without Engram."""
    splits = [s for s in ("fact", "context", "all") if s in result]
    labels = {"fact": "fact-heavy", "context": "context-heavy", "all": "all tokens"}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    xs = np.arange(len(splits))
    w = 0.27 if baseline else 0.36
    shift = -w if baseline else -w / 2
    ax.bar(xs + shift, [result[s]["acc_on"] for s in splits], w, label="Engram on", color="C0")
    ax.bar(xs + shift + w, [result[s]["acc_off"] for s in splits], w, label="Engram output zeroed", color="C3")
    if baseline:
        ax.bar(xs + shift + 2 * w, [baseline[s]["acc"] for s in splits], w, label=baseline_label, color="gray")
    for x, s in zip(xs, splits):
        top = max(result[s]["acc_on"], result[s]["acc_off"], baseline[s]["acc"] if baseline else 0.0)
        ax.text(x, top + 0.02, f"retained {result[s]['retained']:.0%}\n(n={result[s]['n']:,})", ha="center", fontsize=8)
    ax.set_xticks(xs, [labels[s] for s in splits])
    ax.set_ylabel("top-1 next-token accuracy")
    ax.set_ylim(0, 1.15)
    ax.set_title(title or "Engram switched off at inference", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
