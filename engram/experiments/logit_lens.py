"""LogitLens (paper section 6.1, Fig. 7a): how far each block's prediction is from the model's final one.

Block l's hidden state (streams reduced, :attr:`ModelOutput.hidden_states`) is decoded with the model's own final
RMSNorm and LM head, ``p_l = softmax(W_head RMSNorm(h_l))``, and compared with the final distribution by
``KL(p_final || p_l)``, averaged over tokens. The last block's KL is 0 by construction. The paper finds Engram
models closer to their final prediction in early blocks than the MoE: memory lookups do work the backbone would
otherwise spend layers on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..model.model import EngramLM
from ..train.data import eval_batches
from .plotting import pyplot


@torch.no_grad()
def layer_kl(model: EngramLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Per block, the summed ``KL(p_final || p_l)`` over all positions of ``input_ids`` [B, T] -> [L] (nats)."""
    out = model(input_ids, output_hidden_states=True)
    final = F.log_softmax(out.logits.float(), dim=-1)
    p_final = final.exp()
    kls = []
    for h in out.hidden_states:
        lens = F.log_softmax(model.lm_head(model.norm(h)).float(), dim=-1)
        kls.append((p_final * (final - lens)).sum(-1).sum())
    return torch.stack(kls)


@torch.no_grad()
def logit_lens(
    model: EngramLM, tokens, *, batch_size: int = 8, seq_len: int = 128, max_batches: int = 8
) -> list[float]:
    """Mean per-token ``KL(p_final || p_l)`` for each block l over validation windows of ``tokens`` (a token array)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = None, 0
    for x, _ in eval_batches(tokens, batch_size, min(seq_len, model.cfg.max_seq_len), max_batches):
        kl = layer_kl(model, x.to(device)).cpu()
        total = kl if total is None else total + kl
        n += x.numel()
    model.train(was_training)
    if total is None:
        raise ValueError("no evaluation windows: the token array is shorter than seq_len + 1")
    return (total / n).tolist()


def plot_logit_lens(curves: dict[str, list[float]], path: str | Path) -> Path:
    """KL against block (1-based, as the paper numbers layers) for each named model, on one log-y plot."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for i, (name, kl) in enumerate(curves.items()):
        layers = list(range(1, len(kl) + 1))
        ax.plot(layers[:-1], kl[:-1], "o-", color=f"C{i}", label=name)  # the last block is 0: off a log axis
    ax.set_yscale("log")
    ax.set_xlabel("block (1-based; the last block, KL = 0, is not drawn)")
    ax.set_ylabel("KL(final || block), nats/token")
    ax.set_title("LogitLens: distance of each block's prediction from the final one", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
