"""Hot-row cache: it never holds more bytes than its budget, keeps the most frequently accessed rows, counts
hits and misses per access, and never serves a row older than the table's."""

import pytest
import torch

from engram import MultiHeadEmbedding
from engram.storage import HotRowCache, OffloadedEmbedding, SparseRowOptimizer, zipf_profile

DIM = 4
ROW_BYTES = DIM * 4


def drive(cache, rows, counts=None, values=None):
    """One batch through the cache the way OffloadedEmbedding drives it; returns the hit mask."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    hit, _ = cache.lookup(rows, counts)
    cache.record(rows, counts)
    missed = rows[~hit]
    cache.admit(missed, values[~hit] if values is not None else missed.float().unsqueeze(1).expand(-1, DIM))
    return hit


def test_a_budget_smaller_than_one_row_is_refused():
    with pytest.raises(ValueError, match="holds no row"):
        HotRowCache(ROW_BYTES - 1, DIM, torch.float32, "cpu")


def test_capacity_is_whole_rows_within_the_byte_budget():
    cache = HotRowCache(10 * ROW_BYTES + 7, DIM, torch.float32, "cpu")
    assert cache.capacity_rows == 10 and cache.capacity_bytes == 10 * ROW_BYTES
    assert HotRowCache(10 * ROW_BYTES, DIM, torch.bfloat16, "cpu").capacity_rows == 20


def test_hits_and_misses_are_counted_per_access():
    cache = HotRowCache(4 * ROW_BYTES, DIM, torch.float32, "cpu")
    drive(cache, [1, 2, 3], counts=torch.tensor([5, 1, 2]))  # all miss: 8 accesses
    hit = drive(cache, [2, 3, 9], counts=torch.tensor([1, 3, 1]))  # 2 and 3 are cached now
    assert hit.tolist() == [True, True, False]
    s = cache.stats
    assert (s.hits, s.misses) == (4, 8 + 1)
    assert s.hit_rate == pytest.approx(4 / 13)
    assert s.bytes_used == 4 * ROW_BYTES == s.capacity_bytes and s.admissions == 4 and s.evictions == 0


def test_the_cache_keeps_the_most_frequent_rows_within_its_budget():
    cache = HotRowCache(3 * ROW_BYTES, DIM, torch.float32, "cpu")
    for step in range(30):
        batch = [0, 1, 2] + ([3] if step % 2 else []) + [10 + step]  # 0-2 every batch, 3 half, others once
        drive(cache, batch)
        assert cache.bytes_used <= cache.capacity_bytes
    assert cache.cached_rows().tolist() == [0, 1, 2]
    # a row that becomes the hottest displaces the coldest cached one
    for _ in range(200):
        drive(cache, [0, 1, 50])
    assert cache.cached_rows().tolist() == [0, 1, 50]
    assert cache.stats.evictions >= 1


def test_one_off_rows_do_not_churn_a_full_cache():
    cache = HotRowCache(2 * ROW_BYTES, DIM, torch.float32, "cpu")
    for _ in range(5):
        drive(cache, [7, 8])
    evictions = cache.stats.evictions
    for r in range(100, 150):
        drive(cache, [r])
    assert cache.cached_rows().tolist() == [7, 8] and cache.stats.evictions == evictions


def test_cached_values_are_the_values_admitted_and_update_replaces_them():
    cache = HotRowCache(4 * ROW_BYTES, DIM, torch.float32, "cpu")
    values = torch.randn(3, DIM)
    drive(cache, [4, 5, 6], values=values)
    hit, slots = cache.lookup(torch.tensor([6, 4]))
    assert hit.all() and torch.equal(cache.read(slots), values[[2, 0]])
    cache.update(torch.tensor([4, 99]), torch.ones(2, DIM))  # 99 is not cached: ignored
    _, slots = cache.lookup(torch.tensor([4]))
    assert torch.equal(cache.read(slots), torch.ones(1, DIM))
    cache.invalidate(torch.tensor([5]))
    assert cache.cached_rows().tolist() == [4, 6] and cache.stats.invalidations == 1


def test_aging_lets_a_new_hot_set_replace_an_old_one():
    cache = HotRowCache(2 * ROW_BYTES, DIM, torch.float32, "cpu", aging_period=20)
    for _ in range(50):
        drive(cache, [1, 2])
    for _ in range(50):
        drive(cache, [3, 4])
    assert cache.cached_rows().tolist() == [3, 4]


def test_hit_rate_on_a_zipf_stream_is_close_to_the_ideal_frequency_cache():
    g = torch.Generator().manual_seed(0)
    n = 5000
    p = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0
    perm = torch.randperm(n, generator=g)  # hot rows scattered over the table
    batches = [perm[torch.multinomial(p, 256, replacement=True, generator=g)] for _ in range(100)]
    cache = HotRowCache(200 * ROW_BYTES, DIM, torch.float32, "cpu")
    for b in batches:
        rows, counts = torch.unique(b, return_counts=True)
        drive(cache, rows, counts)
    ideal = zipf_profile(torch.cat(batches), dim=DIM).ideal_hit_rate(200 * ROW_BYTES)
    assert 0.85 * ideal <= cache.stats.hit_rate <= ideal


HEADS = [31, 37]


def ids_batch(seed):
    g = torch.Generator().manual_seed(seed)
    hot = torch.randint(0, 3, (4, 6, 2), generator=g)  # a few hot ids
    cold = torch.stack([torch.randint(0, s, (4, 6), generator=g) for s in HEADS], -1)
    return torch.where(torch.rand(4, 6, 2, generator=g) < 0.7, hot, cold)


def test_evicted_rows_are_read_again_from_the_store():
    torch.manual_seed(0)
    mhe = MultiHeadEmbedding(HEADS, DIM)
    table = OffloadedEmbedding.from_multihead(mhe, "host", cache_bytes=4 * ROW_BYTES)
    for seed in range(20):
        ids = ids_batch(seed)
        with torch.no_grad():
            assert torch.equal(table(ids), mhe(ids))
        assert table.cache.bytes_used <= 4 * ROW_BYTES
    s = table.cache_stats
    assert s.evictions > 0 and s.hits > 0 and s.misses > 0
    assert s.hits + s.misses == 20 * 4 * 6 * 2


def test_no_stale_rows_are_served_after_optimizer_updates():
    torch.manual_seed(0)
    mhe = MultiHeadEmbedding(HEADS, DIM)
    table = OffloadedEmbedding.from_multihead(mhe, "host", cache_bytes=6 * ROW_BYTES)
    opt = SparseRowOptimizer(table, lr=0.1)
    for seed in range(10):
        ids = ids_batch(seed)
        out = table(ids)
        truth = table.store.gather(table.fused_ids(ids).reshape(-1)).view_as(out)
        assert torch.equal(out, truth)  # what the forward served is what the table holds
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert table.cache_stats.hits > 0  # the cache was in play


def test_no_stale_rows_are_served_after_a_write_behind_the_cache():
    torch.manual_seed(0)
    mhe = MultiHeadEmbedding(HEADS, DIM)
    table = OffloadedEmbedding.from_multihead(mhe, "host", cache_bytes=6 * ROW_BYTES)
    ids = ids_batch(0)
    with torch.no_grad():
        table(ids)
        table(ids)
    rows = table.cache.cached_rows()
    assert rows.numel() > 0
    table.store.scatter(rows, torch.full((rows.numel(), DIM), 9.0))  # straight into the store
    with torch.no_grad():
        mhe.weight[rows] = 9.0
        assert torch.equal(table(ids), mhe(ids))


def offer(cache, rows, values=None):
    """One batch through the deferred path (what OffloadedEmbedding calls); returns the hit mask."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    hit, _ = cache.lookup(rows)
    missed = rows[~hit]
    vals = values[~hit] if values is not None else missed.float().unsqueeze(1).expand(-1, DIM)
    cache.offer(rows, torch.ones_like(rows), missed, vals)
    return hit


def test_offers_are_admitted_in_rounds_of_admit_every_accesses():
    """Offered batches change nothing until admit_every accesses are queued; then one round admits them as
    record + admit per batch would have (same rows kept, same counts), and hits/misses are counted meanwhile."""
    deferred = HotRowCache(3 * ROW_BYTES, DIM, torch.float32, "cpu", admit_every=12)
    direct = HotRowCache(3 * ROW_BYTES, DIM, torch.float32, "cpu")
    batches = [[0, 1, 2, 7], [0, 1, 8, 9], [0, 2, 1, 5]]  # 12 accesses: the third offer runs the round
    for i, batch in enumerate(batches):
        assert not offer(deferred, batch).any()  # nothing admitted before the round
        assert deferred.size == (0 if i < 2 else 3)
        drive(direct, batch)
    assert deferred.cached_rows().tolist() == [0, 1, 2] == direct.cached_rows().tolist()
    assert torch.equal(deferred.estimate(torch.arange(10)), direct.estimate(torch.arange(10)))
    assert (deferred.stats.hits, deferred.stats.misses) == (0, 12)
    assert offer(deferred, [0, 1, 2, 3]).tolist() == [True, True, True, False]
    slots = deferred.lookup(torch.tensor([0, 1, 2]))[1]
    assert deferred.read(slots)[:, 0].tolist() == [0.0, 1.0, 2.0]  # the values offered with each row


def test_writes_settle_queued_offers_so_no_stale_value_is_admitted():
    """A row written while its offer is queued ends up cached with the written value (update admits the queue
    first, then writes through); invalidate and clear never let a queued offer bring a dropped row back."""
    cache = HotRowCache(4 * ROW_BYTES, DIM, torch.float32, "cpu", admit_every=100)
    offer(cache, [3, 4])
    cache.update(torch.tensor([3]), torch.full((1, DIM), 30.0))
    slots = cache.lookup(torch.tensor([3, 4]))[1]
    assert cache.read(slots)[:, 0].tolist() == [30.0, 4.0]
    offer(cache, [5])
    cache.invalidate(torch.tensor([5]))
    cache.flush()
    assert 5 not in cache.cached_rows().tolist()
    offer(cache, [6])
    cache.clear()
    cache.flush()
    assert cache.size == 0


def test_deferred_cache_serves_the_rows_of_the_table_with_evictions():
    """Through OffloadedEmbedding (deferred admission, a cache far smaller than the table, Zipf ids): every
    forward equals the table without a cache, rows are evicted and hits happen."""
    torch.manual_seed(0)
    mhe = MultiHeadEmbedding([97, 89], DIM)
    cached = OffloadedEmbedding.from_multihead(mhe, "host", cache_bytes=8 * ROW_BYTES)
    plain = OffloadedEmbedding.from_multihead(mhe, "host")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(200):
            ids = (torch.distributions.Pareto(1.0, 1.2).sample((3, 2)).long() - 1) % 89
            ids = ids[torch.randperm(3, generator=gen)]
            assert torch.equal(cached(ids), plain(ids))
    s = cached.cache_stats
    assert s.hits > 0 and s.evictions > 0 and s.bytes_used <= 8 * ROW_BYTES


def test_a_cache_in_the_same_memory_as_its_table_is_reported(caplog, tmp_path):
    """A host table on a CPU compute device keeps its rows in the memory the cache would use: asking for a cache
    there logs why it cannot pay off; in front of a disk table nothing is logged."""
    mhe = MultiHeadEmbedding(HEADS, DIM)
    ids = ids_batch(0)
    with caplog.at_level("WARNING", logger="engram.storage.embedding"), torch.no_grad():
        OffloadedEmbedding.from_multihead(mhe, "disk", cache_bytes=4 * ROW_BYTES, path=tmp_path / "t.rows")(ids)
        assert not caplog.records
        OffloadedEmbedding.from_multihead(mhe, "host", cache_bytes=4 * ROW_BYTES)(ids)
    assert len(caplog.records) == 1 and "saves no read" in caplog.records[0].getMessage()
