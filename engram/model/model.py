"""The decoder-only LM: token embedding -> blocks -> final norm -> LM head.

A block is ``Engram (at Engram layers) -> attention -> FFN``, each added to the residual, pre-norm RMSNorm::

    H <- H + Engram(H, hash_ids)                  (only at cfg.engram.layer_ids; per residual branch)
    H <- H + Attn(RMSNorm(H_pre . H))             (through the mHC mixes when hc_mult > 1)
    H <- H + FFN(RMSNorm(H_pre . H))              (dense SwiGLU or MoE)

Hash ids of every Engram layer depend only on the token ids, so :meth:`EngramLM.forward` computes them all
before the first block (and asks offloaded tables to start fetching their rows then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import decode_kernels
from ..hashing import NgramHasher, PendingStep
from ..module import Engram, MultiHeadEmbedding
from ..table import TableFactory
from ..tokenizer import CompressedTokenizer
from ..validation import validation_enabled
from .attention import LayerKVCache, build_attention
from .config import ModelConfig
from .ffn import MoE, build_ffn
from .mhc import build_residual, expand_streams, reduce_streams
from .overencoding import OverEncoding


@dataclass
class DecodeState:
    """Everything a cached, incremental forward needs from the previous steps."""

    kv: list[LayerKVCache]
    engram: dict[int, dict] = field(default_factory=dict)  # ShortConv context per Engram layer
    history: torch.Tensor | None = None  # [B, N-1] compressed ids (Engram hashing)
    oe_history: torch.Tensor | None = None  # [B, N-1] raw ids (OverEncoding hashing)
    key_mask: torch.Tensor | None = None  # [B, T_so_far] real (non-pad) tokens; None while no padding was seen
    next_pos: torch.Tensor | None = None  # [B] position of the next token per sequence
    length: int = 0  # tokens seen so far (padding included)
    kernel_hashing: bool | None = None  # decode steps hash inside the Engram layers' kernels (set at the first)
    pending: PendingStep | None = None  # the hashing those kernels take over, reused from step to step


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None  # after each block, streams reduced, before the final norm


def engram_hasher(cfg: ModelConfig, tokenizer: CompressedTokenizer) -> NgramHasher:
    """The hasher of an ``engram``-family model (no weights needed); ``NgramHasher.from_tokenizer`` honours the
    ``compress_tokens = False`` ablation."""
    return NgramHasher.from_tokenizer(cfg.engram, tokenizer)


class Block(nn.Module):
    def __init__(
        self, cfg: ModelConfig, idx: int, hasher: NgramHasher | None, table_factory: TableFactory | None = None
    ):
        super().__init__()
        self.idx = idx
        self.engram: Engram | None = None
        self.engram_res: nn.Module | None = None
        if cfg.family == "engram" and idx in cfg.engram.layer_ids:
            # "w/o multi-branch" ablation: one fusion on the H_pre-mixed hidden state, written back by H_post
            per_branch = cfg.engram.multi_branch or cfg.hc_mult == 1
            table = None
            if table_factory is not None:
                head_sizes = [p for heads in hasher.table_sizes[idx] for p in heads]
                table = table_factory(idx, head_sizes, cfg.engram.head_dim, cfg.init_std)
            self.engram = Engram(
                cfg.engram,
                idx,
                cfg.hidden_size,
                cfg.hc_mult if per_branch else 1,
                hasher,
                init_std=cfg.init_std,
                table=table,
            )
            if not per_branch:
                self.engram_res = build_residual(cfg)
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.attn_res = build_residual(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.ffn = build_ffn(cfg, idx)
        self.ffn_res = build_residual(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        hash_ids: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        key_mask: torch.Tensor | None,
        cache: LayerKVCache | None,
        engram_state: dict | None,
    ) -> torch.Tensor:
        """x: [B, T, M, D] residual branches."""
        if self.engram is not None:
            if self.engram_res is None:
                x = x + self.engram(x, hash_ids=hash_ids, mask=token_mask, state=engram_state)
            else:
                h, ctx = self.engram_res.pre(x)
                x = self.engram_res.post(x, self.engram(h, hash_ids=hash_ids, mask=token_mask, state=engram_state), ctx)
        h, ctx = self.attn_res.pre(x)
        x = self.attn_res.post(x, self.attn(self.attn_norm(h), positions, cache=cache, key_mask=key_mask), ctx)
        h, ctx = self.ffn_res.pre(x)
        x = self.ffn_res.post(x, self.ffn(self.ffn_norm(h)), ctx)
        return x


class EngramLM(nn.Module):
    """Decoder-only LM of any family (``dense``, ``moe``, ``engram``, ``overencoding``).

    ``tokenizer`` (a :class:`CompressedTokenizer`) is required for the ``engram`` family: it fixes V' and so the
    hash multipliers, and its fingerprint is saved with the model. With ``cfg.engram.compress_tokens = False`` the
    tokenizer's vocabulary is kept but ids are hashed uncompressed (the ablation).

    ``table_factory(layer_id, head_sizes, head_dim, init_std) -> table`` builds each Engram layer's table in
    place of the default on-device :class:`~engram.module.MultiHeadEmbedding`, e.g. a host or disk table from
    :func:`engram.storage.table_factory`, so that it is created directly in its tier.
    """

    def __init__(
        self, cfg: ModelConfig, tokenizer: CompressedTokenizer | None = None, table_factory: TableFactory | None = None
    ):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.hasher: NgramHasher | None = None
        if tokenizer is not None and tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"tokenizer vocab size {tokenizer.vocab_size} does not match the model's vocab_size "
                f"{cfg.vocab_size}; set vocab_size to the tokenizer's size"
            )
        if cfg.family == "engram":
            if tokenizer is None:
                raise ValueError(
                    "the engram family needs a CompressedTokenizer: EngramLM(cfg, CompressedTokenizer(tok))"
                )
            self.hasher = engram_hasher(cfg, tokenizer)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.overencoding = None
        if cfg.family == "overencoding":
            self.overencoding = OverEncoding(cfg.overencoding, cfg.vocab_size, cfg.hidden_size, init_std=cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, i, self.hasher, table_factory) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        nn.init.normal_(self.tok_emb.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    # ------------------------------------------------------------------ helpers
    @property
    def engram_layers(self) -> dict[int, Engram]:
        return {b.idx: b.engram for b in self.blocks if b.engram is not None}

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_moe_biases(self) -> None:
        """Auxiliary-loss-free balancing: nudge every MoE router bias from the load seen since the last call."""
        for m in self.moe_layers():
            m.update_bias()

    def new_state(self) -> DecodeState:
        return DecodeState(kv=[LayerKVCache() for _ in self.blocks])

    def _hashes_in_kernels(self, device: torch.device) -> bool:
        """Whether a decode step's token can be hashed inside each Engram layer's fused CPU kernel
        (:class:`~engram.hashing.PendingStep`): on the CPU, kernels on, every table on the device (none waits
        for a prefetch). A layer the kernel does not take after all hashes the token itself, so this only
        decides where the work happens; decided once per :class:`DecodeState`."""
        if device.type != "cpu" or not decode_kernels.cpu_kernels_enabled():
            return False
        return all(type(b.engram.table) is MultiHeadEmbedding for b in self.blocks if b.engram is not None)

    def hash_tokens(self, input_ids: torch.Tensor, history: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Hash ids of every Engram layer for RAW token ids ``input_ids`` [B, T]; computable before the forward.

        ``history`` ([B, N-1] compressed ids of the preceding tokens, as kept in :class:`DecodeState`) continues a
        sequence. Named like :meth:`NgramHasher.hash_tokens` (raw ids), unlike ``NgramHasher.hash`` (compressed).
        """
        if self.hasher is None:
            return {}
        compressed = self.hasher.compress(input_ids)
        if history is None:
            return self.hasher.hash(compressed)
        return self.hasher.hash_incremental(history, compressed)

    def check_inputs(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        hash_ids: dict[int, torch.Tensor] | None = None,
    ) -> None:
        """Refuse arguments of :meth:`forward` that would give a wrong result without an error.

        Shapes and dtypes are checked always (free). Values (token ids in range, targets not all ignored) need a
        device-to-host read and are checked only while :func:`engram.validation.validation_enabled` (default on;
        ``engram.set_validation(False)`` or ``ENGRAM_VALIDATE=0`` for tuned runs): one read for all of them.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a [batch, seq] tensor, got {getattr(input_ids, 'shape', type(input_ids))}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        shape = tuple(input_ids.shape)
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != shape:
                raise ValueError(
                    f"targets must have the shape of input_ids {shape} (one next-token id per position, "
                    f"-100 = ignore), got {tuple(getattr(targets, 'shape', ()))}"
                )
            if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
                raise TypeError(f"targets must be integer token ids (-100 = ignore), got {targets.dtype}")
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != shape:
                raise ValueError(
                    f"attention_mask must have the shape of input_ids {shape} (True = real token), got "
                    f"{tuple(getattr(attention_mask, 'shape', ()))}"
                )
            if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
                raise TypeError(
                    f"attention_mask must be bool or 0/1 integers (True = real token), got "
                    f"{attention_mask.dtype}; an additive float mask (0 / -inf) is not accepted"
                )
        if hash_ids is not None:
            for idx, eng in self.engram_layers.items():
                ids = hash_ids.get(idx) if isinstance(hash_ids, dict) else None
                want = (*shape, eng.config.num_heads_total)
                if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != want or ids.dtype != torch.int64:
                    raise ValueError(
                        f"hash_ids[{idx}] must be an int64 tensor [B, T, (N-1)K] = {list(want)} (from "
                        f"model.hash_tokens(input_ids)), got {getattr(ids, 'dtype', None)} "
                        f"{tuple(getattr(ids, 'shape', ())) if ids is not None else 'nothing'}"
                    )
        if validation_enabled() and input_ids.numel():
            self._check_values(input_ids, targets)

    @torch.compiler.disable  # a host read: runs eagerly before a compiled graph instead of breaking it
    def _check_values(self, input_ids: torch.Tensor, targets: torch.Tensor | None) -> None:
        v = self.cfg.vocab_size
        lo, hi = torch.aminmax(input_ids)
        stats = [lo, hi]
        if targets is not None:
            kept = targets != -100
            stats += [kept.sum(), ((targets < 0) & kept).sum() + (targets >= v).sum()]
        lo, hi, *tgt = torch.stack([x.to(torch.int64) for x in stats]).tolist()  # the one host read
        if lo < 0 or hi >= v:
            raise ValueError(
                f"input_ids must lie in [0, {v}); got range [{lo}, {hi}] — was the data tokenised "
                f"with a different tokenizer?"
            )
        if tgt and tgt[1]:
            raise ValueError(f"{tgt[1]} targets lie outside [0, {v}) and are not the ignore index -100")
        if tgt and tgt[0] == 0:
            raise ValueError(
                "every target is -100 (ignored): the mean loss would be NaN; pass at least one real "
                "next-token id, or no targets for logits only"
            )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        state: DecodeState | None = None,
        hash_ids: dict[int, torch.Tensor] | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """Logits for ``input_ids`` [B, T] (and the mean cross-entropy against ``targets``, -100 = ignore).

        ``attention_mask`` [B, T] marks real tokens (False = left padding). With ``state`` the call continues a
        cached sequence (generation); the state is updated in place. ``hash_ids`` may be passed precomputed.
        Arguments are checked once here (:meth:`check_inputs`); nothing below reads a device value back.
        """
        self.check_inputs(input_ids, targets, attention_mask, hash_ids)
        return self.forward_checked(
            input_ids,
            targets,
            attention_mask=attention_mask,
            state=state,
            hash_ids=hash_ids,
            output_hidden_states=output_hidden_states,
        )

    def forward_checked(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        state: DecodeState | None = None,
        hash_ids: dict[int, torch.Tensor] | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        """:meth:`forward` for arguments the caller has already checked (``generate`` feeds back sampled ids)."""
        b, t = input_ids.shape
        dev = input_ids.device
        token_mask = attention_mask.to(torch.bool) if attention_mask is not None else None
        if state is not None:
            if state.next_pos is not None and state.next_pos.shape[0] != b:
                raise ValueError(
                    f"this DecodeState continues a batch of {state.next_pos.shape[0]} sequences, got "
                    f"{b}; start a new one with model.new_state()"
                )
            if state.length + t > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {state.length + t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            start = state.next_pos if state.next_pos is not None else torch.zeros(b, dtype=torch.long, device=dev)
            if token_mask is None:
                positions = start[:, None] + torch.arange(t, device=dev)
                state.next_pos = start + t
            else:
                real = token_mask.long()
                positions = start[:, None] + real.cumsum(1) - real
                state.next_pos = positions[:, -1] + real[:, -1]
            if token_mask is not None or state.key_mask is not None:  # padding seen: keep masking the keys
                old = (
                    state.key_mask
                    if state.key_mask is not None
                    else torch.ones(b, state.length, dtype=torch.bool, device=dev)
                )
                new = token_mask if token_mask is not None else torch.ones(b, t, dtype=torch.bool, device=dev)
                state.key_mask = torch.cat([old, new], dim=1)
            key_mask_arg = state.key_mask
            state.length += t
        else:
            if t > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {t} tokens exceeds max_seq_len {self.cfg.max_seq_len}")
            if token_mask is None:
                positions = torch.arange(t, device=dev).expand(b, t)
                key_mask_arg = None
            else:
                positions = (token_mask.long().cumsum(1) - 1).clamp_min(0)
                key_mask_arg = token_mask

        pending = None  # a decode step whose token each Engram layer hashes inside its fused kernel
        if self.hasher is not None and (hash_ids is None or state is not None):
            history = None
            if state is not None:
                history = state.history if state.history is not None else self.hasher.initial_history(b, dev)
            if history is not None and t == 1 and hash_ids is None and input_ids.dtype == torch.int64:
                # a decode step of sampled ids: compress, hash and roll the history in one pass
                if state.kernel_hashing is None:
                    state.kernel_hashing = self._hashes_in_kernels(dev)
                if state.kernel_hashing and decode_kernels.cpu_kernels_enabled() and not torch.compiler.is_compiling():
                    pending = state.pending
                    if pending is None or pending.history is not history:  # (a history set by anyone else)
                        pending = state.pending = PendingStep(self.hasher, history)
                    pending.start(input_ids)
                else:
                    hash_ids, state.history = self.hasher.hash_next_token(history, input_ids)
            else:
                compressed = self.hasher.compress(input_ids, check=False)  # the caller has checked the ids
                if history is None:
                    hash_ids = self.hasher.hash(compressed)
                elif hash_ids is None:
                    hash_ids, state.history = self.hasher.hash_continued(history, compressed)
                else:
                    state.history = self.hasher.advance_history(history, compressed)
        if pending is None:
            for blk in self.blocks:  # addresses are known now: start fetching offloaded rows
                if blk.engram is not None:
                    blk.engram.table.prefetch(hash_ids[blk.idx])

        x = self.tok_emb(input_ids)
        if self.overencoding is not None:
            oe = self.overencoding
            hist = (
                None
                if state is None
                else (state.oe_history if state.oe_history is not None else oe.hasher.initial_history(b, dev))
            )
            x = oe(x, oe.hash(input_ids, hist))
            if state is not None:
                state.oe_history = oe.hasher.advance_history(hist, input_ids)
        x = expand_streams(x, self.cfg.hc_mult)
        hidden = [] if output_hidden_states else None
        for blk in self.blocks:
            eng_state = None
            if state is not None and blk.engram is not None:
                eng_state = state.engram.setdefault(blk.idx, {})
            x = blk(
                x,
                positions,
                pending if pending is not None else None if hash_ids is None else hash_ids.get(blk.idx),
                token_mask,
                key_mask_arg,
                None if state is None else state.kv[blk.idx],
                eng_state,
            )
            if hidden is not None:
                hidden.append(reduce_streams(x))
        if pending is not None:
            state.history = pending.next_history()
        logits = self.lm_head(self.norm(reduce_streams(x)))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long(), ignore_index=-100)
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden)
