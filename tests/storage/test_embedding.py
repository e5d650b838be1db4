"""OffloadedEmbedding is a drop-in for MultiHeadEmbedding in every tier: same outputs, same gradients, same
checkpoints; prefetch changes nothing but timing; ids are validated as MultiHeadEmbedding validates them."""

import pytest
import torch

from engram import Engram, EngramConfig, MultiHeadEmbedding, NgramHasher
from engram.storage import TIERS, OffloadedEmbedding, create_row_store, fetch_seconds, offload_tables
from engram.table import EngramTable

HEADS, DIM = [11, 13, 17, 19], 6


def tier_kwargs(tier, tmp_path, name="table"):
    return {"path": tmp_path / f"{name}.rows"} if tier == "disk" else {}


def random_ids(batch=3, seq=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, s, (batch, seq), generator=g) for s in HEADS], dim=-1)


@pytest.fixture
def mhe():
    torch.manual_seed(0)
    return MultiHeadEmbedding(HEADS, DIM)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("cache_bytes", [0, 5 * DIM * 4])
def test_output_equals_multihead_output_after_from_multihead(mhe, tmp_path, tier, cache_bytes):
    table = OffloadedEmbedding.from_multihead(mhe, tier, cache_bytes=cache_bytes, **tier_kwargs(tier, tmp_path))
    assert isinstance(table, EngramTable) and table.head_sizes == HEADS and torch.equal(table.offsets, mhe.offsets)
    assert table.store.kind == tier
    for seed in range(4):  # several batches, so that a cache fills and evicts
        ids = random_ids(seed=seed)
        out = table(ids)
        assert out.shape == (3, 5, len(HEADS), DIM)
        assert torch.equal(out, mhe(ids))


@pytest.mark.parametrize("tier", TIERS)
def test_to_multihead_carries_the_rows_over_exactly(mhe, tmp_path, tier):
    table = OffloadedEmbedding.from_multihead(mhe, tier, **tier_kwargs(tier, tmp_path))
    back = table.to_multihead()
    assert isinstance(back, MultiHeadEmbedding) and back.head_sizes == HEADS
    assert torch.equal(back.weight, mhe.weight) and torch.equal(back.offsets, mhe.offsets)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("cache_bytes", [0, 8 * DIM * 4])
def test_prefetch_then_forward_equals_forward(mhe, tmp_path, tier, cache_bytes):
    table = OffloadedEmbedding.from_multihead(mhe, tier, cache_bytes=cache_bytes, **tier_kwargs(tier, tmp_path))
    a, b, c = random_ids(seed=1), random_ids(seed=2), random_ids(seed=3)
    table.prefetch(a)
    table.prefetch(b.clone())  # matched by value, not only by identity
    assert torch.equal(table(a), mhe(a))
    assert torch.equal(table(c), mhe(c))  # a forward nobody prefetched for is still right
    assert torch.equal(table(b), mhe(b))
    assert len(table._pending) == 0  # both prefetches were consumed by their forwards


def test_a_prefetch_whose_ids_were_changed_in_place_is_not_used(mhe):
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    ids = random_ids(seed=4)
    table.prefetch(ids)
    ids[0, 0, 0] = (ids[0, 0, 0] + 1) % HEADS[0]
    assert torch.equal(table(ids), mhe(ids))


def test_pending_prefetches_are_bounded(mhe):
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    for seed in range(5):
        table.prefetch(random_ids(seed=seed))
    assert len(table._pending) == table.max_pending == 2


@pytest.mark.parametrize("tier", TIERS)
def test_prefetched_rows_see_updates_made_before_their_forward(mhe, tmp_path, tier):
    table = OffloadedEmbedding.from_multihead(mhe, tier, cache_bytes=4 * DIM * 4, **tier_kwargs(tier, tmp_path))
    ids = random_ids(seed=5)
    table(ids)  # warm the cache
    table.prefetch(ids)
    rows = table.fused_ids(ids).reshape(-1).unique()[:3]
    table.update_rows(rows, torch.ones(3, DIM))
    with torch.no_grad():
        mhe.weight[rows] += 1
    assert torch.equal(table(ids), mhe(ids))
    # a write that bypasses the embedding (straight into the store) drops every copy it holds
    table.prefetch(ids)
    table.store.scatter(rows, torch.zeros(3, DIM))
    with torch.no_grad():
        mhe.weight[rows] = 0
    assert torch.equal(table(ids), mhe(ids))


def test_row_gradients_equal_the_multihead_weight_gradient(mhe):
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    ids = random_ids(seed=6)
    target = torch.randn(3, 5, len(HEADS), DIM)
    ((table(ids) - target) ** 2).sum().backward()
    ((mhe(ids) - target) ** 2).sum().backward()
    rows, grad = table.row_grads()
    assert torch.equal(rows, table.fused_ids(ids).unique())
    torch.testing.assert_close(grad, mhe.weight.grad[rows])
    untouched = torch.ones(table.num_rows, dtype=torch.bool)
    untouched[rows] = False
    assert torch.all(mhe.weight.grad[untouched] == 0)  # the rows we report are all the rows with gradient


def test_row_gradients_are_bit_identical_from_run_to_run_with_threads():
    """Rows repeated many times in a batch get their gradient summed in one fixed order whatever the threads do,
    and exactly as the on-device table sums them: two runs of a training job (or a run and its resume) see the same
    bits."""
    heads, dim = [3, 5], 64
    mhe = MultiHeadEmbedding(heads, dim)
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, h, (64, 512), generator=gen) for h in heads], dim=-1)
    weight = torch.randn(64, 512, len(heads), dim, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(6):
            table.zero_grad()
            (table(ids) * weight).sum().backward()
            grads.append(table.row_grads()[1])
        (mhe(ids) * weight).sum().backward()
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(g, grads[0]) for g in grads)
    assert torch.equal(grads[0], mhe.weight.grad)


def test_gradients_of_several_forwards_are_summed_and_cleared_by_zero_grad(mhe):
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    a, b = random_ids(seed=7), random_ids(seed=8)
    (table(a).sum() + 2 * table(b).sum()).backward()
    (mhe(a).sum() + 2 * mhe(b).sum()).backward()
    rows, grad = table.row_grads()
    torch.testing.assert_close(grad, mhe.weight.grad[rows])
    table.zero_grad()
    assert table.row_grads() is None
    with torch.no_grad():
        table(a)
    assert table.row_grads() is None and not table._captures


def test_state_dict_is_interchangeable_with_multihead(mhe, tmp_path):
    table = OffloadedEmbedding.create(HEADS, DIM, tier="disk", path=tmp_path / "t.rows", seed=1)
    assert list(table.state_dict()) == ["weight"]
    table.load_state_dict(mhe.state_dict())
    ids = random_ids(seed=9)
    assert torch.equal(table(ids), mhe(ids))
    other = MultiHeadEmbedding(HEADS, DIM)
    other.load_state_dict(table.state_dict())
    assert torch.equal(other.weight, mhe.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        table.load_state_dict({"weight": torch.zeros(3, DIM)})


def test_create_builds_the_table_in_its_tier_with_the_store_initialisation(tmp_path):
    table = OffloadedEmbedding.create(HEADS, DIM, tier="host", seed=4, init_std=0.1)
    ref = create_row_store("disk", sum(HEADS), DIM, seed=4, init_std=0.1, path=tmp_path / "r.rows")
    assert table.store.kind == "host" and table.offsets.device.type == "cpu"
    assert torch.equal(table.store.read_range(0, sum(HEADS)), ref.read_range(0, sum(HEADS)))


def test_bad_ids_and_mismatched_stores_are_refused(mhe):
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    with pytest.raises(TypeError, match="int64"):
        table(random_ids().int())
    with pytest.raises(ValueError, match="one id per head"):
        table(random_ids()[..., :3])
    bad = random_ids()
    bad[0, 0, 1] = HEADS[1]
    with pytest.raises(ValueError, match="out of range"):
        table(bad)
    with pytest.raises(ValueError, match=r"\[60, 6\]"):
        OffloadedEmbedding(HEADS, DIM, create_row_store("host", 10, DIM))
    with pytest.raises(TypeError, match="RowStore"):
        OffloadedEmbedding(HEADS, DIM, mhe.weight)


def test_engram_module_gives_the_same_output_with_an_offloaded_table():
    config = EngramConfig(
        engram_vocab_size=[101, 103], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1]
    )
    hasher = NgramHasher(config, 50, 0)
    torch.manual_seed(0)
    engram = Engram(config, layer_id=1, hidden_size=8, hasher=hasher)
    hidden = torch.randn(2, 7, 8)
    hash_ids = hasher.hash(torch.randint(0, 50, (2, 7)))[1]
    expected = engram(hidden, hash_ids=hash_ids)
    engram.table = OffloadedEmbedding.from_multihead(engram.table, "host", cache_bytes=256)
    engram.table.prefetch(hash_ids)
    torch.testing.assert_close(engram(hidden, hash_ids=hash_ids), expected, rtol=0, atol=0)


def test_fetch_seconds_is_the_placement_rule():
    # 8192 tokens x 8 heads x 160 dims x 2 bytes at 25 GB/s, plus 0.1 ms of gather
    assert fetch_seconds(8192, 8, 160, 2, 25e9, 1e-4) == pytest.approx(8192 * 8 * 160 * 2 / 25e9 + 1e-4)
    with pytest.raises(ValueError):
        fetch_seconds(1, 1, 1, 1, 0)


def test_prefetch_works_for_ids_made_in_inference_mode(mhe):
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    with torch.inference_mode():
        ids = random_ids(seed=10)
        table.prefetch(ids)
        ids[0, 0, 0] = (ids[0, 0, 0] + 1) % HEADS[0]  # changed after the prefetch: must not be served
        assert torch.equal(table(ids), mhe(ids))
        table.prefetch(ids)
        assert torch.equal(table(ids), mhe(ids)) and len(table._pending) == 1  # the stale one is left


def small_engram(device=None):
    config = EngramConfig(
        engram_vocab_size=[101, 103], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1, 3]
    )
    hasher = NgramHasher(config, 50, 0)
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        Engram(config, layer_id=l, hidden_size=8, hasher=hasher, device=device) for l in config.layer_ids
    )
    return layers, hasher


def test_offload_tables_swaps_every_table_of_a_model_and_keeps_its_outputs(tmp_path):
    layers, hasher = small_engram()
    hidden = torch.randn(2, 7, 8)
    hash_ids = hasher.hash(torch.randint(0, 50, (2, 7)))
    expected = [m(hidden, hash_ids=hash_ids[m.layer_id]) for m in layers]
    tables = offload_tables(layers, "disk", path_dir=tmp_path)
    assert sorted(tables) == ["0.table", "1.table"] and (tmp_path / "0.table.rows").is_file()
    assert not any(isinstance(m, MultiHeadEmbedding) for m in layers.modules())
    for m, want in zip(layers, expected):
        m.table.prefetch(hash_ids[m.layer_id])
        assert torch.equal(m(hidden, hash_ids=hash_ids[m.layer_id]), want)


def test_tables_of_a_meta_model_are_created_in_their_tier_and_survive_to_empty():
    layers, _ = small_engram(device="meta")
    tables = offload_tables(layers, "host", seed=5)
    layers.to_empty(device="cpu")  # materialise the rest of the model
    table = tables["1.table"]
    ref = create_row_store("host", table.num_rows, table.head_dim, seed=6)
    assert torch.equal(table.store.read_range(0, table.num_rows), ref.read_range(0, table.num_rows))
    sizes = torch.tensor(table.head_sizes)
    assert torch.equal(table.offsets, torch.cumsum(sizes, 0) - sizes) and torch.equal(table.sizes, sizes)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tier", TIERS)
def test_on_cuda_prefetched_rows_and_updates_match_the_table(mhe, tmp_path, tier):
    from engram.storage import SparseRowOptimizer

    mhe = mhe.cuda()
    table = OffloadedEmbedding.from_multihead(mhe, tier, cache_bytes=8 * DIM * 4, **tier_kwargs(tier, tmp_path))
    assert table.offsets.device.type == "cuda"
    if tier == "host":
        assert table.store.pinned
    opt = SparseRowOptimizer(table, lr=0.1)
    for seed in range(4):
        ids = random_ids(seed=seed)  # hash ids on the CPU, as the hasher makes them
        table.prefetch(ids)
        out = table(ids)
        truth = table.store.gather(table.fused_ids(ids).reshape(-1)).view_as(out)
        assert out.device.type == "cuda" and torch.equal(out.cpu(), truth.cpu())
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert table.cache_stats.hits > 0


def test_update_rows_applies_each_rows_own_scale_whatever_the_row_order(mhe):
    table = OffloadedEmbedding.from_multihead(mhe, "host")
    rows = torch.tensor([9, 2, 40])  # not sorted: the write sorts them, scale must follow
    scale = torch.tensor([[0.5], [2.0], [1.0]])
    delta = torch.arange(3 * DIM, dtype=torch.float32).view(3, DIM)
    before = mhe.weight.detach()[rows]
    table.update_rows(rows, delta, scale)
    torch.testing.assert_close(table.store.gather(rows), before * scale + delta)
