"""A row-sharded table looks up and trains exactly like the dense table it was cut from."""

import pytest
import torch
import torch.distributed as dist

from engram.distributed import RowExchange, ShardedEmbedding, owners, shard_bounds
from engram.module import MultiHeadEmbedding
from engram.storage.tiers import init_rows

from .launch import run_ranks

HEADS, DIM = [7, 11, 5, 13], 4


@pytest.mark.parametrize("rows,world", [(36, 3), (5, 4), (2, 3), (0, 2), (1000, 7)])
def test_shards_are_contiguous_cover_every_row_once_and_differ_by_at_most_one_row(rows, world):
    b = shard_bounds(rows, world)
    assert b[0] == 0 and b[-1] == rows and b == sorted(b)
    sizes = [hi - lo for lo, hi in zip(b, b[1:])]
    assert max(sizes) - min(sizes) <= 1
    ids = torch.arange(rows)
    assert torch.equal(owners(ids, b), torch.repeat_interleave(torch.arange(world), torch.tensor(sizes)))


def _lookup_worker(rank, world):
    torch.manual_seed(0)
    dense = MultiHeadEmbedding(HEADS, DIM)
    # the global batch: 4 rows per rank, heavy on duplicates (small heads), plus a row only rank 0 asks for
    ids = torch.stack([torch.randint(0, s, (4 * world, 6)) for s in HEADS], -1)
    mine = slice(4 * rank, 4 * rank + 4)
    out = {}
    sharded = ShardedEmbedding.from_dense(dense)
    for prefetch in (False, True):
        sharded.weight.grad = dense.weight.grad = None
        if prefetch:
            sharded.prefetch(ids[mine])
        rows = sharded(ids[mine])
        ref = dense(ids)
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
        # per-rank mean loss and global mean loss: the sharded table must average like data parallelism does
        (rows * probe[mine]).sum().div(4).backward()
        (ref * probe).sum().div(4 * world).backward()
        out[prefetch] = dict(
            rows_ok=torch.equal(rows, ref[mine]),
            grad_err=(sharded.weight.grad - dense.weight.grad[sharded.start : sharded.end]).abs().max()
            if sharded.end > sharded.start
            else torch.tensor(0.0),
        )
    # a batch that needs no row of the last rank: empty splits in every exchange, and an owner left idle
    same = torch.zeros(2, 3, len(HEADS), dtype=torch.int64)
    sharded.weight.grad = dense.weight.grad = None
    sharded(same).sum().backward()
    dense(same).sum().backward()  # the mean over ranks of identical per-rank losses is one rank's loss
    out["empty_splits_grad_err"] = (sharded.weight.grad - dense.weight.grad[sharded.start : sharded.end]).abs().max()
    plan = RowExchange(sharded.fused_ids(ids[mine]), sharded.bounds)
    out["unique"] = plan.num_unique
    out["distinct"] = int((ids[mine] + sharded.offsets).unique().numel())
    out["asked_of_me"] = plan.served.numel()
    out["rows"] = sharded.weight.detach().clone()
    seeded = ShardedEmbedding(HEADS, DIM, init_std=0.5, seed=3)
    out["seeded"] = seeded.weight.detach().clone()
    return out


def test_sharded_lookup_returns_the_dense_rows_and_owners_get_the_dense_gradient(tmp_path):
    world = 3  # 36 rows over 3 ranks; duplicates inside and across ranks
    res = run_ranks(_lookup_worker, world, tmp_path)
    torch.manual_seed(0)
    dense = MultiHeadEmbedding(HEADS, DIM)
    assert torch.equal(torch.cat([r["rows"] for r in res]), dense.weight.detach())
    for r in res:
        for prefetch in (False, True):
            assert r[prefetch]["rows_ok"], f"prefetch={prefetch}: rows differ from the dense lookup"
            assert float(r[prefetch]["grad_err"]) < 1e-6, f"prefetch={prefetch}: row gradients differ"
        assert r["unique"] == r["distinct"], "each distinct row must be requested exactly once"
        assert float(r["empty_splits_grad_err"]) < 1e-6
    # every request was answered by exactly one owner
    assert sum(r["asked_of_me"] for r in res) == sum(r["unique"] for r in res)
    # initial rows depend on the seed and the row index, not on how many ranks share the table
    assert torch.equal(torch.cat([r["seeded"] for r in res]), init_rows(0, sum(HEADS), DIM, 0.5, 3))


def _error_worker(rank, world):
    table = ShardedEmbedding(HEADS, DIM)
    bad = torch.zeros(2, 3, len(HEADS), dtype=torch.int64)
    bad[0, 0, 1] = HEADS[1]  # one past the end of head 1
    try:
        table(bad)
    except ValueError as e:
        return str(e)
    return None


def test_out_of_range_ids_are_refused_before_anything_is_sent(tmp_path):
    msgs = run_ranks(_error_worker, 2, tmp_path)
    assert all(m is not None and "out of range" in m for m in msgs)


def test_a_table_without_a_process_group_says_how_to_get_one():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedEmbedding(HEADS, DIM)
