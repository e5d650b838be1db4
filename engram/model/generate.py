"""Cached generation: KV cache (latent cache for MLA), incremental Engram hashing, sampling, ragged batches.

Prompts of different lengths are left-padded with the Engram pad token (``cfg.engram.pad_id``, else
``pad_id``): padded slots are masked out of attention and out of Engram's ShortConv, and because the hasher
itself pads sequence starts with that token, every real token gets the hash ids it would get unpadded.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .model import EngramLM


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    eos_id: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from [B, V] logits: greedy, or temperature / top-k / top-p sampling."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab] (the last position's), got {tuple(logits.shape)}")
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the first token always stays)
        drop = probs.cumsum(-1) - probs >= cfg.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_prompts(
    prompts: list[list[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-pad token lists into ids [B, T] and a mask [B, T] (True = real token); the mask is None when every
    prompt has the same length (nothing to mask, so the model keeps its unmasked fast path)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), t, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = torch.as_tensor(p, dtype=torch.long)
        mask[i, t - len(p) :] = True
    if all(len(p) == t for p in prompts):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    """Every prompt a non-empty list of ints in [0, vocab_size), checked on the host (no device read)."""
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            raise TypeError(f"prompt {i} is a tensor; pass plain lists of ints (e.g. ids.tolist())")
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids, got {p!r}")
        bad = [x for x in p if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= x < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} holds {bad[:3]}: token ids must be ints in [0, {vocab_size})")


@torch.no_grad()
def generate(
    model: EngramLM, prompts: list[list[int]], cfg: SamplingConfig | None = None, pad_id: int = 0
) -> list[list[int]]:
    """Continue each prompt; returns the generated tokens per prompt (up to and including EOS).

    The prompts are checked once, on the host; the sampled ids are fed back unchecked (they come from the
    model's own vocabulary), so a step reads nothing back to the host, except one flag per step for early
    stopping when ``cfg.eos_id`` is set. The tokens are copied back once at the end.
    """
    cfg = cfg or SamplingConfig()
    check_prompts(prompts, model.cfg.vocab_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if model.cfg.engram is not None:
        pad_id = model.cfg.engram.pad_id
    ids, mask = pad_prompts(prompts, pad_id, device)
    if ids.shape[1] + cfg.max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"longest prompt ({ids.shape[1]}) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
            f"max_seq_len ({model.cfg.max_seq_len})"
        )
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    state = model.new_state()
    logits = model.forward_checked(ids, attention_mask=mask, state=state).logits[:, -1]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    steps: list[torch.Tensor] = []
    for i in range(cfg.max_new_tokens):
        nxt = sample_next(logits, cfg, generator)
        steps.append(nxt)
        if cfg.eos_id is not None:
            done |= nxt == cfg.eos_id
            if bool(done.all()):
                break
        if i + 1 < cfg.max_new_tokens:
            logits = model.forward_checked(nxt[:, None], state=state).logits[:, -1]
    model.train(was_training)
    tokens = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    if cfg.eos_id is not None:  # keep each row up to and including its first EOS
        tokens = [row[: row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row for row in tokens]
    return tokens
