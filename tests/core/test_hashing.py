"""NgramHasher: bit-exact against the independent numpy reference, incremental == full, errors, host reads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engram
from engram import CompressedTokenizer, EngramConfig, NgramHasher
from engram.hashing import is_prime, layer_multipliers, mod_primes_by_reciprocal, table_primes

from ..conftest import count_host_reads
from .reference_numpy import (
    INT64_MAX,
    is_prime_trial,
    ref_hash,
    ref_multipliers,
    ref_offsets,
    ref_primes,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def small_config(n=3, k=2, sizes=None, layer_ids=(0, 3), seed=0, embed=None) -> EngramConfig:
    sizes = list(sizes) if sizes is not None else [31 + 10 * i for i in range(n - 1)]
    return EngramConfig(
        engram_vocab_size=sizes,
        max_ngram_size=n,
        n_embed_per_ngram=embed or 4 * k,
        n_head_per_ngram=k,
        layer_ids=list(layer_ids),
        seed=seed,
        pad_id=0,
    )


def random_config(rng: np.random.Generator) -> tuple[EngramConfig, int, int]:
    n = int(rng.integers(2, 6))
    k = int(rng.integers(1, 5))
    # table sizes from tiny (many collisions between orders/layers) to DeepSeek-like and primes near 2^31
    scale = int(rng.choice([2, 50, 1000, 129280 * 5, 2**31 - 2000]))
    low = scale - 5000 if scale > 2**30 else 2
    sizes = [int(rng.integers(low, scale + 2)) for _ in range(n - 1)]
    n_layers = int(rng.integers(1, 4))
    layer_ids = [int(x) for x in rng.choice(40, size=n_layers, replace=False)]
    seed = int(rng.integers(0, 2**31))
    vprime = int(rng.choice([2, 3, int(rng.integers(2, 1000)), int(rng.integers(1000, 200_001)), 99092, 200_000]))
    pad = int(rng.integers(0, vprime))
    cfg = EngramConfig(
        engram_vocab_size=sizes,
        max_ngram_size=n,
        n_embed_per_ngram=2 * k,
        n_head_per_ngram=k,
        layer_ids=layer_ids,
        seed=seed,
        pad_id=0,
    )
    return cfg, vprime, pad


def ref_for(cfg: EngramConfig, tokens: np.ndarray, vprime: int, pad: int) -> dict[int, np.ndarray]:
    return ref_hash(
        tokens,
        layer_ids=cfg.layer_ids,
        sizes_per_order=cfg.engram_vocab_size,
        max_ngram_size=cfg.max_ngram_size,
        heads=cfg.n_head_per_ngram,
        seed=cfg.seed,
        vprime=vprime,
        pad=pad,
    )


# ---------------------------------------------------------------------------------------------- primes


def test_is_prime_matches_trial_division_small():
    assert [n for n in range(3000) if is_prime(n)] == [n for n in range(3000) if is_prime_trial(n)]


@pytest.mark.parametrize(
    "n,expected",
    [
        (2**31 - 1, True),
        (2**61 - 1, True),
        (2**61 + 1, False),
        (561, False),  # Carmichael
        (3215031751, False),  # strong pseudoprime to bases 2, 3, 5, 7
        (3825123056546413051, False),  # strong pseudoprime to bases 2..23
        (646403, True),  # first prime >= 5 * 129280
        (646400, False),
        (1, False),
        (0, False),
        (-7, False),
    ],
)
def test_is_prime_known_values(n, expected):
    assert is_prime(n) is expected


def test_is_prime_matches_trial_division_random_large():
    rng = np.random.default_rng(1)
    for n in rng.integers(10**6, 10**9, size=300):
        assert is_prime(int(n)) == is_prime_trial(int(n)), n


def test_table_primes_rules_by_hand():
    # sizes 10 and 10 in two layers, K = 3: 11 13 17 | 19 23 29 | (layer 2) 31 37 41 | 43 47 53
    cfg = EngramConfig(
        engram_vocab_size=[10, 10], max_ngram_size=3, n_embed_per_ngram=3, n_head_per_ngram=3, layer_ids=[5, 2]
    )
    assert table_primes(cfg) == {5: [[11, 13, 17], [19, 23, 29]], 2: [[31, 37, 41], [43, 47, 53]]}
    # a configured size that is itself prime is used as is (>=, not >)
    cfg = EngramConfig(
        engram_vocab_size=[13, 2], max_ngram_size=3, n_embed_per_ngram=2, n_head_per_ngram=2, layer_ids=[0]
    )
    assert table_primes(cfg) == {0: [[13, 17], [2, 3]]}
    # the second order starts below the first one's primes and skips the taken ones
    cfg = EngramConfig(
        engram_vocab_size=[10, 12], max_ngram_size=3, n_embed_per_ngram=3, n_head_per_ngram=3, layer_ids=[0]
    )
    assert table_primes(cfg) == {0: [[11, 13, 17], [19, 23, 29]]}


# ---------------------------------------------------------------------------------------------- bit-exactness


def test_bit_exact_against_reference_random_configs():
    rng = np.random.default_rng(20260107)
    for trial in range(40):
        cfg, vprime, pad = random_config(rng)
        hasher = NgramHasher(cfg, vprime, pad)
        # primes, multipliers, offsets
        primes = ref_primes(cfg.layer_ids, cfg.engram_vocab_size, cfg.n_head_per_ngram)
        assert hasher.table_sizes == primes, trial
        all_primes = [p for l in primes.values() for o in l for p in o]
        assert len(set(all_primes)) == len(all_primes)
        for l in cfg.layer_ids:
            m_ref = ref_multipliers(cfg.seed, l, cfg.max_ngram_size, vprime)
            assert hasher.multipliers[l].dtype == np.int64
            np.testing.assert_array_equal(hasher.multipliers[l], m_ref)
            np.testing.assert_array_equal(layer_multipliers(cfg, l, vprime), m_ref)
            np.testing.assert_array_equal(hasher.offsets[l].numpy(), ref_offsets(primes[l]))
            assert hasher.num_rows[l] == sum(p for o in primes[l] for p in o)
        # hash ids: random tokens, including the extremes 0 and V'-1 and the pad id
        b, t = int(rng.integers(1, 4)), int(rng.integers(1, 40))
        tokens = rng.integers(0, vprime, size=(b, t), dtype=np.int64)
        tokens[0, 0] = vprime - 1
        tokens[-1, -1] = 0
        if t > 2:
            tokens[0, 1] = pad
        out = hasher.hash(torch.from_numpy(tokens))
        ref = ref_for(cfg, tokens, vprime, pad)
        assert list(out) == cfg.layer_ids
        for l in cfg.layer_ids:
            assert out[l].dtype == torch.int64
            assert out[l].shape == (b, t, cfg.num_heads_total)
            np.testing.assert_array_equal(out[l].numpy(), ref[l], err_msg=f"trial {trial} layer {l}")


@FAST
@given(
    n=st.integers(2, 5),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**40),
    vprime=st.integers(2, 200_000),
    layer_ids=st.lists(st.integers(0, 60), min_size=1, max_size=3, unique=True),
    data=st.data(),
)
def test_bit_exact_hypothesis(n, k, seed, vprime, layer_ids, data):
    sizes = data.draw(st.lists(st.integers(2, 700_000), min_size=n - 1, max_size=n - 1))
    pad = data.draw(st.integers(0, vprime - 1))
    t = data.draw(st.integers(1, 12))
    tokens = np.array(
        data.draw(st.lists(st.integers(0, vprime - 1), min_size=2 * t, max_size=2 * t)), dtype=np.int64
    ).reshape(2, t)
    cfg = EngramConfig(
        engram_vocab_size=sizes,
        max_ngram_size=n,
        n_embed_per_ngram=k,
        n_head_per_ngram=k,
        layer_ids=layer_ids,
        seed=seed,
        pad_id=0,
    )
    out = NgramHasher(cfg, vprime, pad).hash(torch.from_numpy(tokens))
    ref = ref_for(cfg, tokens, vprime, pad)
    for l in layer_ids:
        np.testing.assert_array_equal(out[l].numpy(), ref[l])


def _wrap64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


def test_hash_matches_python_bigint_arithmetic():
    """A third implementation with explicit two's-complement wrapping, for a few positions by hand."""
    cfg = small_config(n=4, k=3, sizes=[1000, 2000, 3000], layer_ids=(7,), seed=123)
    vprime, pad = 99092, 17
    hasher = NgramHasher(cfg, vprime, pad)
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, vprime, size=(1, 9), dtype=np.int64)
    out = hasher.hash(torch.from_numpy(tokens))[7][0].tolist()
    mults = [int(m) for m in hasher.multipliers[7]]
    half = (INT64_MAX // vprime) // 2
    assert all(m % 2 == 1 and 1 <= m <= 2 * half - 1 for m in mults)
    seq = [int(x) for x in tokens[0]]
    for pos in range(9):
        s = [seq[pos - i] if pos - i >= 0 else pad for i in range(4)]
        expected = []
        for n in range(2, 5):
            mix = 0
            for i in range(n):
                mix ^= _wrap64(s[i] * mults[i])  # XOR of Python ints == XOR of two's complement int64
            mix = _wrap64(mix)
            expected += [mix % p for p in hasher.table_sizes[7][n - 2]]  # Python % is non-negative
        assert out[pos] == expected, pos


def test_products_really_wrap():
    """With V' = 2 the multipliers are ~2**62, so token ids > 1 overflow int64: wrapping must be two's complement."""
    cfg = small_config(n=3, k=2, layer_ids=(0,), seed=3)
    vprime = 2
    hasher = NgramHasher(cfg, vprime, 0)
    assert max(int(m) for m in hasher.multipliers[0]) > 2**60
    tokens = np.array([[1, 1, 0, 1, 1, 1]], dtype=np.int64)
    out = hasher.hash(torch.from_numpy(tokens))[0].numpy()
    np.testing.assert_array_equal(out, ref_for(cfg, tokens, vprime, 0)[0])
    # and the multiplier bound keeps (V'-1) * m_i inside int64 for every V'
    for v in (2, 3, 1000, 99092, 200_000, 2**40):
        m = ref_multipliers(0, 1, 5, v)
        assert all((v - 1) * int(x) <= INT64_MAX for x in m)


def test_hash_depends_only_on_the_last_n_tokens_and_layers_differ():
    cfg = small_config(n=3, k=2, sizes=[5000, 6000], layer_ids=(0, 1))
    hasher = NgramHasher(cfg, 1000, 0)
    base = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(0))
    changed = base.clone()
    changed[0, 10] = (base[0, 10] + 1) % 1000
    a, b = hasher.hash(base), hasher.hash(changed)
    for l in (0, 1):
        same = (a[l] == b[l]).all(-1)[0]
        assert same[:10].all() and same[13:].all()
        # bigram heads change at 10 and 11; trigram heads at 10, 11, 12
        assert not (a[l][0, 10:12, :2] == b[l][0, 10:12, :2]).any()
        assert not (a[l][0, 10:13, 2:] == b[l][0, 10:13, 2:]).any()
    assert not torch.equal(a[0], a[1])


def test_pad_is_used_before_the_sequence_start():
    cfg = small_config(n=3, k=1, sizes=[101, 103], layer_ids=(0,))
    h_a, h_b = NgramHasher(cfg, 50, 3), NgramHasher(cfg, 50, 4)
    ids = torch.tensor([[7, 8, 9, 10]])
    a, b = h_a.hash(ids)[0], h_b.hash(ids)[0]
    assert not torch.equal(a[:, :2], b[:, :2])
    assert torch.equal(a[:, 2:], b[:, 2:])
    # a sequence that starts with N-1 pads hashes like the unpadded one
    padded = torch.tensor([[3, 3, 7, 8, 9, 10]])
    assert torch.equal(h_a.hash(padded)[0][:, 2:], a)


# ---------------------------------------------------------------------------------------------- division-free modulo

_EXTREME_PRIMES = [2, 3, 5, 7, 3067, 3079, 8191, 646403, 2147483629, 2147483647, 1099511627791, 1125899906842597]


def test_mod_primes_by_reciprocal_exact_at_the_extremes():
    """x mod p without a division equals Python's % for mixes at +-2^63, 0, -1, around multiples of p, and primes
    from 2 to just below 2^50 (the bound of its proof)."""
    rng = np.random.default_rng(11)
    for p in _EXTREME_PRIMES:
        assert is_prime(p)
        big = (2**63 - 1) // p
        xs = [
            -(2**63),
            -(2**63) + 1,
            2**63 - 1,
            2**63 - 2,
            0,
            -1,
            1,
            p - 1,
            p,
            p + 1,
            -p,
            -p + 1,
            -p - 1,
            big * p,
            big * p - 1,
            big * p + 1,
            -big * p,
            -big * p - 1,
            -big * p + 1,
            (big // 2) * p - 1,
        ]
        xs += [int(v) for v in rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)]
        xs += [int(v) for v in rng.integers(-4 * p, 4 * p, size=50)]
        xs = [v for v in xs if -(2**63) <= v < 2**63]
        x = torch.tensor(xs, dtype=torch.int64)
        got = mod_primes_by_reciprocal(x, torch.tensor(p), torch.tensor(1.0 / p, dtype=torch.float64))
        assert got.tolist() == [v % p for v in xs], p


def test_mod_primes_by_reciprocal_broadcasts_like_the_hasher():
    x = torch.randint(-(2**63), 2**63 - 1, (3, 5, 2, 1), dtype=torch.int64)
    p = torch.tensor([[2, 3, 646403], [2147483647, 8191, 5]])
    got = mod_primes_by_reciprocal(x, p, 1.0 / p.double())
    assert got.shape == (3, 5, 2, 3)
    assert torch.equal(got, torch.remainder(x, p))


def _compiled_config() -> tuple[EngramConfig, int, int]:
    """One config for every test of the compiled kernel: the process compiles it once."""
    return random_config(np.random.default_rng(12))


def test_compiled_hasher_bit_exact():
    """The torch.compile path (one fused kernel) agrees with the reference, over several shapes (dynamic, and a
    batch of one)."""
    rng = np.random.default_rng(12)
    cfg, vprime, pad = _compiled_config()
    hasher = NgramHasher(cfg, vprime, pad, compile=True)
    for b, t in ((2, 33), (1, 50), (3, 7)):
        tokens = rng.integers(0, vprime, size=(b, t), dtype=np.int64)
        out = hasher.hash(torch.from_numpy(tokens))
        ref = ref_for(cfg, tokens, vprime, pad)
        for l in cfg.layer_ids:
            assert out[l].shape == (b, t, cfg.num_heads_total) and out[l].dtype == torch.int64
            np.testing.assert_array_equal(out[l].numpy(), ref[l])
    history = hasher.initial_history(3)
    inc = hasher.hash_incremental(history, torch.from_numpy(tokens))
    for l in cfg.layer_ids:
        np.testing.assert_array_equal(inc[l].numpy(), ref[l])


def test_compiled_kernel_at_extreme_mixes():
    """hash_division_free, eagerly and compiled, equals Python's % on tokens and multipliers whose wrapped products
    and mixes lie near +-2^63, 0 and -1, with primes from 2 to just below 2^50 (shapes of the compiled config, so
    the process's one compile serves)."""
    context = torch.tensor([[0, 1, 2**62, 2**62 + 1, 2**63 - 1, 3, 2**61, 2**63 - 2, 5, 1]], dtype=torch.int64)
    mult = torch.tensor([[2**62 + 1, -1, 2**63 - 1, 7]], dtype=torch.int64)  # [L=1, N=4]
    primes = torch.tensor([[[2, 3], [646403, 2147483647], [8191, 1125899906842597]]], dtype=torch.int64)
    vals, m = context[0].tolist(), mult[0].tolist()
    expected, mixes = [], []
    for t in range(3, len(vals)):
        mix, row = 0, []
        for n in range(4):
            prod = (vals[t - n] * m[n] + 2**63) % 2**64 - 2**63  # wrapping int64 product
            mix = (mix ^ prod) if n else prod
            if n:
                row.append([mix % p for p in primes[0, n - 1].tolist()])
                mixes.append(mix)
        expected.append(row)
    assert max(mixes) > 2**62 and min(mixes) < -(2**62)  # the inputs reach the extremes
    for fn in (engram.hashing.hash_division_free, engram.hashing._bulk_kernel):
        got = fn(context, mult, primes, 1.0 / primes.double())
        assert got.shape == (1, 1, 7, 3, 2) and got[0, 0].tolist() == expected


class _KernelCalls:
    """Counts the calls that reach the compiled kernel."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = engram.hashing._BulkKernel.__call__

        def counting(kernel, *args):
            self.n += 1
            return real(kernel, *args)

        monkeypatch.setattr(engram.hashing._BulkKernel, "__call__", counting)


def test_default_compiles_only_after_bulk_work(monkeypatch):
    """compile=None hashes eagerly until the process has hashed COMPILE_AFTER_IDS ids in calls of >= BULK_IDS ids,
    then uses the compiled kernel for bulk calls only; small and decode calls never count nor compile, compile=False
    never compiles, and every result is bit-exact."""
    cfg, vprime, pad = _compiled_config()
    per_token = len(cfg.layer_ids) * cfg.num_heads_total
    monkeypatch.setattr(engram.hashing, "BULK_IDS", 40 * per_token)
    monkeypatch.setattr(engram.hashing, "COMPILE_AFTER_IDS", 200 * per_token)
    monkeypatch.setattr(engram.hashing._bulk_kernel, "eager_bulk_ids", 0)
    monkeypatch.setattr(engram.hashing._bulk_kernel, "failure", None)
    calls = _KernelCalls(monkeypatch)
    hasher, never = NgramHasher(cfg, vprime, pad), NgramHasher(cfg, vprime, pad, compile=False)
    rng = np.random.default_rng(13)

    def check(h: NgramHasher, b: int, t: int) -> None:
        tokens = rng.integers(0, vprime, size=(b, t), dtype=np.int64)
        out, ref = h.hash(torch.from_numpy(tokens)), ref_for(cfg, tokens, vprime, pad)
        for l in cfg.layer_ids:
            np.testing.assert_array_equal(out[l].numpy(), ref[l])

    for _ in range(10):
        check(hasher, 3, 13)  # 39 tokens: below BULK_IDS, not counted
    assert engram.hashing._bulk_kernel.eager_bulk_ids == 0 and calls.n == 0
    for _ in range(4):
        check(hasher, 2, 30)  # 60 tokens each: counted, 240 >= 200 after the fourth
    assert engram.hashing._bulk_kernel.eager_bulk_ids == 240 * per_token and calls.n == 0
    check(hasher, 2, 30)
    assert calls.n == 1
    check(never, 2, 30)
    history = hasher.initial_history(4)
    for _ in range(3):  # decode steps stay eager
        ids, history = hasher.hash_continued(history, torch.randint(0, vprime, (4, 1)))
    check(hasher, 3, 7)
    assert calls.n == 1
    check(hasher, 4, 25)
    assert calls.n == 2


def test_default_stays_eager_when_compiling_fails(monkeypatch):
    """Where the compiler is missing (the compiled function raises), compile=None warns once and hashes eagerly,
    bit-exact; compile=True raises instead."""
    cfg, vprime, pad = _compiled_config()

    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

    monkeypatch.setattr(engram.hashing, "BULK_IDS", 1)
    monkeypatch.setattr(engram.hashing, "COMPILE_AFTER_IDS", 0)
    monkeypatch.setattr(engram.hashing._bulk_kernel, "fn", no_compiler)
    monkeypatch.setattr(engram.hashing._bulk_kernel, "failure", None)
    tokens = np.random.default_rng(14).integers(0, vprime, size=(2, 20), dtype=np.int64)
    ref = ref_for(cfg, tokens, vprime, pad)
    hasher = NgramHasher(cfg, vprime, pad)
    with pytest.warns(RuntimeWarning, match=r"no working C.. compiler found\); hashing stays eager"):
        out = hasher.hash(torch.from_numpy(tokens))
    for l in cfg.layer_ids:
        np.testing.assert_array_equal(out[l].numpy(), ref[l])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = NgramHasher(cfg, vprime, pad).hash(torch.from_numpy(tokens))
    for l in cfg.layer_ids:
        assert torch.equal(again[l], out[l])
    with pytest.raises(RuntimeError, match=r"compile=True\) could not compile its kernel"):
        NgramHasher(cfg, vprime, pad, compile=True).hash(torch.from_numpy(tokens))


# ---------------------------------------------------------------------------------------------- incremental


@FAST
@given(
    n=st.integers(2, 5),
    t=st.integers(0, 30),
    cuts=st.lists(st.integers(0, 30), max_size=6),
    seed=st.integers(0, 1000),
)
def test_incremental_chain_equals_full(n, t, cuts, seed):
    cfg = small_config(n=n, k=2, layer_ids=(1, 4), seed=seed)
    vprime, pad = 97, 5
    hasher = NgramHasher(cfg, vprime, pad)
    ids = torch.randint(0, vprime, (3, t), generator=torch.Generator().manual_seed(seed))
    full = hasher.hash(ids)
    bounds = sorted({0, t, *[c for c in cuts if c <= t]})
    history = hasher.initial_history(3)
    pieces = {l: [] for l in cfg.layer_ids}
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunk = ids[:, lo:hi]
        out = hasher.hash_incremental(history, chunk)
        for l in cfg.layer_ids:
            assert out[l].shape == (3, hi - lo, cfg.num_heads_total)
            pieces[l].append(out[l])
        history = hasher.advance_history(history, chunk)
        assert history.shape == (3, n - 1)
    for l in cfg.layer_ids:
        got = torch.cat(pieces[l], dim=1) if pieces[l] else full[l][:, :0]
        assert torch.equal(got, full[l])
    # the state after everything is the last N-1 tokens (pad-filled when short)
    expected_hist = torch.cat([torch.full((3, n - 1), pad), ids], dim=1)[:, -(n - 1) :]
    assert torch.equal(history, expected_hist)


def test_incremental_token_by_token_from_prefix_history():
    cfg = small_config(n=4, k=3, sizes=[200, 300, 400], layer_ids=(2,))
    hasher = NgramHasher(cfg, 500, 1)
    ids = torch.randint(0, 500, (2, 25), generator=torch.Generator().manual_seed(1))
    full = hasher.hash(ids)[2]
    for split in (1, 3, 10):
        history = (
            ids[:, split - 3 : split]
            if split >= 3
            else torch.cat([torch.full((2, 3 - split), 1), ids[:, :split]], dim=1)
        )
        step = []
        for j in range(split, 25):
            step.append(hasher.hash_incremental(history, ids[:, j : j + 1])[2])
            history = hasher.advance_history(history, ids[:, j : j + 1])
        assert torch.equal(torch.cat(step, dim=1), full[:, split:])


def test_hash_continued_equals_hash_incremental_and_advance_history():
    """The decode step's one-pass form gives the same ids and next history as the two checked calls."""
    cfg = small_config(n=4, k=3, sizes=[200, 300, 400], layer_ids=(0, 2))
    hasher = NgramHasher(cfg, 500, 1)
    ids = torch.randint(0, 500, (3, 9), generator=torch.Generator().manual_seed(2))
    history = hasher.initial_history(3)
    for lo, hi in ((0, 1), (1, 5), (5, 6), (6, 9)):
        got, next_history = hasher.hash_continued(history, ids[:, lo:hi])
        want = hasher.hash_incremental(history, ids[:, lo:hi])
        assert got.keys() == want.keys() and all(torch.equal(got[l], want[l]) for l in want)
        history_want = hasher.advance_history(history, ids[:, lo:hi])
        assert torch.equal(next_history, history_want)
        history = next_history


def test_single_token_steps_bit_exact_against_reference_random_configs():
    """Hashing one new token at a time (the decode step's own path, all layers in one broadcast remainder) gives
    the numpy reference's ids at every position, over random configs: orders 2-5, 1-3 layers, V' from 2 up,
    primes from 2 to near 2^31."""
    rng = np.random.default_rng(11)
    for trial in range(25):
        cfg, vprime, pad = random_config(rng)
        hasher = NgramHasher(cfg, vprime, pad)
        tokens = rng.integers(0, vprime, size=(3, 7), dtype=np.int64)
        ref = ref_for(cfg, tokens, vprime, pad)
        ids = torch.from_numpy(tokens)
        history = hasher.initial_history(3)
        for j in range(tokens.shape[1]):
            out, history = hasher.hash_continued(history, ids[:, j : j + 1])
            for l in cfg.layer_ids:
                assert out[l].shape == (3, 1, cfg.num_heads_total)
                np.testing.assert_array_equal(out[l][:, 0].numpy(), ref[l][:, j], err_msg=f"trial {trial} layer {l}")


def test_incremental_history_shape_checked():
    hasher = NgramHasher(small_config(n=3), 50, 0)
    with pytest.raises(ValueError, match="history"):
        hasher.hash_incremental(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="history"):
        hasher.hash_incremental(torch.zeros(1, 2, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="history"):
        hasher.hash_incremental(torch.full((2, 2), 50), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- io / devices


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_output_shape_dtype_device(dtype):
    cfg = small_config(n=3, k=4, layer_ids=(0, 2, 9))
    hasher = NgramHasher(cfg, 100, 0)
    ids = torch.randint(0, 100, (3, 17)).to(dtype)
    out = hasher.hash(ids)
    assert set(out) == {0, 2, 9}
    ref = ref_for(cfg, ids.to(torch.int64).numpy(), 100, 0)
    for l, v in out.items():
        assert v.shape == (3, 17, 8) and v.dtype == torch.int64 and v.device == ids.device
        np.testing.assert_array_equal(v.numpy(), ref[l])
        sizes = torch.tensor([p for o in hasher.table_sizes[l] for p in o])
        assert ((v >= 0) & (v < sizes)).all()
    empty = hasher.hash(torch.zeros(2, 0, dtype=torch.long))
    assert all(v.shape == (2, 0, 8) for v in empty.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_cuda_equal():
    rng = np.random.default_rng(7)
    for _ in range(10):
        cfg, vprime, pad = random_config(rng)
        hasher = NgramHasher(cfg, vprime, pad)
        ids = torch.from_numpy(rng.integers(0, vprime, size=(4, 257), dtype=np.int64))
        cpu = hasher.hash(ids)
        gpu = hasher.hash(ids.cuda())
        hist = hasher.initial_history(4, "cuda")
        inc = hasher.hash_incremental(hist, ids.cuda())
        for l in cfg.layer_ids:
            assert gpu[l].device.type == "cuda"
            assert torch.equal(cpu[l], gpu[l].cpu())
            assert torch.equal(cpu[l], inc[l].cpu())


def test_from_tokenizer_and_raw_ids():
    rng = np.random.default_rng(3)
    lookup = rng.permutation(np.concatenate([np.arange(40), rng.integers(0, 40, 60)]))
    ctok = CompressedTokenizer.from_lookup(lookup, "fp")
    cfg = EngramConfig(
        engram_vocab_size=[50, 60],
        max_ngram_size=3,
        n_embed_per_ngram=4,
        n_head_per_ngram=2,
        layer_ids=[0, 1],
        pad_id=7,
    )
    hasher = NgramHasher.from_tokenizer(cfg, ctok)
    assert hasher.compressed_vocab_size == 40
    assert hasher.compressed_pad_id == int(lookup[7])
    raw = torch.from_numpy(rng.integers(0, 100, size=(2, 15)))
    got = hasher.hash_tokens(raw)
    ref = ref_for(cfg, lookup[raw.numpy()], 40, int(lookup[7]))
    for l in (0, 1):
        np.testing.assert_array_equal(got[l].numpy(), ref[l])
    with pytest.raises(RuntimeError, match="from_tokenizer"):
        NgramHasher(cfg, 40, 0).hash_tokens(raw)


def test_from_tokenizer_honours_compress_tokens_false():
    """The ablation hashes raw ids: V' = V, the raw pad id, and hash_tokens(raw) == the reference on raw ids."""
    rng = np.random.default_rng(4)
    lookup = rng.permutation(np.concatenate([np.arange(30), rng.integers(0, 30, 50)]))
    ctok = CompressedTokenizer.from_lookup(lookup, "fp")
    cfg = EngramConfig(
        engram_vocab_size=[50, 60],
        max_ngram_size=3,
        n_embed_per_ngram=4,
        n_head_per_ngram=2,
        layer_ids=[0, 2],
        pad_id=9,
        compress_tokens=False,
    )
    hasher = NgramHasher.from_tokenizer(cfg, ctok)
    assert (hasher.compressed_vocab_size, hasher.compressed_pad_id) == (80, 9)
    assert hasher.tokenizer.fingerprint == "fp"
    raw = torch.from_numpy(rng.integers(0, 80, size=(2, 11)))
    assert torch.equal(hasher.compress(raw), raw)
    got = hasher.hash_tokens(raw)
    ref = ref_for(cfg, raw.numpy(), 80, 9)
    for l in (0, 2):
        np.testing.assert_array_equal(got[l].numpy(), ref[l])
    # and the compressed default differs: the switch really changes what is hashed
    cfg.compress_tokens = True
    compressed = NgramHasher.from_tokenizer(cfg, ctok)
    assert compressed.compressed_vocab_size == 30
    assert not torch.equal(compressed.hash_tokens(raw)[0], got[0])


def test_hash_tokens_equals_hash_of_compressed_and_checks_raw_range():
    rng = np.random.default_rng(6)
    ctok = CompressedTokenizer.from_lookup(rng.permutation(np.arange(64)) % 20, "fp")
    cfg = small_config(n=4, k=3, sizes=[300, 400, 500], layer_ids=(1, 5))
    hasher = NgramHasher.from_tokenizer(cfg, ctok)
    raw = torch.from_numpy(rng.integers(0, 64, size=(3, 17)))
    full, via_raw = hasher.hash(ctok.compress(raw)), hasher.hash_tokens(raw)
    for l in (1, 5):
        assert torch.equal(full[l], via_raw[l])
    with pytest.raises(ValueError, match="vocab size 64"):
        hasher.hash_tokens(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="negative"):
        hasher.hash_tokens(torch.tensor([[1, -100]]))


# ---------------------------------------------------------------------------------------------- errors


def test_errors_bad_ids():
    hasher = NgramHasher(small_config(n=3), 50, 0)
    with pytest.raises(TypeError, match="integer"):
        hasher.hash(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="integer"):
        hasher.hash(torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor"):
        hasher.hash(np.zeros((2, 5), dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        hasher.hash(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        hasher.hash(torch.zeros(1, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="50"):
        hasher.hash(torch.tensor([[1, 2, 50]]))
    with pytest.raises(ValueError, match="negative"):
        hasher.hash(torch.tensor([[1, -1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        hasher.hash_incremental(hasher.initial_history(1), torch.zeros(1, 3))


def test_errors_vocab_and_pad():
    cfg = small_config(n=3)
    ctok = CompressedTokenizer.from_lookup([0, 1, 1, 2, 0, 3], "fp")  # V = 6, V' = 4
    with pytest.raises(ValueError, match="does not match"):
        NgramHasher(cfg, 5, 0, tokenizer=ctok)
    NgramHasher(cfg, 4, 0, tokenizer=ctok)  # consistent: fine
    with pytest.raises(ValueError, match="compressed_pad_id"):
        NgramHasher(cfg, 4, 4)
    with pytest.raises(ValueError, match="compressed_pad_id"):
        NgramHasher(cfg, 4, -1)
    with pytest.raises(ValueError, match="compressed_vocab_size"):
        NgramHasher(cfg, 0, 0)
    bad_pad = EngramConfig(
        engram_vocab_size=[31, 41], max_ngram_size=3, n_embed_per_ngram=4, n_head_per_ngram=2, layer_ids=[0], pad_id=6
    )
    with pytest.raises(ValueError, match="pad_id"):
        NgramHasher.from_tokenizer(bad_pad, ctok)
    # a config mutated into an invalid state after construction is re-validated
    cfg2 = small_config(n=3)
    cfg2.n_head_per_ngram = 3
    with pytest.raises(ValueError, match="divisible"):
        NgramHasher(cfg2, 10, 0)


# ---------------------------------------------------------------------------------------------- host reads


@pytest.fixture
def validation(monkeypatch):
    """Set the validation switch for one test; restored afterwards."""

    def set_(enabled: bool) -> None:
        monkeypatch.setattr(engram.validation, "_enabled", enabled)

    return set_


def _raw_hasher() -> tuple[NgramHasher, torch.Tensor]:
    ctok = CompressedTokenizer.from_lookup(np.arange(200) % 70, "fp")
    cfg = small_config(n=3, k=4, sizes=[9000, 700_000], layer_ids=(0, 3))
    raw = torch.randint(0, 200, (2, 33), generator=torch.Generator().manual_seed(0))
    return NgramHasher.from_tokenizer(cfg, ctok), raw


def test_count_host_reads_sees_a_read():
    """The counter itself can fail: a min/max check is counted."""
    with count_host_reads() as calls:
        int(torch.arange(5).max())
    assert calls


@pytest.mark.parametrize("entry", ["hash", "hash_tokens", "hash_incremental", "compress"])
def test_no_host_reads_with_validation_off(entry, validation):
    validation(False)
    hasher, raw = _raw_hasher()
    compressed = hasher.compress(raw)
    hasher.hash(compressed)  # device constants are cached before counting
    with count_host_reads() as calls:
        if entry == "hash":
            hasher.hash(compressed)
        elif entry == "hash_tokens":
            hasher.hash_tokens(raw)
        elif entry == "compress":
            hasher.compress(raw)
        else:
            history = hasher.advance_history(hasher.initial_history(2), compressed[:, :20])
            hasher.hash_incremental(history, compressed[:, 20:])
    assert calls == []


@pytest.mark.parametrize("entry", ["hash", "hash_tokens", "hash_incremental"])
def test_validation_on_reads_once_per_public_call(entry, validation):
    validation(True)
    hasher, raw = _raw_hasher()
    compressed = hasher.compress(raw)
    history = hasher.advance_history(hasher.initial_history(2), compressed[:, :20])
    with count_host_reads() as calls:
        if entry == "hash":
            hasher.hash(compressed)
        elif entry == "hash_tokens":
            hasher.hash_tokens(raw)
        else:
            hasher.hash_incremental(history, compressed[:, 20:])
    assert calls == ["tolist"]


def test_validation_off_keeps_type_and_shape_checks(validation):
    validation(False)
    hasher = NgramHasher(small_config(n=3), 50, 0)
    with pytest.raises(TypeError, match="integer"):
        hasher.hash(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        hasher.hash(torch.zeros(5, dtype=torch.long))
    hasher.hash(torch.tensor([[1, 2, 50]]))  # out of range, but not read back: no error by design
