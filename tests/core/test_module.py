"""Engram module: shapes, identity at init, gate formula, gradients, causality, decoding state, errors, accounting."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram import CompressedTokenizer, Engram, EngramConfig, MultiHeadEmbedding, NgramHasher, ShortConv, engram_counts
from engram.module import ParameterDerived

D = 16


def make(
    m: int = 1,
    *,
    n: int = 3,
    k: int = 2,
    signed_sqrt: bool = True,
    gating: bool = True,
    short_conv: bool = True,
    kernel_size: int = 4,
    layer_ids=(0, 2),
    layer: int = 2,
    seed: int = 0,
    hidden: int = D,
):
    cfg = EngramConfig(
        engram_vocab_size=[31 + 6 * i for i in range(n - 1)],
        max_ngram_size=n,
        n_embed_per_ngram=4 * k,
        n_head_per_ngram=k,
        layer_ids=list(layer_ids),
        pad_id=1,
        signed_sqrt=signed_sqrt,
        gating=gating,
        short_conv=short_conv,
        kernel_size=kernel_size,
    )
    rng = np.random.default_rng(seed)
    lookup = rng.permutation(np.concatenate([np.arange(60), rng.integers(0, 60, 40)]))  # V = 100, V' = 60
    ctok = CompressedTokenizer.from_lookup(lookup, "test")
    hasher = NgramHasher.from_tokenizer(cfg, ctok)
    torch.manual_seed(seed)
    mod = Engram(cfg, layer, hidden, hc_mult=m, hasher=hasher).double()
    return mod, hasher


def randomize_norms(mod: Engram, gen: torch.Generator) -> None:
    with torch.no_grad():
        for norm in [*mod.query_norms, *mod.key_norms]:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen, dtype=norm.weight.dtype) + 0.5)


def randomize_conv(mod: Engram, gen: torch.Generator) -> None:
    with torch.no_grad():
        w = mod.short_conv.conv.weight
        w.copy_(torch.randn(w.shape, generator=gen, dtype=w.dtype))
        for norm in mod.short_conv.norms:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen, dtype=norm.weight.dtype) + 0.5)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float | None) -> torch.Tensor:
    """RMSNorm as nn.RMSNorm defines it: eps None = the machine epsilon of x's dtype."""
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def manual_retrieve(mod: Engram, hash_ids: torch.Tensor) -> torch.Tensor:
    sizes = [p for heads in mod.hasher.table_sizes[mod.layer_id] for p in heads]
    offsets = [sum(sizes[:h]) for h in range(len(sizes))]
    rows = [mod.table.weight[hash_ids[..., h] + offsets[h]] for h in range(len(sizes))]
    return torch.cat(rows, dim=-1)


def manual_gated(mod: Engram, hidden4: torch.Tensor, hash_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha [B, T, M], gated value [B, T, M, D]) from the equations, not from the module's forward."""
    e = manual_retrieve(mod, hash_ids)
    v = e @ mod.value_proj.weight.T + mod.value_proj.bias
    alphas = []
    for m in range(hidden4.shape[2]):
        if not mod.config.gating:
            alphas.append(torch.ones_like(v[..., 0]))
            continue
        key = e @ mod.key_projs[m].weight.T + mod.key_projs[m].bias
        q = rms(hidden4[:, :, m], mod.query_norms[m].weight, mod.config.gate_norm_eps)
        kk = rms(key, mod.key_norms[m].weight, mod.config.gate_norm_eps)
        s = (q * kk).sum(-1) / math.sqrt(mod.hidden_size)
        if mod.config.signed_sqrt:
            s = torch.sign(s) * torch.sqrt(torch.abs(s))
        alphas.append(torch.sigmoid(s))
    alpha = torch.stack(alphas, dim=2)
    return alpha, alpha[..., None] * v[:, :, None, :]


def manual_short_conv(sc: ShortConv, x: torch.Tensor) -> torch.Tensor:
    """SiLU(causal depthwise conv, kernel w, dilation N, over per-branch RMSNorm(x)), by explicit shifts."""
    b, t, m, d = x.shape
    normed = torch.stack([rms(x[:, :, i], sc.norms[i].weight, 1e-5) for i in range(m)], dim=2).reshape(b, t, m * d)
    w = sc.conv.weight[:, 0, :]  # [M*D, kernel]
    out = torch.zeros_like(normed)
    for j in range(sc.kernel_size):
        shift = (sc.kernel_size - 1 - j) * sc.dilation  # tap j reads the position `shift` steps back
        if shift < t:
            out[:, shift:] += normed[:, : t - shift] * w[:, j]
    return F.silu(out).reshape(b, t, m, d)


def inputs(mod: Engram, b: int = 2, t: int = 11, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 100, (b, t), generator=gen)
    hidden = torch.randn(b, t, mod.hc_mult, mod.hidden_size, generator=gen, dtype=torch.float64)
    hash_ids = mod.hasher.hash_tokens(raw)[mod.layer_id]
    return raw, hidden, hash_ids


# ---------------------------------------------------------------------------------------------- shapes / identity


@pytest.mark.parametrize("m", [1, 4])
def test_shapes(m):
    mod, _ = make(m)
    raw, hidden, hash_ids = inputs(mod, b=3, t=7)
    y = mod(hidden, hash_ids=hash_ids)
    assert y.shape == (3, 7, m, D) and y.dtype == torch.float64
    if m == 1:
        y3 = mod(hidden[:, :, 0], hash_ids=hash_ids)
        assert y3.shape == (3, 7, D)
        assert torch.equal(y3, y[:, :, 0])
    assert hash_ids.shape == (3, 7, mod.config.num_heads_total)
    assert mod.retrieve(hash_ids).shape == (3, 7, mod.config.memory_dim)


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("signed_sqrt", [True, False])
def test_zero_init_is_the_gated_value(m, signed_sqrt):
    mod, _ = make(m, signed_sqrt=signed_sqrt)
    assert torch.count_nonzero(mod.short_conv.conv.weight) == 0
    randomize_norms(mod, torch.Generator().manual_seed(1))
    raw, hidden, hash_ids = inputs(mod)
    y = mod(hidden, hash_ids=hash_ids)
    alpha, gated = manual_gated(mod, hidden, hash_ids)
    torch.testing.assert_close(y, gated, rtol=1e-10, atol=1e-12)
    # the gate is doing something: not constant, strictly inside (0, 1)
    assert alpha.std() > 1e-3 and (alpha > 0).all() and (alpha < 1).all()
    if m > 1:  # one shared value, one gate per branch: Y_m / alpha_m is the same for every branch
        ratio = y / alpha[..., None]
        torch.testing.assert_close(ratio, ratio[:, :, :1].expand_as(ratio))
        assert not torch.allclose(alpha[:, :, 0], alpha[:, :, 1])


@pytest.mark.parametrize("m", [1, 3])
def test_gate_formula_signed_sqrt_on_and_off(m):
    results = {}
    for signed in (True, False):
        mod, _ = make(m, signed_sqrt=signed)
        randomize_norms(mod, torch.Generator().manual_seed(2))
        _, hidden, hash_ids = inputs(mod, seed=3)
        mod.record_gate = True
        mod(hidden, hash_ids=hash_ids)
        alpha, _ = manual_gated(mod, hidden, hash_ids)
        torch.testing.assert_close(mod.last_gate, alpha, rtol=1e-10, atol=1e-12)
        e = mod.retrieve(hash_ids)
        keys = torch.stack([p(e) for p in mod.key_projs], dim=2)
        torch.testing.assert_close(mod.gate(hidden, keys)[..., 0], alpha, rtol=1e-10, atol=1e-12)
        results[signed] = alpha
    # same weights (same seed), different formula -> different gates; sigmoid(ssqrt(s)) is further from 1/2
    assert not torch.allclose(results[True], results[False])
    assert ((results[True] - 0.5).abs() >= (results[False] - 0.5).abs() - 1e-12).double().mean() > 0.5


def test_no_gating_means_alpha_one():
    mod, _ = make(2, gating=False)
    _, hidden, hash_ids = inputs(mod)
    y = mod(hidden, hash_ids=hash_ids)
    v = mod.value_proj(manual_retrieve(mod, hash_ids))
    torch.testing.assert_close(y, v[:, :, None].expand(-1, -1, 2, -1))
    assert len(mod.key_projs) == 0


def test_short_conv_matches_explicit_dilated_causal_conv():
    for n, kernel in ((2, 4), (3, 4), (4, 2), (3, 1)):
        sc = ShortConv(6, 2, kernel, n).double()
        gen = torch.Generator().manual_seed(n * 10 + kernel)
        with torch.no_grad():
            sc.conv.weight.copy_(torch.randn(sc.conv.weight.shape, generator=gen, dtype=torch.float64))
            for norm in sc.norms:
                norm.weight.copy_(torch.rand(6, generator=gen, dtype=torch.float64) + 0.5)
        x = torch.randn(2, 13, 2, 6, generator=gen, dtype=torch.float64)
        y = sc(x)[0]
        torch.testing.assert_close(y, manual_short_conv(sc, x), rtol=1e-10, atol=1e-12)


def test_y_with_trained_conv_matches_equations():
    mod, _ = make(2, n=3)
    gen = torch.Generator().manual_seed(4)
    randomize_norms(mod, gen)
    randomize_conv(mod, gen)
    _, hidden, hash_ids = inputs(mod, t=15)
    _, gated = manual_gated(mod, hidden, hash_ids)
    expected = gated + manual_short_conv(mod.short_conv, gated)
    torch.testing.assert_close(mod(hidden, hash_ids=hash_ids), expected, rtol=1e-10, atol=1e-12)


def reference_engram_numpy(mod: Engram, hidden: np.ndarray, hash_ids: np.ndarray, gate_eps: float) -> np.ndarray:
    """The public reference's equations in float64 numpy, position by position, from the module's weights only.

    e_t = concat of every head's row; v = W_V e + b_V; k_m = W_K^(m) e + b_K^(m); alpha_m = sigmoid(ssqrt(
    RMSNorm(h_m) . RMSNorm(k_m) / sqrt(D))) with the gate norms' ``gate_eps``; v~_m = alpha_m v; Y = v~ + SiLU(
    causal depthwise conv, kernel w, dilation N, over RMSNorm_1e-5(v~_m)).
    """

    def w(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    def rmsnorm(x, gain, eps):
        return x / np.sqrt((x * x).mean() + eps) * gain

    sizes = [p for heads in mod.hasher.table_sizes[mod.layer_id] for p in heads]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table = w(mod.table.weight)
    b, t, m, d = hidden.shape
    gated = np.zeros((b, t, m, d))
    for i in range(b):
        for j in range(t):
            e = np.concatenate([table[offsets[h] + hash_ids[i, j, h]] for h in range(len(sizes))])
            v = w(mod.value_proj.weight) @ e + w(mod.value_proj.bias)
            for br in range(m):
                k = w(mod.key_projs[br].weight) @ e + w(mod.key_projs[br].bias)
                q_n = rmsnorm(hidden[i, j, br], w(mod.query_norms[br].weight), gate_eps)
                k_n = rmsnorm(k, w(mod.key_norms[br].weight), gate_eps)
                s = q_n @ k_n / np.sqrt(d)
                alpha = 1 / (1 + np.exp(-np.sign(s) * np.sqrt(abs(s))))
                gated[i, j, br] = alpha * v
    sc = mod.short_conv
    taps = w(sc.conv.weight)[:, 0, :].reshape(m, d, sc.kernel_size)
    y = gated.copy()
    for i in range(b):
        for j in range(t):
            for br in range(m):
                acc = np.zeros(d)
                for tap in range(sc.kernel_size):
                    back = (sc.kernel_size - 1 - tap) * sc.dilation
                    if j - back >= 0:
                        acc += taps[br, :, tap] * rmsnorm(gated[i, j - back, br], w(sc.norms[br].weight), 1e-5)
                y[i, j, br] += acc / (1 + np.exp(-acc))
    return y


@pytest.mark.parametrize("m", [1, 4])
def test_matches_float64_reference_equations_with_default_gate_eps(m):
    """Default gate_norm_eps (None) is the reference's nn.RMSNorm default: float32 module within 1e-5 of a float64
    evaluation of the equations that uses float32's machine epsilon; float64 module within 1e-10 of it with
    float64's. ShortConv taps and every norm gain are random and non-zero."""
    mod, _ = make(m, n=3)
    assert mod.config.gate_norm_eps is None
    gen = torch.Generator().manual_seed(7)
    randomize_norms(mod, gen)
    randomize_conv(mod, gen)
    assert torch.count_nonzero(mod.short_conv.conv.weight) == mod.short_conv.conv.weight.numel()
    _, hidden, hash_ids = inputs(mod, b=2, t=13, seed=8)
    hidden = hidden * 0.05  # small activations: the epsilon matters (mean square ~ 2.5e-3)
    ids = hash_ids.numpy()
    out64 = mod(hidden, hash_ids=hash_ids).detach().numpy()
    np.testing.assert_allclose(
        out64, reference_engram_numpy(mod, hidden.numpy(), ids, np.finfo(np.float64).eps), rtol=1e-10, atol=1e-12
    )
    mod32 = mod.float()
    out32 = mod32(hidden.float(), hash_ids=hash_ids).detach().double().numpy()
    ref32 = reference_engram_numpy(mod32, hidden.numpy(), ids, float(np.finfo(np.float32).eps))
    np.testing.assert_allclose(out32, ref32, rtol=1e-5, atol=1e-6)


def test_gate_norm_eps_is_a_config_field():
    mod, _ = make(2)
    cfg = EngramConfig(**{**mod.config.to_dict(), "gate_norm_eps": 1e-3})
    assert EngramConfig.from_dict(cfg.to_dict()).gate_norm_eps == 1e-3
    hasher = NgramHasher.from_tokenizer(cfg, mod.hasher.tokenizer)
    other = Engram(cfg, 2, D, hc_mult=2, hasher=hasher).double()
    other.load_state_dict(mod.state_dict())
    _, hidden, hash_ids = inputs(mod)
    hidden = hidden * 0.05
    ref = reference_engram_numpy(other, hidden.numpy(), hash_ids.numpy(), 1e-3)
    np.testing.assert_allclose(other(hidden, hash_ids=hash_ids).detach().numpy(), ref, rtol=1e-10, atol=1e-12)
    assert not np.allclose(mod(hidden, hash_ids=hash_ids).detach().numpy(), ref, rtol=1e-6)
    with pytest.raises(ValueError, match="gate_norm_eps"):
        EngramConfig(gate_norm_eps=0.0)


# ---------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("m", [1, 4])
def test_gradients_reach_exactly_the_looked_up_rows(m):
    mod, _ = make(m)
    _, hidden, hash_ids = inputs(mod, b=2, t=6)
    hidden.requires_grad_(True)
    y = mod(hidden, hash_ids=hash_ids)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)).sum().backward()
    touched = set((hash_ids + mod.table.offsets).flatten().tolist())
    got = set(torch.nonzero(mod.table.weight.grad.abs().sum(-1)).flatten().tolist())
    assert got == touched
    assert len(touched) > 10
    # every dense parameter gets a gradient, the zero-initialised conv taps included (they must be able to
    # learn); only the conv's input norms get exactly zero while the taps are all zero
    for name, p in mod.named_parameters():
        if name.startswith("short_conv.norms"):
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
    assert hidden.grad is not None and torch.count_nonzero(hidden.grad) > 0


# ---------------------------------------------------------------------------------------------- causality / decoding


@pytest.mark.parametrize("m", [1, 2])
def test_causality(m):
    mod, _ = make(m, n=3)
    gen = torch.Generator().manual_seed(5)
    randomize_norms(mod, gen)
    randomize_conv(mod, gen)
    raw, hidden, _ = inputs(mod, t=20)
    base = mod(hidden, input_ids=raw)
    for t0 in (0, 7, 19):
        raw2, hidden2 = raw.clone(), hidden.clone()
        raw2[:, t0] = (raw[:, t0] + 1) % 100
        hidden2[:, t0] += 1.0
        out = mod(hidden2, input_ids=raw2)
        assert torch.equal(out[:, :t0], base[:, :t0])
        assert not torch.allclose(out[:, t0], base[:, t0])
        if t0 + 6 < 20:  # the conv (kernel 4, dilation 3) carries the change forward
            assert not torch.allclose(out[:, t0 + 6], base[:, t0 + 6])


@pytest.mark.parametrize("kernel_size", [4, 1])
def test_chunked_decoding_with_state_equals_full_pass(kernel_size):
    mod, hasher = make(2, n=3, kernel_size=kernel_size)
    gen = torch.Generator().manual_seed(6)
    randomize_norms(mod, gen)
    randomize_conv(mod, gen)
    raw, hidden, _ = inputs(mod, t=14)
    full = mod(hidden, input_ids=raw)
    state: dict = {}
    history = hasher.initial_history(raw.shape[0])
    outs = []
    for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 14)):
        comp = hasher.compress(raw[:, lo:hi])
        ids = hasher.hash_incremental(history, comp)[mod.layer_id]
        history = hasher.advance_history(history, comp)
        outs.append(mod(hidden[:, lo:hi], hash_ids=ids, state=state))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-12)


DECODE_VARIANTS = [
    dict(m=1),
    dict(m=4),
    dict(m=2, signed_sqrt=False),
    dict(m=3, gating=False),
    dict(m=2, short_conv=False),
    dict(m=1, kernel_size=1),
    dict(m=4, kernel_size=2, n=4),
]


def decode_module(**kw):
    mod, hasher = make(**kw)
    gen = torch.Generator().manual_seed(6)
    randomize_norms(mod, gen)
    if mod.short_conv is not None:
        randomize_conv(mod, gen)
    return mod, hasher


def run_chunks(mod, hasher, raw, hidden, bounds, mask=None):
    """Feed (raw, hidden) chunk by chunk without gradients through one decoding state; outputs concatenated."""
    state: dict = {}
    history = hasher.initial_history(raw.shape[0])
    outs = []
    with torch.no_grad():
        for lo, hi in bounds:
            comp = hasher.compress(raw[:, lo:hi])
            ids, history = hasher.hash_continued(history, comp)
            chunk_mask = None if mask is None else mask[:, lo:hi]
            outs.append(mod(hidden[:, lo:hi], hash_ids=ids[mod.layer_id], mask=chunk_mask, state=state))
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("kw", DECODE_VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_no_grad_decode_steps_equal_the_full_pass(kw, decode_path):
    """One token at a time without gradients (the decode step's own path: fused projection, the gate's
    reductions in one op, the ShortConv ring buffer; or the fused CPU kernel) gives the full pass's output and
    gate, also with multi-token chunks between single steps (ring -> linear context -> ring), and leaves the
    full pass's ShortConv context in ``state["conv"]``."""
    mod, hasher = decode_module(**kw)
    raw, hidden, _ = inputs(mod, b=3, t=14)
    mod.record_gate = True
    full = mod(hidden, input_ids=raw)
    full_gate = mod.last_gate
    bounds = [(0, 3), *((j, j + 1) for j in range(3, 8)), (8, 11), *((j, j + 1) for j in range(11, 14))]
    got, state = run_chunks(mod, hasher, raw, hidden, bounds)
    assert (state["constants"].kernel is not None) == (decode_path == "kernel")
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)
    if mod.key_projs:
        torch.testing.assert_close(mod.last_gate, full_gate[:, -1:], rtol=1e-10, atol=1e-12)
    if mod.short_conv is not None:
        assert "conv_ring" in state  # the single steps went through the ring
        full_state: dict = {}
        mod(hidden, input_ids=raw, state=full_state)
        torch.testing.assert_close(state["conv"], full_state["conv"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m", [1, 4])
def test_no_grad_decode_steps_with_a_mask_equal_the_full_pass(m, decode_path):
    """Masked (padding) positions fed one at a time are zeroed like in the full pass."""
    mod, hasher = decode_module(m=m)
    raw, hidden, _ = inputs(mod, b=2, t=8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, :3] = False
    mask[1, 5] = False
    full = mod(hidden, input_ids=raw, mask=mask)
    got, _ = run_chunks(mod, hasher, raw, hidden, [(j, j + 1) for j in range(8)], mask)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


def test_decode_step_constants_follow_in_place_updates_within_one_state(decode_path):
    """The fused weights kept in a decoding state are rebuilt when a parameter changes in place between steps:
    the next step equals that of a fresh copy of the updated module given the same context."""
    mod, hasher = decode_module(m=2)
    raw, hidden, _ = inputs(mod, b=2, t=5)
    _, state = run_chunks(mod, hasher, raw, hidden, [(0, 3), (3, 4)])
    context = state["conv"].clone()
    history = torch.cat([hasher.initial_history(2), hasher.compress(raw)], 1)[:, 2:4]
    ids = hasher.hash_incremental(history, hasher.compress(raw[:, 4:5]))[mod.layer_id]
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(torch.rand(p.shape, generator=gen, dtype=p.dtype))
        stale = mod(hidden[:, 4:5], hash_ids=ids, state=state)
        fresh = copy.deepcopy(mod)
        want = fresh(hidden[:, 4:5], hash_ids=ids, state={"conv": context})
    assert torch.equal(stale, want)


def test_decode_step_under_inference_mode_with_inference_parameters(decode_path):
    """Parameters created under ``torch.inference_mode`` have no version counter: the decode step rebuilds its
    constants every step and still equals the full pass."""
    with torch.inference_mode():
        mod, hasher = decode_module(m=2)
        raw, hidden, _ = inputs(mod, b=2, t=6)
        full = mod(hidden, input_ids=raw)
        got, state = run_chunks(mod, hasher, raw, hidden, [(0, 2), *((j, j + 1) for j in range(2, 6))])
    assert "constants" not in state
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("m", [1, 4])
def test_no_grad_calls_see_every_parameter_update(m):
    """The fused parameter tensors kept between no-grad calls (weight concatenation, gate gains, conv taps) are
    rebuilt after an in-place update (an optimizer step) and after a new parameter is assigned: each no-grad
    output equals that of a fresh copy of the module (nothing kept yet) bit for bit, and the output with
    gradients on (the full forward, which rebuilds them every call) up to rounding."""
    mod, _ = make(m)
    gen = torch.Generator().manual_seed(3)
    randomize_norms(mod, gen)
    randomize_conv(mod, gen)
    _, hidden, hash_ids = inputs(mod, t=1)
    with torch.no_grad():
        before = mod(hidden, hash_ids=hash_ids, state={"conv": torch.ones(2, 9, m * mod.hidden_size).double()})
        for p in mod.parameters():
            p.add_(torch.rand(p.shape, generator=gen, dtype=p.dtype))
        mod.key_norms[-1].weight = torch.nn.Parameter(mod.key_norms[-1].weight * 2)
        state = {"conv": torch.ones(2, 9, m * mod.hidden_size).double()}
        after = mod(hidden, hash_ids=hash_ids, state=state)
        fresh = copy.deepcopy(mod)
        fresh._derived, fresh.short_conv._derived = ParameterDerived(), ParameterDerived()
        state = {"conv": torch.ones(2, 9, m * mod.hidden_size).double()}
        assert torch.equal(after, fresh(hidden, hash_ids=hash_ids, state=state))
    state = {"conv": torch.ones(2, 9, m * mod.hidden_size).double()}
    want = mod(hidden, hash_ids=hash_ids, state=state).detach()
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, want, rtol=1e-12, atol=1e-12)


def test_hash_ids_and_input_ids_paths_agree():
    mod, hasher = make(2)
    raw, hidden, _ = inputs(mod)
    via_ids = mod(hidden, input_ids=raw)
    via_hash = mod(hidden, hash_ids=hasher.hash(hasher.compress(raw))[mod.layer_id])
    assert torch.equal(via_ids, via_hash)
    other_layer = hasher.hash_tokens(raw)[0]  # the other Engram layer hashes differently
    assert not torch.equal(other_layer, hasher.hash_tokens(raw)[2])


# ---------------------------------------------------------------------------------------------- errors


def test_errors_hidden_shape():
    mod1, _ = make(1)
    mod4, _ = make(4)
    raw, hidden1, hash_ids = inputs(mod1)
    with pytest.raises(ValueError, match="hidden"):
        mod1(hidden1[:, :, 0, :3], hash_ids=hash_ids)  # wrong D
    with pytest.raises(ValueError, match="hidden"):
        mod1(hidden1[0, :, 0], hash_ids=hash_ids)  # 2-D
    with pytest.raises(ValueError, match="hidden"):
        mod1(hidden1.expand(-1, -1, 2, -1), hash_ids=hash_ids)  # M = 2 into an M = 1 module
    with pytest.raises(ValueError, match="hc_mult|hidden"):
        mod4(hidden1[:, :, 0], hash_ids=hash_ids)  # [B, T, D] into an M = 4 module
    with pytest.raises(ValueError, match="hidden"):
        mod4(hidden1.expand(-1, -1, 3, -1), hash_ids=hash_ids)


def test_errors_hash_ids():
    mod, hasher = make(1)
    raw, hidden, hash_ids = inputs(mod)
    sizes = torch.tensor([p for o in hasher.table_sizes[mod.layer_id] for p in o])
    with pytest.raises(ValueError, match="out of range"):
        mod(hidden, hash_ids=hash_ids + sizes)  # each head one past its table
    bad = hash_ids.clone()
    bad[0, 0, 0] = -1
    with pytest.raises(ValueError, match="out of range"):
        mod(hidden, hash_ids=bad)
    with pytest.raises(ValueError, match="hash_ids"):
        mod(hidden, hash_ids=hash_ids[..., :-1])  # one head short
    with pytest.raises(TypeError, match="int64"):
        mod(hidden, hash_ids=hash_ids.float())
    with pytest.raises(ValueError, match="hash_ids"):
        mod(hidden, hash_ids=hash_ids[:, :-1])  # T mismatch
    with pytest.raises(ValueError, match="hash_ids"):
        mod(hidden, hash_ids=hash_ids[..., 0])  # [B, T] instead of [B, T, H]
    with pytest.raises(ValueError, match="hash_ids"):
        mod(hidden)
    with pytest.raises(ValueError, match="out of range"):
        mod(hidden, input_ids=raw + 100)


def test_errors_construction():
    mod, hasher = make(1)
    cfg = mod.config
    with pytest.raises(ValueError, match="layer_id"):
        Engram(cfg, 1, D, hasher=hasher)
    with pytest.raises(ValueError, match="NgramHasher"):
        Engram(cfg, 2, D)
    with pytest.raises(ValueError, match="positive"):
        Engram(cfg, 2, 0, hasher=hasher)
    other = EngramConfig(**{**cfg.to_dict(), "seed": 1})
    with pytest.raises(ValueError, match="different EngramConfig"):
        Engram(other, 2, D, hasher=hasher)
    with pytest.raises(ValueError, match="positive"):
        MultiHeadEmbedding([5, 0], 4)


def test_multi_head_embedding_offsets():
    emb = MultiHeadEmbedding([3, 5, 2], 4)
    assert emb.weight.shape == (10, 4) and emb.offsets.tolist() == [0, 3, 8]
    ids = torch.tensor([[[2, 4, 1]]])
    out = emb(ids)
    assert out.shape == (1, 1, 3, 4)
    torch.testing.assert_close(out[0, 0], emb.weight[[2, 7, 9]])


# ---------------------------------------------------------------------------------------------- accounting


def _count(mods: list[Engram]) -> tuple[int, int]:
    table = sum(m.table.weight.numel() for m in mods)
    total = sum(p.numel() for m in mods for p in m.parameters())
    return table, total


def test_engram_counts_equals_instantiated_parameters():
    rng = np.random.default_rng(11)
    for trial in range(12):
        n = int(rng.integers(2, 5))
        k = int(rng.integers(1, 4))
        cfg = EngramConfig(
            engram_vocab_size=[int(rng.integers(2, 300)) for _ in range(n - 1)],
            max_ngram_size=n,
            n_embed_per_ngram=k * int(rng.integers(1, 5)),
            n_head_per_ngram=k,
            layer_ids=[int(x) for x in rng.choice(10, size=int(rng.integers(1, 4)), replace=False)],
            kernel_size=int(rng.integers(1, 5)),
            gating=bool(trial % 2),
            short_conv=bool(trial // 2 % 2),
            signed_sqrt=bool(rng.integers(0, 2)),
        )
        hidden, m = int(rng.integers(1, 24)), int(rng.integers(1, 5))
        hasher = NgramHasher(cfg, int(rng.integers(2, 1000)), 0)
        mods = [Engram(cfg, l, hidden, hc_mult=m, hasher=hasher) for l in cfg.layer_ids]
        counts = engram_counts(cfg, hidden, m)
        table, total = _count(mods)
        assert counts.table_params == table, trial
        assert counts.table_rows == sum(hasher.num_rows.values())
        assert counts.total_params == total, (trial, cfg)
        assert counts.dense_params == total - table
        assert counts.layers == len(cfg.layer_ids)


def test_switches_change_param_count_as_accounting_says():
    base = dict(
        engram_vocab_size=[31, 37],
        max_ngram_size=3,
        n_embed_per_ngram=8,
        n_head_per_ngram=2,
        layer_ids=[1],
        kernel_size=4,
    )
    totals, counted = {}, {}
    for gating in (True, False):
        for conv in (True, False):
            cfg = EngramConfig(**base, gating=gating, short_conv=conv)
            hasher = NgramHasher(cfg, 50, 0)
            mod = Engram(cfg, 1, D, hc_mult=3, hasher=hasher)
            totals[gating, conv] = sum(p.numel() for p in mod.parameters())
            counted[gating, conv] = engram_counts(cfg, D, 3).total_params
            assert (mod.short_conv is not None) == conv
    assert totals == counted
    d_mem, m = 16, 3
    assert totals[True, True] - totals[False, True] == m * (d_mem * D + D) + 2 * m * D  # W_K + biases, 2M norms
    assert totals[True, True] - totals[True, False] == m * D * 4 + m * D  # conv taps + conv norms
