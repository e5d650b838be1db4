"""Linear CKA with the unbiased HSIC estimator, and the soft alignment index."""

import itertools

import numpy as np
import pytest
import torch

from engram.experiments.cka import MinibatchCKA, gram, hsic_unbiased, linear_cka, soft_alignment_index


def _hsic_by_definition(k, l):
    """Song et al. (2012): the U-statistic over ordered distinct quadruples (i, j, q, r)."""
    n = k.shape[0]
    total = 0.0
    quads = list(itertools.permutations(range(n), 4))
    for i, j, q, r in quads:
        total += k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]
    return total / len(quads)


def _x(n=40, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_representations_have_cka_one():
    x = _x()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_unbiased_hsic_matches_the_u_statistic_definition():
    x, y = _x(n=7, d=3, seed=1), _x(n=7, d=2, seed=2)
    k, l = gram(x), gram(y)
    assert float(hsic_unbiased(k, l)) == pytest.approx(_hsic_by_definition(k.numpy(), l.numpy()), rel=1e-10)


def test_known_values_by_hand():
    # x = (1, 2, 3, 4), n = 4. Off-diagonal K~ = x_i x_j: row sums (9, 16, 21, 24), total 70,
    # tr(K~K~) = 2 * (4 + 9 + 16 + 36 + 64 + 144) = 546, 1^T K~ K~ 1 = 81 + 256 + 441 + 576 = 1354, so
    # HSIC(K, K) = [546 + 70^2 / 6 - 1354] / 4 = 13/6.
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]], dtype=torch.float64)
    assert float(hsic_unbiased(gram(x), gram(x))) == pytest.approx(13 / 6, rel=1e-12)
    # A constant feature has no covariance with anything: L~ = ones off the diagonal gives
    # tr = 70, S_K S_L / 6 = 70 * 12 / 6 = 140, 1^T K~ L~ 1 = 3 * 70 = 210, HSIC = (70 + 140 - 210) / 4 = 0.
    c = torch.ones(4, 1, dtype=torch.float64)
    assert float(hsic_unbiased(gram(x), gram(c))) == pytest.approx(0.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = _x(seed=3), _x(d=5, seed=4)
    y = y + 0.5 * x[:, :5]  # related, so CKA is well away from 0
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0.1 < base < 0.99
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x @ q * 2.0, y) == pytest.approx(base, rel=1e-10)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    x, y = _x(seed=3), _x(d=5, seed=4) + 0.5 * _x(seed=3)[:, :5]
    stretch = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1], dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y) - linear_cka(x, y)) > 1e-3


def test_minibatch_accumulator_pools_hsic_terms_before_the_ratio():
    xs = [_x(n=30, seed=s) for s in (6, 7)]
    ys = [x[:, :4] + 0.3 * _x(n=30, d=4, seed=s + 10) for s, x in zip((6, 7), xs)]
    acc = MinibatchCKA(1, 1)
    for x, y in zip(xs, ys):
        acc.update([x], [y])
    num = sum(hsic_unbiased(gram(x), gram(y)) for x, y in zip(xs, ys))
    kk = sum(hsic_unbiased(gram(x), gram(x)) for x in xs)
    ll = sum(hsic_unbiased(gram(y), gram(y)) for y in ys)
    den = torch.sqrt(kk * ll)
    assert float(acc.result()[0, 0]) == pytest.approx(float(num / den), rel=1e-12)
    one = MinibatchCKA(2, 1)
    one.update([xs[0], xs[0]], [xs[0]])
    assert one.result()[:, 0].tolist() == pytest.approx([1.0, 1.0])


def test_alignment_index_of_the_identity_is_the_diagonal():
    assert soft_alignment_index(np.eye(6), k=5).tolist() == pytest.approx([1, 2, 3, 4, 5, 6])


def test_alignment_index_on_a_known_matrix():
    s = np.array([[0.1, 0.0], [0.2, 0.9], [0.9, 0.3], [0.4, 0.6]])
    # column 0, top-2 rows 3 (0.9) and 4 (0.4): (0.9*3 + 0.4*4) / 1.3; column 1, rows 2 and 4: (0.9*2 + 0.6*4) / 1.5
    assert soft_alignment_index(s, k=2).tolist() == pytest.approx([(2.7 + 1.6) / 1.3, (1.8 + 2.4) / 1.5])
    # k = all rows: the similarity-weighted mean depth
    assert soft_alignment_index(s, k=10)[0] == pytest.approx((0.1 + 0.4 + 2.7 + 1.6) / 1.6)


def test_alignment_index_detects_a_shift_to_deeper_rows():
    shifted = np.roll(np.eye(8), 2, axis=0)[:, :6]  # column j peaks at row j + 2
    assert (soft_alignment_index(shifted, k=5) > np.arange(1, 7)).all()
