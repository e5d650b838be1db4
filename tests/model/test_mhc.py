import pytest
import torch

from engram.model.config import ModelConfig
from engram.model.mhc import (
    HyperConnection,
    PlainResidual,
    build_residual,
    expand_streams,
    reduce_streams,
    sinkhorn_knopp,
)

D = 16


def make_hc(m: int = 4, seed: int = 0) -> HyperConnection:
    torch.manual_seed(seed)
    return HyperConnection(D, m, sinkhorn_iters=20, eps=1e-6)


def sublayer(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())


def assert_doubly_stochastic(h: torch.Tensor, tol: float = 1e-4) -> None:
    assert (h >= 0).all()
    torch.testing.assert_close(h.sum(-1), torch.ones(h.shape[:-1]), atol=tol, rtol=0)
    torch.testing.assert_close(h.sum(-2), torch.ones(h.shape[:-2] + h.shape[-1:]), atol=tol, rtol=0)


@pytest.mark.parametrize("m", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_h_res_is_doubly_stochastic_for_random_inputs(m, seed):
    hc = make_hc(m, seed)
    torch.manual_seed(100 + seed)
    scale = 10.0 ** torch.empty(3, 5, 1, 1).uniform_(-2, 2)  # streams of very different magnitudes
    x = torch.randn(3, 5, m, D) * scale
    with torch.no_grad():
        _, _, h_res = hc.mixing_matrices(x)
    assert h_res.shape == (3, 5, m, m)
    assert_doubly_stochastic(h_res)


def test_sinkhorn_knopp_projects_random_logits_onto_doubly_stochastic_matrices():
    torch.manual_seed(0)
    logits = torch.randn(200, 4, 4) * 0.5 + 3.0
    assert_doubly_stochastic(sinkhorn_knopp(logits, iters=20, eps=1e-6), tol=1e-5)
    with pytest.raises(ValueError, match="at least 1 iteration"):
        sinkhorn_knopp(logits, iters=0)


def test_h_pre_is_in_0_1_and_h_post_in_0_2():
    hc = make_hc()
    with torch.no_grad():
        hc.alpha_pre.fill_(5.0)
        hc.alpha_post.fill_(5.0)
        h_pre, h_post, _ = hc.mixing_matrices(torch.randn(4, 6, 4, D))
    assert ((h_pre > 0) & (h_pre < 1)).all() and ((h_post > 0) & (h_post < 2)).all()
    assert h_pre.std() > 0.05 and h_post.std() > 0.05  # input-dependent once alpha is not small


def test_initial_mixing_is_mean_read_in_full_write_out_and_identity_leaning_h_res():
    hc = make_hc()
    with torch.no_grad():
        h_pre, h_post, h_res = hc.mixing_matrices(torch.randn(2, 3, 4, D))
    torch.testing.assert_close(h_pre, torch.full_like(h_pre, 0.25), atol=0.01, rtol=0)
    torch.testing.assert_close(h_post, torch.ones_like(h_post), atol=0.02, rtol=0)
    diag = h_res.diagonal(dim1=-2, dim2=-1)
    assert (diag > 0.75).all() and (h_res.sum(-1) - diag < 0.25).all()


def test_mhc_at_init_on_equal_streams_is_a_standard_residual():
    hc, f = make_hc(), sublayer()
    h = torch.randn(2, 5, D)
    x = expand_streams(h, 4)
    with torch.no_grad():
        for alpha in (hc.alpha_pre, hc.alpha_post, hc.alpha_res):
            alpha.zero_()  # static part only: exact
        h_in, ctx = hc.pre(x)
        torch.testing.assert_close(h_in, h)
        torch.testing.assert_close(reduce_streams(hc.post(x, f(h_in), ctx)), h + f(h))
        hc.reset_parameters()  # default small alpha: close
        h_in, ctx = hc.pre(x)
        torch.testing.assert_close(reduce_streams(hc.post(x, f(h_in), ctx)), h + f(h), atol=0.05, rtol=0.05)


def test_post_computes_h_res_x_plus_h_post_transposed_out():
    hc = make_hc()
    x, out = torch.randn(2, 3, 4, D), torch.randn(2, 3, D)
    with torch.no_grad():
        h_pre, h_post, h_res = hc.mixing_matrices(x)
        h_in, ctx = hc.pre(x)
        y = hc.post(x, out, ctx)
    b, t = 1, 2
    torch.testing.assert_close(h_in[b, t], h_pre[b, t] @ x[b, t])
    torch.testing.assert_close(y[b, t], h_res[b, t] @ x[b, t] + torch.outer(h_post[b, t], out[b, t]))


def test_residual_mixing_conserves_the_sum_over_streams():
    # columns of H_res sum to 1, so with a zero sublayer output the streams' sum is unchanged
    hc = make_hc()
    x = torch.randn(2, 3, 4, D)
    with torch.no_grad():
        hc.alpha_res.fill_(1.0)
        h_in, ctx = hc.pre(x)
        y = hc.post(x, torch.zeros_like(h_in), ctx)
    torch.testing.assert_close(y.sum(-2), x.sum(-2), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, x, atol=1e-2)


def test_plain_residual_equals_x_plus_f_of_x():
    res, f = PlainResidual(D), sublayer()
    h = torch.randn(2, 5, D)
    x = expand_streams(h, 1)
    h_in, ctx = res.pre(x)
    assert torch.equal(h_in, h)
    y = res.post(x, f(h_in), ctx)
    assert y.shape == (2, 5, 1, D)
    torch.testing.assert_close(reduce_streams(y), h + f(h))
    assert list(res.parameters()) == []


@pytest.mark.parametrize("m", [1, 4])
def test_build_residual_keeps_the_stream_shapes(m):
    cfg = ModelConfig(family="dense", vocab_size=64, hidden_size=D, num_layers=1, num_heads=2, hc_mult=m)
    res = build_residual(cfg)
    assert isinstance(res, PlainResidual if m == 1 else HyperConnection)
    h = torch.randn(2, 5, D)
    x = expand_streams(h, m)
    assert x.shape == (2, 5, m, D)
    h_in, ctx = res.pre(x)
    assert h_in.shape == (2, 5, D)
    y = res.post(x, h_in, ctx)
    assert y.shape == (2, 5, m, D)
    assert reduce_streams(y).shape == (2, 5, D)
    h_pre, h_post, h_res = res.mixing_matrices(x)
    assert h_pre.shape == h_post.shape == (2, 5, m) and h_res.shape == (2, 5, m, m)


def test_gradient_reaches_every_mhc_parameter():
    hc, f = make_hc(), sublayer()
    x = torch.randn(2, 5, 4, D, requires_grad=True)
    h_in, ctx = hc.pre(x)
    (hc.post(x, f(h_in), ctx) * torch.randn(2, 5, 4, D)).sum().backward()
    names = {n for n, _ in hc.named_parameters()}
    assert names == {f"{k}_{p}" for k in ("phi", "alpha", "b") for p in ("pre", "post", "res")}
    for name, p in hc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_bad_shapes_raise_clear_errors():
    hc = make_hc()
    with pytest.raises(ValueError, match=r"M=4, D=16"):
        hc.pre(torch.randn(2, 3, 2, D))
    with pytest.raises(ValueError, match="sublayer output"):
        x = torch.randn(2, 3, 4, D)
        hc.post(x, torch.randn(2, 3, D + 1), hc.pre(x)[1])
    with pytest.raises(ValueError, match="PlainResidual"):
        HyperConnection(D, 1)
    with pytest.raises(ValueError, match="M=1"):
        PlainResidual(D).pre(torch.randn(2, 3, 4, D))
