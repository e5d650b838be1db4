"""YaRN context extension: plain RoPE is unchanged, the frequencies and temperature follow YaRN's definitions, and a
model extended to a longer context decodes with its cache exactly as a full recompute."""

import math

import numpy as np
import pytest
import torch

from engram import CompressedTokenizer, EngramConfig
from engram.model import EngramLM, ModelConfig, generate, load_model, save_model
from engram.model.attention import Attention, MLAttention, RotaryEmbedding, yarn_mscale, yarn_ramp_bounds
from engram.model.config import RopeScaling
from engram.model.generate import SamplingConfig

V = 120


def todays_rope(dim: int, base: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE as this package computed it before YaRN existed (the reference for bit-exactness)."""
    exponent = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    angles = positions.to(torch.float32).unsqueeze(-1) * base**-exponent
    return angles.cos(), angles.sin()


def yarn_reference(dim: int, base: float, length: int, s: float, beta_fast: float, beta_slow: float) -> list[float]:
    """YaRN's NTK-by-parts frequencies written from the rotation counts, in float64: pair i rotates
    ``r_i = L / (2 pi base^(2i/dim))`` times over the pre-training context; the ramp starts at the last pair that
    still rotates at least beta_fast times and ends at the first that rotates at most beta_slow times."""
    pairs = dim // 2
    theta = [base ** (-2 * i / dim) for i in range(pairs)]
    rotations = [length / (2 * math.pi / t) for t in theta]
    low = max([i for i in range(pairs) if rotations[i] >= beta_fast], default=0)
    high = min([i for i in range(pairs) if rotations[i] <= beta_slow], default=pairs - 1)
    out = []
    for i, t in enumerate(theta):
        interp = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)
        out.append(t / s * interp + t * (1 - interp))
    return out


@pytest.mark.parametrize("dim,base", [(8, 10000.0), (64, 10000.0), (16, 500000.0)])
def test_rope_without_scaling_or_with_factor_1_is_todays_rope_bit_for_bit(dim, base):
    positions = torch.arange(300).expand(2, 300)
    want = todays_rope(dim, base, positions)
    for scaling in (None, RopeScaling(factor=1.0, original_max_seq_len=64, mscale=0.707, mscale_all_dim=0.707)):
        got = RotaryEmbedding(dim, base, scaling)(positions)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_model_with_factor_1_scaling_gives_bit_identical_logits(attention):
    cfg = small_cfg(attention)
    torch.manual_seed(0)
    plain = EngramLM(cfg, tokenizer()).eval()
    scaled = EngramLM(cfg.replace(rope_scaling={"factor": 1.0, "original_max_seq_len": 64}), tokenizer()).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, V, (2, 40))
    assert torch.equal(plain(ids).logits, scaled(ids).logits)


def test_config_without_rope_scaling_serialises_as_before():
    d = small_cfg("mha").to_dict()
    assert "rope_scaling" not in d  # old configs and checkpoints compare equal to it
    assert ModelConfig.from_dict(d).rope_scaling is None
    ext = small_cfg("mha", rope_scaling={"factor": 10.0, "original_max_seq_len": 32})
    assert ModelConfig.from_dict(ext.to_dict()) == ext


@pytest.mark.parametrize(
    "dim,base,length,s", [(16, 10000.0, 128, 4.0), (64, 10000.0, 4096, 10.0), (128, 10000.0, 4096, 40.0)]
)
def test_yarn_frequencies_match_an_independent_implementation(dim, base, length, s):
    scaling = RopeScaling(factor=s, original_max_seq_len=length, beta_fast=32.0, beta_slow=1.0)
    got = RotaryEmbedding(dim, base, scaling).inv_freq().double()
    want = torch.tensor(yarn_reference(dim, base, length, s, 32.0, 1.0), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    theta = torch.tensor([base ** (-2 * i / dim) for i in range(dim // 2)], dtype=torch.float64)
    rotations = length * theta / (2 * math.pi)
    fast, slow = rotations > 32.0, rotations < 1.0
    torch.testing.assert_close(got[fast], theta[fast], rtol=2e-6, atol=0)  # high frequencies kept
    torch.testing.assert_close(got[slow], theta[slow] / s, rtol=2e-6, atol=0)  # low frequencies interpolated


def test_ramp_bounds_known_answer_for_a_deepseek_rope_head():
    # qk_rope_head_dim 64, base 10^4, L = 4096: i(32) = 64 ln(4096 / 64 pi) / 2 ln 10^4 = 10.47, i(1) = 22.5
    scaling = RopeScaling(factor=40.0, original_max_seq_len=4096)
    assert yarn_ramp_bounds(64, 10000.0, scaling) == (10.0, 23.0)


def test_mscale_is_yarns_temperature():
    assert yarn_mscale(10.0, 1.0) == pytest.approx(0.1 * math.log(10) + 1)  # sqrt(1/t) of the YaRN paper
    assert yarn_mscale(10.0, 0.707) == pytest.approx(1.162793, abs=1e-6)  # the Engram paper's f = 0.707
    assert yarn_mscale(1.0, 0.707) == 1.0


def test_mha_temperature_on_cos_sin_equals_temperature_on_the_softmax():
    """With every head dim rotary, m on q and k (cos/sin) and m^2 on the softmax scale are the same logits."""
    on_rotary = small_cfg("mha", rope_scaling={"factor": 10.0, "original_max_seq_len": 16, "mscale_all_dim": 0.0})
    on_softmax = small_cfg("mha", rope_scaling={"factor": 10.0, "original_max_seq_len": 16, "mscale_all_dim": 1.0})
    torch.manual_seed(0)
    a = Attention(on_rotary)
    b = Attention(on_softmax)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 24, on_rotary.hidden_size)
    pos = torch.arange(24).expand(2, 24)
    torch.testing.assert_close(a(x, pos), b(x, pos), rtol=1e-5, atol=1e-6)
    assert b.scale == pytest.approx(yarn_mscale(10.0, 1.0) ** 2 * on_softmax.attn_head_dim**-0.5)


def test_mla_temperature_scales_the_whole_logit():
    cfg = small_cfg(
        "mla", rope_scaling={"factor": 10.0, "original_max_seq_len": 16, "mscale": 0.707, "mscale_all_dim": 0.707}
    )
    attn = MLAttention(cfg)
    assert attn.rope.rotary_mscale == 1.0  # DeepSeek-V2: cos/sin untouched ...
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert attn.scale == pytest.approx(yarn_mscale(10.0, 0.707) ** 2 * qk**-0.5)  # ... the nope part scaled too


def tokenizer():
    return CompressedTokenizer.from_lookup(np.arange(V) % 90, "yarn-test-vocab")


def small_cfg(attention: str, **kw) -> ModelConfig:
    return ModelConfig(
        family="engram",
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        attention=attention,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        intermediate_size=64,
        max_seq_len=kw.pop("max_seq_len", 64),
        engram=EngramConfig(
            engram_vocab_size=[61, 67], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1], pad_id=0
        ),
        **kw,
    )


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_cached_decoding_at_the_extended_length_equals_full_recompute(attention):
    """A model pre-trained at 16 tokens, extended 8x to 128: prefill past the old context, then decode to 128."""
    cfg = small_cfg(
        attention,
        max_seq_len=128,
        rope_scaling={"factor": 8.0, "original_max_seq_len": 16, "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    torch.manual_seed(0)
    model = EngramLM(cfg, tokenizer()).eval()
    ids = torch.randint(0, V, (2, 128))
    full = model(ids).logits
    state = model.new_state()
    steps = [model(ids[:, :40], state=state).logits]
    steps += [model(ids[:, t : t + 1], state=state).logits for t in range(40, 128)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids[:, :1], state=state)  # the cache is full at the extended length
    out = generate(model, [ids[0, :100].tolist()], SamplingConfig(max_new_tokens=28, temperature=0))
    assert len(out[0]) == 28


def test_extended_model_saves_and_loads_with_its_scaling(tmp_path):
    cfg = small_cfg("mla", max_seq_len=128, rope_scaling={"factor": 8.0, "original_max_seq_len": 16})
    torch.manual_seed(0)
    model = EngramLM(cfg, tokenizer()).eval()
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert back.cfg.rope_scaling == cfg.rope_scaling
    ids = torch.randint(0, V, (1, 100))
    assert torch.equal(back(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"factor": 0.5}, "factor"),
        ({"type": "linear"}, "type"),
        ({"beta_fast": 1.0, "beta_slow": 32.0}, "beta_slow < beta_fast"),
        ({"original_max_seq_len": 0}, "original_max_seq_len"),
        ({"mscale": -1.0}, "mscale"),
    ],
)
def test_bad_rope_scaling_is_refused_with_the_field_named(bad, match):
    with pytest.raises(ValueError, match=match):
        small_cfg("mha", rope_scaling=bad)
