import pytest
import torch
import torch.nn.functional as F

from engram.model.config import ModelConfig
from engram.model.ffn import MoE, SwiGLU, build_ffn

D, E, I, K = 16, 6, 8, 2


def make_cfg(**overrides) -> ModelConfig:
    base = dict(
        family="moe",
        vocab_size=64,
        hidden_size=D,
        num_layers=3,
        first_k_dense=1,
        intermediate_size=24,
        n_routed_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=I,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_moe(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    return MoE(make_cfg(**overrides))


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 MoE written token by token, straight from the equations."""
    out = []
    for u in x.reshape(-1, D):
        s = torch.sigmoid(moe.router.weight @ u)
        chosen = torch.topk(s + moe.expert_bias, K).indices
        g = s[chosen] / s[chosen].sum() * moe.routed_scaling_factor
        y = torch.zeros(D)
        for gi, e in zip(g, chosen.tolist()):
            y = y + gi * ((F.silu(u @ moe.w1[e]) * (u @ moe.w3[e])) @ moe.w2[e])
        if moe.shared is not None:
            sh = moe.shared
            y = y + sh.w2.weight @ (F.silu(sh.w1.weight @ u) * (sh.w3.weight @ u))
        out.append(y)
    return torch.stack(out).view(x.shape)


def test_swiglu_is_w2_of_silu_w1_times_w3():
    torch.manual_seed(0)
    f = SwiGLU(D, 24)
    x = torch.randn(3, D)
    expected = (F.silu(x @ f.w1.weight.T) * (x @ f.w3.weight.T)) @ f.w2.weight.T
    torch.testing.assert_close(f(x), expected)
    assert all(m.bias is None for m in (f.w1, f.w2, f.w3))


@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_moe_output_equals_naive_per_token_loop(n_shared):
    moe = make_moe(n_shared_experts=n_shared)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(E) * 0.3)  # a bias that changes some selections
    x = torch.randn(2, 7, D)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference_moe(moe, x), atol=1e-5, rtol=1e-5)


def test_topk_picks_by_biased_score_but_gates_by_unbiased_score():
    moe = make_moe()
    x = torch.randn(20, D)
    with torch.no_grad():
        moe.expert_bias[3] = 10.0  # expert 3 wins every selection through its bias alone
        ids, gates, scores = moe.route(x)
    assert (ids == 3).any(-1).all()
    unbiased = scores.gather(-1, ids)
    torch.testing.assert_close(gates, unbiased / unbiased.sum(-1, keepdim=True) * moe.routed_scaling_factor)
    biased = unbiased + moe.expert_bias[ids]
    assert not torch.allclose(gates, biased / biased.sum(-1, keepdim=True) * moe.routed_scaling_factor)
    torch.testing.assert_close(gates.sum(-1), torch.full((20,), moe.routed_scaling_factor))
    # the other pick is the best unbiased expert among the rest
    masked = scores.clone()
    masked[:, 3] = -1
    assert torch.equal(ids[ids != 3], masked.argmax(-1))


def test_repeated_update_bias_makes_a_skewed_load_more_uniform():
    moe = make_moe(bias_update_rate=0.02)
    x = torch.randn(512, D)
    x[:, 0] = 3.0  # a constant feature the router turns into a large preference for experts 0 and 1
    with torch.no_grad():
        moe.router.weight[:, 0] = torch.tensor([1.5, 1.2, 0.0, 0.0, 0.0, 0.0])
    moe.train()
    with torch.no_grad():
        moe(x)
        before = moe.update_bias()
        for _ in range(150):
            moe(x)
            moe.update_bias()
        moe(x)
        after = MoE.load_stats(moe.load)
    assert before["max_over_mean"] > 2.0  # the router really was skewed
    assert after["cv"] < 0.5 * before["cv"]
    assert after["max_over_mean"] < before["max_over_mean"]
    assert moe.expert_bias[:2].max() < 0 < moe.expert_bias[2:].min()  # the overloaded experts were pushed down


def test_load_is_counted_in_training_only_and_update_bias_clears_it():
    moe = make_moe()
    x = torch.randn(3, 5, D)
    moe.eval()
    with torch.no_grad():
        moe(x)
    assert moe.load.sum() == 0
    stats = moe.update_bias()
    assert torch.equal(moe.expert_bias, torch.zeros(E)) and stats["cv"] != stats["cv"]  # NaN: nothing counted
    moe.train()
    with torch.no_grad():
        moe(x)
    assert moe.load.sum() == 3 * 5 * K
    moe.update_bias()
    assert moe.load.sum() == 0 and moe.expert_bias.abs().sum() > 0
    assert "expert_bias" in moe.state_dict() and "expert_bias" not in dict(moe.named_parameters())


def test_shared_experts_add_their_swiglu_to_the_routed_output():
    with_shared = make_moe(n_shared_experts=2)
    without = MoE(make_cfg(n_shared_experts=0))
    missing, unexpected = without.load_state_dict(with_shared.state_dict(), strict=False)
    assert not missing and all(k.startswith("shared.") for k in unexpected)
    assert with_shared.shared.w1.weight.shape == (2 * I, D)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        delta = with_shared(x) - without(x)
        torch.testing.assert_close(delta, with_shared.shared(x), atol=1e-5, rtol=1e-5)
    assert delta.abs().max() > 1e-3


def test_gradients_reach_router_routed_and_shared_experts():
    moe = make_moe()
    moe(torch.randn(4, 6, D)).square().sum().backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_activated_params_per_token_counts_router_shared_and_top_k_experts():
    moe = make_moe(n_shared_experts=2)
    assert moe.activated_params_per_token() == E * D + 3 * D * 2 * I + K * 3 * D * I
    total = sum(p.numel() for p in moe.parameters())
    assert total == E * D + 3 * D * 2 * I + E * 3 * D * I


def test_build_ffn_gives_dense_leading_blocks_and_moe_after():
    cfg = make_cfg()
    dense = build_ffn(cfg, 0)
    assert isinstance(dense, SwiGLU) and dense.w1.weight.shape == (cfg.intermediate_size, D)
    assert isinstance(build_ffn(cfg, 1), MoE) and isinstance(build_ffn(cfg, 2), MoE)
    assert all(isinstance(build_ffn(cfg.replace(family="dense"), i), SwiGLU) for i in range(3))
    with pytest.raises(ValueError, match="layer_idx"):
        build_ffn(cfg, 3)


def test_moe_rejects_inputs_of_the_wrong_width():
    with pytest.raises(ValueError, match=f"last dim {D}"):
        make_moe()(torch.randn(2, 3, D + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_expert_mm_equals_one_matmul_per_expert_with_gradients(dtype):
    """The grouped expert matmul (F.grouped_mm kernel in float32 on CPU, the per-expert fallback in float64) gives
    each group's x_e @ w_e and the matching gradients, empty groups included."""
    from engram.model.ffn import expert_mm

    gen = torch.Generator().manual_seed(0)
    sizes = [5, 0, 3, 9, 0, 1]
    x = torch.randn(sum(sizes), D, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(len(sizes), D, I, generator=gen, dtype=dtype, requires_grad=True)
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32)
    g = torch.randn(sum(sizes), I, generator=gen, dtype=dtype)
    y = expert_mm(x, w, offs)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ref = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(sizes))])
    rgx, rgw = torch.autograd.grad(ref, (x, w), g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, ref, **tol)
    torch.testing.assert_close(gx, rgx, **tol)
    torch.testing.assert_close(gw, rgw, **tol)
    assert torch.count_nonzero(gw[1]) == 0 and torch.count_nonzero(gw[4]) == 0
