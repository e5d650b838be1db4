"""With validation off, a forward + backward reads nothing back to the host, and Engram adds no read to its MoE.

Every Python-level way to turn a tensor value into a host value is counted while the model runs (``.item()``,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()`` / ``int()`` / ``float()`` / ``index()`` of a tensor, ...).
On a GPU each one is a stream synchronisation; on the CPU the count is the same, so CPU tests can check it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engram import CompressedTokenizer
from engram.model import EngramLM, ModelConfig
from engram.model.generate import SamplingConfig, generate

from ..conftest import count_host_reads, tiny_model_config


def base_cfg(**kw) -> ModelConfig:
    return tiny_model_config(family="moe", num_layers=3, engram=None, **kw)


def engram_cfg(**kw) -> ModelConfig:
    eng = dataclasses.replace(tiny_model_config().engram, layer_ids=[1, 2])
    return tiny_model_config(num_layers=3, engram=eng, **kw)


def build(cfg: ModelConfig) -> EngramLM:
    torch.manual_seed(0)
    tok = CompressedTokenizer.identity(cfg.vocab_size) if cfg.family == "engram" else None
    return EngramLM(cfg, tok).train()


def reads_in_step(model: EngramLM, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    x = torch.randint(0, model.cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    model(x[:, :-1], x[:, 1:])  # warm-up (first-call caches)
    with count_host_reads() as seen:
        loss = model(x[:, :-1], x[:, 1:]).loss
        loss.backward()
    return seen


@pytest.mark.parametrize("attention", ["mha", "mla"])
@pytest.mark.parametrize("hc", [1, 4])
def test_engram_and_moe_forward_backward_read_nothing_back(no_validation, monkeypatch, attention, hc):
    kw = dict(attention=attention, hc_mult=hc)
    if attention == "mla":
        kw.update(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    moe = reads_in_step(build(base_cfg(**kw)), monkeypatch)
    eng = reads_in_step(build(engram_cfg(**kw)), monkeypatch)
    assert moe == [] and eng == []


def test_the_counter_sees_reads_and_validation_costs_one_read_per_entry(monkeypatch):
    """The counter is not blind: with validation on, the model's entry check is counted (once for the forward),
    and so are the hasher's and the table's checks of their own public entry points."""
    with count_host_reads() as seen:
        torch.ones(2).sum().item()
        bool(torch.ones(1))
    assert seen == ["item", "__bool__"]
    moe = reads_in_step(build(base_cfg()), monkeypatch)
    assert moe.count("tolist") == 1 and len(moe) == 1
    assert len(reads_in_step(build(engram_cfg()), monkeypatch)) >= 1


def test_greedy_decoding_reads_back_once(no_validation, monkeypatch, decode_path):
    """Sampling loop without EOS: the tokens come back to the host once, at the end. The fused CPU kernels
    (CPU tensors only) hand the kernels numpy views of CPU memory (``.numpy()``, no copy); nothing else is read."""
    model = build(engram_cfg()).eval()
    prompts = [[3, 4, 5], [7, 8, 9]]
    generate(model, prompts, SamplingConfig(max_new_tokens=2, temperature=0.0))
    with count_host_reads() as seen:
        out = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert [len(o) for o in out] == [6, 6]
    if decode_path == "kernel":
        assert "numpy" in seen
        seen = [name for name in seen if name != "numpy"]
    assert seen == ["tolist"]
