"""Evaluation: validation loss, perplexity, bits per byte, MoE expert load, Engram gate statistics."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from ..model.ffn import MoE
from ..model.model import EngramLM
from .data import TokenFile, bits_per_byte, eval_batches


@contextmanager
def _recording_gates(model: EngramLM) -> Iterator[None]:
    layers = list(model.engram_layers.values())
    for e in layers:
        e.record_gate = True
    try:
        yield
    finally:
        for e in layers:
            e.record_gate = False
            e.last_gate = None


@contextmanager
def _counting_routes(model: EngramLM, counts: dict[int, torch.Tensor]) -> Iterator[None]:
    """Count the experts the router picks in each MoE layer (also in eval mode, where MoE itself does not)."""
    handles = []
    for i, blk in enumerate(model.blocks):
        if isinstance(blk.ffn, MoE):

            def hook(mod: MoE, args, i=i):
                ids, _, _ = mod.route(args[0].reshape(-1, mod.hidden_size))
                c = torch.bincount(ids.reshape(-1), minlength=mod.n_routed_experts).cpu()
                counts[i] = counts.get(i, torch.zeros_like(c)) + c

            handles.append(blk.ffn.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def evaluate(
    model: EngramLM,
    tokens: TokenFile,
    *,
    batch_size: int = 8,
    seq_len: int = 256,
    max_batches: int | None = 50,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict:
    """Mean next-token loss over consecutive validation windows, with perplexity, bits/byte and diagnostics.

    Returns ``{"loss", "ppl", "bpb", "tokens", "expert_load": {layer: {"max_over_mean", "cv"}},
    "gates": {layer: {"mean": [per branch], "open_frac": [per branch]}}}``.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, n = 0.0, 0
    counts: dict[int, torch.Tensor] = {}
    gate_sum: dict[int, torch.Tensor] = {}
    gate_open: dict[int, torch.Tensor] = {}
    gate_n = 0
    with _recording_gates(model), _counting_routes(model, counts):
        for x, y in eval_batches(tokens.tokens, batch_size, seq_len, max_batches):
            x, y = x.to(device), y.to(device)
            with torch.autocast(
                device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                out = model(x, y)
            total += out.loss.item() * y.numel()
            n += y.numel()
            for idx, eng in model.engram_layers.items():
                g = eng.last_gate
                if g is not None:
                    g = g.float().flatten(0, 1)  # [B*T, M]
                    gate_sum[idx] = gate_sum.get(idx, 0) + g.sum(0).cpu()
                    gate_open[idx] = gate_open.get(idx, 0) + (g > 0.5).float().sum(0).cpu()
            gate_n += y.numel()
    model.train(was_training)
    if n == 0:
        raise ValueError("no validation windows: the validation split is shorter than seq_len + 1 tokens")
    loss = total / n
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "bpb": bits_per_byte(loss, n, n * tokens.bytes_per_token),
        "tokens": n,
        "expert_load": {i: MoE.load_stats(c) for i, c in sorted(counts.items())},
        "gates": {
            i: {"mean": (gate_sum[i] / gate_n).tolist(), "open_frac": (gate_open[i] / gate_n).tolist()}
            for i in sorted(gate_sum)
        },
    }


@torch.no_grad()
def gate_trace(model: EngramLM, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per Engram layer, the gate alpha of every token and branch for one sequence ids [1, T] -> [T, M]."""
    was_training = model.training
    model.eval()
    with _recording_gates(model):
        model(ids)
        out = {i: e.last_gate[0].float().cpu() for i, e in model.engram_layers.items()}
    model.train(was_training)
    return out
