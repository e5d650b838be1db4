"""Inputs that only look right are refused: a tensor with the right number of elements but the wrong shape, values
that would make the loss NaN or index out of range, state from another batch."""

from __future__ import annotations

import pytest
import torch

import engram
from engram import CompressedTokenizer, ShortConv
from engram.model import EngramLM
from engram.model.generate import SamplingConfig, generate, sample_next

from ..conftest import tiny_model_config

V, B, T = 96, 2, 6


@pytest.fixture(scope="module")
def model() -> EngramLM:
    cfg = tiny_model_config(vocab_size=V, hc_mult=2)
    torch.manual_seed(0)
    return EngramLM(cfg, CompressedTokenizer.identity(V)).eval()


def ids(*shape: int) -> torch.Tensor:
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(0))


def test_targets_must_have_the_shape_of_input_ids(model):
    x = ids(B, T)
    model(x, ids(B, T))  # fine
    for bad in (ids(B * T), ids(T, B), ids(B, T, 1)):
        with pytest.raises(ValueError, match="targets must have the shape of input_ids"):
            model(x, bad)
    with pytest.raises(TypeError, match="targets must be integer"):
        model(x, ids(B, T).float())


def test_every_target_ignored_is_refused_not_a_silent_nan(model):
    x = ids(B, T)
    with pytest.raises(ValueError, match="every target is -100"):
        model(x, torch.full((B, T), -100))
    partly = ids(B, T)
    partly[:, :-1] = -100
    assert torch.isfinite(model(x, partly).loss)
    engram.set_validation(False)  # documented: without the value checks the mean over nothing is NaN
    try:
        assert torch.isnan(model(x, torch.full((B, T), -100)).loss)
    finally:
        engram.set_validation(True)


def test_targets_out_of_range_are_refused(model):
    x = ids(B, T)
    for value in (V, -1, -7):
        bad = ids(B, T)
        bad[0, 0] = value
        with pytest.raises(ValueError, match="targets lie outside"):
            model(x, bad)


def test_attention_mask_shape_and_kind(model):
    x = ids(B, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    model(x, attention_mask=mask)
    model(x, attention_mask=mask.long())  # 0/1 integers are fine
    for bad in (mask.reshape(T, B), mask.reshape(-1), mask[:, :-1]):
        with pytest.raises(ValueError, match="attention_mask must have the shape"):
            model(x, attention_mask=bad)
    with pytest.raises(TypeError, match="additive float mask"):
        model(x, attention_mask=torch.zeros(B, T))


def test_hash_ids_per_layer_must_be_b_t_heads(model):
    x = ids(B, T)
    good = model.hash_tokens(x)
    torch.testing.assert_close(model(x, hash_ids=good).logits, model(x).logits)
    h = good[1]
    for bad in (
        h.reshape(B, -1, T).contiguous(),
        h.reshape(T, B, -1),
        h.reshape(B, T * h.shape[-1]),
        h.transpose(0, 1),
    ):
        with pytest.raises(ValueError, match=r"hash_ids\[1\] must be an int64 tensor"):
            model(x, hash_ids={1: bad})
    with pytest.raises(ValueError, match=r"hash_ids\[1\]"):
        model(x, hash_ids={})  # a layer missing
    with pytest.raises(ValueError, match=r"hash_ids\[1\]"):
        model(x, hash_ids={1: h.to(torch.int32)})


def test_input_ids_shape_dtype_and_range(model):
    for bad in (ids(B * T), ids(B, T, 1)):
        with pytest.raises(ValueError, match="input_ids must be a \\[batch, seq\\]"):
            model(bad)
    with pytest.raises(TypeError, match="integer token ids"):
        model(ids(B, T).float())
    with pytest.raises(ValueError, match="must lie in"):
        model(torch.full((B, T), V))


def test_engram_hidden_must_be_b_t_m_d(model):
    eng = model.blocks[1].engram
    x = ids(B, T)
    hash_ids = model.hash_tokens(x)[1]
    m, d = eng.hc_mult, eng.hidden_size
    eng(torch.randn(B, T, m, d), hash_ids=hash_ids)
    for shape in ((B, T, m * d), (B * T, m, d), (B, T, d, m), (B, m, T, d)):
        with pytest.raises(ValueError, match="hidden must be|hash_ids must be"):
            eng(torch.randn(*shape), hash_ids=hash_ids)
    with pytest.raises(ValueError, match="mask must be bool"):
        eng(torch.randn(B, T, m, d), hash_ids=hash_ids, mask=torch.ones(T, B, dtype=torch.bool))


def test_short_conv_input_and_state_shapes():
    sc = ShortConv(8, 2, 4, 3)
    y, state = sc(torch.randn(B, T, 2, 8))
    assert state.shape == (B, 9, 16)
    with pytest.raises(ValueError, match="ShortConv input"):
        sc(torch.randn(B, T, 16))
    with pytest.raises(ValueError, match="ShortConv state"):
        sc(torch.randn(B, 1, 2, 8), state=state.reshape(B, 16, 9))
    with pytest.raises(ValueError, match="ShortConv state"):
        sc(torch.randn(B + 1, 1, 2, 8), state=state)


def test_decode_state_of_another_batch_is_refused(model):
    state = model.new_state()
    model(ids(B, T), state=state)
    with pytest.raises(ValueError, match="DecodeState continues a batch of 2"):
        model(ids(B + 1, 1), state=state)


def test_generate_checks_prompts_on_the_host(model):
    with pytest.raises(ValueError, match="token ids must be ints in"):
        generate(model, [[1, 2, V]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="token ids must be ints in"):
        generate(model, [[1, -1]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(TypeError, match="plain lists"):
        generate(model, [torch.tensor([1, 2])], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1], []], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"logits must be \[batch, vocab\]"):
        sample_next(torch.randn(B, 1, V), SamplingConfig())
