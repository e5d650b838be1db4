"""Zipf profile: recovers the exponent of synthetic Zipf samples, and its coverage / ideal cache hit rates are
the exact fractions of accesses to the most accessed rows."""

import pytest
import torch

from engram.storage import count_rows, zipf_profile


def zipf_samples(s, n=20000, samples=300000, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.arange(1, n + 1, dtype=torch.float64) ** -s
    perm = torch.randperm(n, generator=g)  # rank order unrelated to the row id
    return perm[torch.multinomial(p / p.sum(), samples, replacement=True, generator=g)]


@pytest.mark.parametrize("s", [0.8, 1.0, 1.3])
def test_recovers_a_known_zipf_exponent(s):
    profile = zipf_profile(zipf_samples(s))
    assert profile.exponent == pytest.approx(s, abs=0.05)
    assert profile.fit_r2 > 0.99


def test_counts_are_exact_and_batches_equal_one_tensor():
    ids = torch.tensor([[5, 5, 5], [7, 5, 9]])
    rows, counts = count_rows(ids)
    assert rows.tolist() == [5, 7, 9] and counts.tolist() == [4, 1, 1]
    batched = count_rows(iter([ids[0], ids[1].numpy()]))
    assert torch.equal(batched[0], rows) and torch.equal(batched[1], counts)


def test_coverage_and_ideal_hit_rate_are_fractions_of_accesses_to_the_top_rows():
    # counts 40, 30, 20, 10 (rows 0..3) in a table of 8 rows of 4 float32 values (16 bytes)
    ids = torch.cat([torch.full((c,), r) for r, c in enumerate([40, 30, 20, 10])])
    ids = torch.cat([ids] + [torch.arange(4)] * 5)  # +5 each: 45, 35, 25, 15, enough for a fit
    profile = zipf_profile(ids, num_rows=8, dim=4, dtype=torch.float32)
    assert (profile.accesses, profile.distinct_rows) == (120, 4)
    assert profile.coverage(0.25) == pytest.approx(80 / 120)  # top 2 of 8 table rows
    assert profile.ideal_hit_rate(16) == pytest.approx(45 / 120)  # one row fits
    assert profile.ideal_hit_rate(47) == pytest.approx(80 / 120)  # two whole rows fit, not three
    assert profile.ideal_hit_rate(10**6) == 1.0
    assert zipf_profile(ids).coverage(0.5) == pytest.approx(80 / 120)  # of the distinct rows without num_rows


def test_summary_is_a_markdown_table_of_the_profile():
    profile = zipf_profile(zipf_samples(1.0, samples=50000), dim=32, dtype=torch.bfloat16)
    text = profile.summary(top_fractions=[0.01], cache_bytes=[64 << 10])
    assert "Zipf exponent s | 0.9" in text or "Zipf exponent s | 1.0" in text
    assert "ideal cache hit rate, 64.0 KiB" in text and text.startswith("| metric | value |")


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        zipf_profile(torch.tensor([1, -2]))
    with pytest.raises(TypeError, match="integers"):
        zipf_profile(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="too few to fit"):
        zipf_profile(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="outside a table"):
        zipf_profile(torch.arange(10).repeat(10), num_rows=5)
    with pytest.raises(ValueError, match="dim="):
        zipf_profile(torch.arange(10).repeat(10)).ideal_hit_rate(100)
    with pytest.raises(ValueError, match="no row ids"):
        zipf_profile([])
