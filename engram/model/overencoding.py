"""OverEncoding baseline (Over-Tokenized Transformer, arXiv 2501.16975): hashed n-gram *input* embeddings.

For orders n = 2..N the n-gram ending at t (raw token ids) is hashed with Engram's multiplicative-XOR hash, one
head per order, into a prime-sized table of model width; the rows are averaged with the token embedding at the
input (layer 0)::

    x_t = ( E_tok[x_t] + sum_{n=2..N} E_n[ z_n(t) ] ) / N

This is the memory-scaling baseline of the Engram paper (section 3.3): the same table parameters, injected at the
input instead of gated into a deeper layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import EngramConfig
from ..hashing import NgramHasher
from ..module import MultiHeadEmbedding
from .config import OverEncodingConfig


def overencoding_hasher(cfg: OverEncodingConfig, vocab_size: int, hidden_size: int, pad_id: int) -> NgramHasher:
    """An n-gram hasher over raw ids with one head per order (reuses Engram's bit-exact hash)."""
    hcfg = EngramConfig(
        engram_vocab_size=[cfg.table_size] * (cfg.max_ngram_size - 1),
        max_ngram_size=cfg.max_ngram_size,
        n_embed_per_ngram=hidden_size,
        n_head_per_ngram=1,
        layer_ids=[0],
        pad_id=pad_id,
        seed=cfg.seed,
    )
    return NgramHasher(hcfg, vocab_size, pad_id)


class OverEncoding(nn.Module):
    """Adds averaged hashed n-gram embeddings to the token embedding."""

    def __init__(
        self,
        cfg: OverEncodingConfig,
        vocab_size: int,
        hidden_size: int,
        pad_id: int = 0,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.hasher = overencoding_hasher(cfg, vocab_size, hidden_size, pad_id)
        sizes = [p for heads in self.hasher.table_sizes[0] for p in heads]
        self.table = MultiHeadEmbedding(sizes, hidden_size, init_std=init_std, device=device)

    @property
    def num_table_params(self) -> int:
        return self.table.num_rows * self.table.head_dim

    def hash(self, input_ids: torch.Tensor, history: torch.Tensor | None = None) -> torch.Tensor:
        if history is None:
            return self.hasher.hash(input_ids)[0]
        return self.hasher.hash_incremental(history, input_ids)[0]

    def forward(self, tok_emb: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        """tok_emb [B, T, D] and hash_ids [B, T, N-1] (from :meth:`hash`) -> the averaged input embedding."""
        want = (*tok_emb.shape[:2], len(self.table.head_sizes))
        if tok_emb.dim() != 3 or tuple(hash_ids.shape) != want:
            raise ValueError(
                f"OverEncoding needs tok_emb [B, T, D] and hash_ids [B, T, N-1] = {list(want)}, got "
                f"{tuple(tok_emb.shape)} and {tuple(hash_ids.shape)}"
            )
        rows = self.table(hash_ids)  # [B, T, N-1, D]
        return (tok_emb + rows.sum(dim=2)) / (rows.shape[2] + 1)
