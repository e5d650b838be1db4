import math

import pytest
import torch

from engram.model.attention import (
    Attention,
    LayerKVCache,
    MLAttention,
    RotaryEmbedding,
    apply_rope,
    build_attention,
)
from engram.model.config import ModelConfig

D = 32
VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="mha", num_kv_heads=2),
    "mqa": dict(attention="mha", num_kv_heads=1),
    "mla": dict(attention="mla"),
    "mla_qlora": dict(attention="mla", q_lora_rank=12),
}


def make_cfg(**overrides) -> ModelConfig:
    base = dict(
        family="dense",
        vocab_size=64,
        hidden_size=D,
        num_layers=1,
        num_heads=4,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_attn(variant: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_attention(make_cfg(**VARIANTS[variant]))


def positions_for(b: int, t: int) -> torch.Tensor:
    return torch.arange(t).expand(b, t)


def left_padded_batch(pads: list[int], t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key_mask (True = real token) and positions (0 at the first real token) for left-padded rows."""
    slots = torch.arange(t).unsqueeze(0)
    pad = torch.tensor(pads).unsqueeze(1)
    return slots >= pad, (slots - pad).clamp_min(0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_build_attention_picks_the_configured_class(variant):
    expected = MLAttention if VARIANTS[variant]["attention"] == "mla" else Attention
    assert type(make_attn(variant)) is expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_perturbing_a_future_token_never_changes_past_outputs(variant):
    attn = make_attn(variant)
    x = torch.randn(2, 8, D)
    pos = positions_for(2, 8)
    with torch.no_grad():
        y = attn(x, pos)
        x2 = x.clone()
        x2[:, 5] += torch.randn(2, D)
        y2 = attn(x2, pos)
    torch.testing.assert_close(y2[:, :5], y[:, :5], atol=1e-6, rtol=0)
    assert (y2[:, 5:] - y[:, 5:]).abs().amax(-1).min() > 1e-4  # every later position does see the change


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_true_key_mask_equals_the_causal_fast_path(variant):
    attn = make_attn(variant)
    x = torch.randn(2, 6, D)
    pos = positions_for(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            attn(x, pos, key_mask=torch.ones(2, 6, dtype=torch.bool)), attn(x, pos), atol=1e-6, rtol=1e-5
        )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_step_by_step_equals_full_forward(variant):
    attn = make_attn(variant)
    x = torch.randn(2, 9, D)
    pos = positions_for(2, 9)
    cache = LayerKVCache()
    with torch.no_grad():
        full = attn(x, pos)
        # prefill 3, then single steps, then a chunk of 2 after a non-empty cache, then single steps
        chunks = [(0, 3), (3, 4), (4, 5), (5, 7), (7, 8), (8, 9)]
        steps = [attn(x[:, a:b], pos[:, a:b], cache=cache) for a, b in chunks]
    assert cache.length == 9
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_of_left_padded_batch_equals_full_forward(variant):
    attn = make_attn(variant)
    pads, t, prefill = [0, 2, 4], 8, 5
    key_mask, pos = left_padded_batch(pads, t)
    x = torch.randn(3, t, D)
    cache = LayerKVCache()
    with torch.no_grad():
        full = attn(x, pos, key_mask=key_mask)
        steps = [attn(x[:, :prefill], pos[:, :prefill], cache=cache, key_mask=key_mask[:, :prefill])]
        for i in range(prefill, t):
            steps.append(attn(x[:, i : i + 1], pos[:, i : i + 1], cache=cache, key_mask=key_mask[:, : i + 1]))
    stepped = torch.cat(steps, dim=1)
    assert torch.isfinite(full).all() and torch.isfinite(stepped).all()  # padding queries must not give NaN
    torch.testing.assert_close(stepped[key_mask], full[key_mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_left_padded_row_equals_the_same_sequence_unpadded(variant):
    attn = make_attn(variant)
    seq = torch.randn(1, 5, D)
    padded = torch.cat((torch.randn(1, 3, D), seq), dim=1)  # 3 garbage padding tokens in front
    key_mask, pos = left_padded_batch([3], 8)
    with torch.no_grad():
        alone = attn(seq, positions_for(1, 5))
        in_batch = attn(padded, pos, key_mask=key_mask)
    torch.testing.assert_close(in_batch[:, 3:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_mha_whose_kv_heads_are_copies_of_the_shared_heads(num_kv_heads):
    torch.manual_seed(0)
    gqa = Attention(make_cfg(num_kv_heads=num_kv_heads))
    mha = Attention(make_cfg())
    d, group = gqa.head_dim, 4 // num_kv_heads
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        # query head h reads kv head h // group
        mha.wk.weight.copy_(gqa.wk.weight.view(num_kv_heads, d, D).repeat_interleave(group, 0).reshape(4 * d, D))
        mha.wv.weight.copy_(gqa.wv.weight.view(num_kv_heads, d, D).repeat_interleave(group, 0).reshape(4 * d, D))
        x = torch.randn(2, 6, D)
        pos = positions_for(2, 6)
        torch.testing.assert_close(gqa(x, pos), mha(x, pos), atol=1e-5, rtol=1e-5)
    assert gqa.wk.weight.shape == (num_kv_heads * d, D)


def test_gqa_cache_stores_only_the_kv_heads():
    attn = Attention(make_cfg(num_kv_heads=1))
    cache = LayerKVCache()
    with torch.no_grad():
        attn(torch.randn(2, 5, D), positions_for(2, 5), cache=cache)
    k, v = cache.tensors
    assert k.shape == v.shape == (2, 5, 1, attn.head_dim)


def test_mla_cache_stores_the_latent_and_shared_rope_key_not_full_kv():
    cfg = make_cfg(attention="mla")
    attn = MLAttention(cfg)
    cache = LayerKVCache()
    with torch.no_grad():
        attn(torch.randn(2, 5, D), positions_for(2, 5), cache=cache)
        attn(torch.randn(2, 1, D), torch.full((2, 1), 5), cache=cache)
    c_kv, k_rope = cache.tensors
    assert c_kv.shape == (2, 6, cfg.kv_lora_rank)
    assert k_rope.shape == (2, 6, 1, cfg.qk_rope_head_dim)


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_equals_the_explicit_latent_attention_equations(q_lora_rank):
    torch.manual_seed(0)
    cfg = make_cfg(attention="mla", q_lora_rank=q_lora_rank)
    attn = MLAttention(cfg)
    b, t, h = 2, 5, cfg.num_heads
    nope, rope, vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    x = torch.randn(b, t, D)
    pos = positions_for(b, t) + 7
    with torch.no_grad():
        q = attn.wq_b(attn.q_norm(attn.wq_a(x))) if q_lora_rank else attn.wq(x)
        q = q.view(b, t, h, nope + rope)
        latent = x @ attn.wkv_a.weight.T
        c_kv, k_r = latent[..., : cfg.kv_lora_rank], latent[..., cfg.kv_lora_rank :]
        c_kv = c_kv * torch.rsqrt(c_kv.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * attn.kv_norm.weight
        kv = (c_kv @ attn.wkv_b.weight.T).view(b, t, h, nope + vd)
        cos, sin = RotaryEmbedding(rope, cfg.rope_theta)(pos)
        q_r = apply_rope(q[..., nope:], cos, sin)
        k_r = apply_rope(k_r.unsqueeze(2), cos, sin).expand(b, t, h, rope)
        scores = (
            torch.einsum("bihd,bjhd->bhij", q[..., :nope], kv[..., :nope]) + torch.einsum("bihd,bjhd->bhij", q_r, k_r)
        ) / math.sqrt(nope + rope)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        o = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), kv[..., nope:])
        expected = attn.wo(o.reshape(b, t, h * vd))
        torch.testing.assert_close(attn(x, pos), expected, atol=1e-5, rtol=1e-5)


def test_rope_attention_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[pq]]))
        ck, sk = rope(torch.tensor([[pk]]))
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(9, 4), score(105, 100), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(9, 4), score(9, 5), atol=1e-3)
    cos, sin = rope(torch.tensor([[3]]))
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(), q.norm())  # a rotation keeps the norm


def test_bad_inputs_raise_clear_errors():
    attn = make_attn("gqa")
    x = torch.randn(2, 4, D)
    with pytest.raises(ValueError, match="key_mask must be bool"):
        attn(x, positions_for(2, 4), key_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask must be bool"):
        attn(x, positions_for(2, 4), key_mask=torch.ones(2, 4))
    with pytest.raises(TypeError, match="integer"):
        attn(x, positions_for(2, 4).float())
    with pytest.raises(ValueError, match="positions must be"):
        attn(x, positions_for(2, 3))
    with pytest.raises(ValueError, match=r"\[B, T, 32\]"):
        attn(torch.randn(2, 4, 16), positions_for(2, 4))
    cache = LayerKVCache()
    with torch.no_grad():
        attn(x, positions_for(2, 4), cache=cache)
        with pytest.raises(ValueError, match="one layer and one batch"):
            attn(torch.randn(3, 1, D), positions_for(3, 1), cache=cache)
        # with a cache of 4, key_mask must cover 4 + T slots
        with pytest.raises(ValueError, match=r"\(2, 5\)"):
            attn(torch.randn(2, 1, D), positions_for(2, 1), cache=cache, key_mask=torch.ones(2, 1, dtype=torch.bool))


def test_a_padding_query_with_no_valid_key_attends_only_to_itself():
    # torch's CPU kernel would return 0 for an all-masked row, other kernels NaN; the documented rule is "self only"
    attn = make_attn("gqa")
    key_mask, pos = left_padded_batch([2], 4)
    x = torch.randn(1, 4, D)
    with torch.no_grad():
        y = attn(x, pos, key_mask=key_mask)
        v0 = attn.wv(x[0, 0]).view(attn.num_kv_heads, attn.head_dim).repeat_interleave(2, 0)
        torch.testing.assert_close(y[0, 0], attn.wo(v0.reshape(-1)), atol=1e-6, rtol=1e-5)
