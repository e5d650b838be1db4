"""Linear CKA between two models' layers and the paper's soft alignment index (section 6.1, Fig. 7b).

Centered kernel alignment of representations X [n, d1] and Y [n, d2] with linear kernels K = X X^T, L = Y Y^T::

    CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))

HSIC is the unbiased estimator of Song et al. (2012), so it needs no centering and is unbiased for finite n::

    HSIC_1(K, L) = [ tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1 ] / (n(n-3))

with K~, L~ the Gram matrices with their diagonals zeroed. Over minibatches the HSIC terms are summed before the
ratio is taken (Nguyen, Raghu & Kornblith 2021), which keeps the estimate unbiased in the number of batches.

The soft alignment index of column j of a similarity matrix S [L_a, L_b] (rows: the reference model's layers i,
numbered 1..L_a) is the similarity-weighted mean depth of its ``k`` most similar rows::

    a_j = sum_{i in topk_j} S_ij * i / sum_{i in topk_j} S_ij

The paper finds a_j > j for Engram against MoE: Engram's layer j looks like a deeper MoE layer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model.model import EngramLM
from .plotting import pyplot


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator of two [n, n] Gram matrices (n >= 4), computed in float64."""
    n = k.shape[0]
    if k.shape != (n, n) or l.shape != (n, n):
        raise ValueError(f"need two square Gram matrices of the same size, got {tuple(k.shape)} and {tuple(l.shape)}")
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got {n}")
    k = k.double().clone()
    l = l.double().clone()
    k.fill_diagonal_(0.0)
    l.fill_diagonal_(0.0)
    trace = (k * l).sum()  # tr(K~ L~) for symmetric matrices
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (k.sum(0) @ l.sum(1))
    return (trace + sums - cross) / (n * (n - 3))


def gram(x: torch.Tensor) -> torch.Tensor:
    """The linear kernel X X^T of [n, d] features (float64)."""
    x = x.double()
    return x @ x.T


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of [n, d1] and [n, d2] features (one batch)."""
    k, l = gram(x), gram(y)
    return float(hsic_unbiased(k, l) / torch.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l)))


class MinibatchCKA:
    """Accumulates linear CKA between every layer of model A and every layer of model B over minibatches.

    ``update(xs, ys)`` takes lists of [n, d] features (one per layer) for the same n samples.
    """

    def __init__(self, layers_a: int, layers_b: int):
        self.cross = torch.zeros(layers_a, layers_b, dtype=torch.float64)
        self.self_a = torch.zeros(layers_a, dtype=torch.float64)
        self.self_b = torch.zeros(layers_b, dtype=torch.float64)
        self.batches = 0

    def update(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        if len(xs) != len(self.self_a) or len(ys) != len(self.self_b):
            raise ValueError(f"expected {len(self.self_a)} and {len(self.self_b)} layers, got {len(xs)} and {len(ys)}")
        ka = [gram(x) for x in xs]
        kb = [gram(y) for y in ys]
        for i, k in enumerate(ka):
            self.self_a[i] += hsic_unbiased(k, k)
            for j, l in enumerate(kb):
                self.cross[i, j] += hsic_unbiased(k, l)
        for j, l in enumerate(kb):
            self.self_b[j] += hsic_unbiased(l, l)
        self.batches += 1

    def result(self) -> torch.Tensor:
        """[layers_a, layers_b] CKA matrix."""
        if not self.batches:
            raise ValueError("no minibatches were added")
        return self.cross / torch.sqrt(self.self_a[:, None] * self.self_b[None, :])


def soft_alignment_index(s: torch.Tensor | np.ndarray, k: int = 5) -> np.ndarray:
    """``a_j`` for every column j of S [L_a, L_b] (rows numbered 1..L_a); k is capped at L_a."""
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"S must be a 2-D similarity matrix, got shape {s.shape}")
    k = min(k, s.shape[0])
    depth = np.arange(1, s.shape[0] + 1, dtype=np.float64)
    out = np.empty(s.shape[1])
    for j in range(s.shape[1]):
        top = np.argsort(-s[:, j], kind="stable")[:k]
        out[j] = float((s[top, j] * depth[top]).sum() / s[top, j].sum())
    return out


@torch.no_grad()
def layer_features(model: EngramLM, input_ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each block's hidden state at the positions where ``mask`` [B, T] is True: L tensors of [n, D]."""
    out = model(input_ids, output_hidden_states=True)
    return [h[mask].float().cpu() for h in out.hidden_states]


def plot_cka(s: torch.Tensor | np.ndarray, path: str | Path, name_a: str, name_b: str, k: int = 5) -> Path:
    """Heatmap of S (rows: ``name_a`` layers, columns: ``name_b`` layers, both 1-based), the diagonal and a_j."""
    s = np.asarray(s)
    a = soft_alignment_index(s, k)
    la, lb = s.shape
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(
        s,
        origin="lower",
        cmap="viridis",
        vmin=float(s.min()),
        vmax=float(s.max()),
        extent=(0.5, lb + 0.5, 0.5, la + 0.5),
        aspect="auto",
    )
    cols = np.arange(1, lb + 1)
    ax.plot(cols, cols, "w--", lw=1, label="a_j = j")
    ax.plot(cols, a, "o-", color="C3", label=f"soft alignment a_j (k = {min(k, la)})")
    ax.set_xlabel(f"{name_b} layer j")
    ax.set_ylabel(f"{name_a} layer i")
    ax.set_xticks(cols)
    ax.set_yticks(np.arange(1, la + 1))
    ax.set_title("Linear CKA (unbiased, minibatch)", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
