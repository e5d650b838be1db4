"""A checkpoint of sharded tables resumes on another number of ranks as the same model and the same run."""

import json

import pytest
import torch

from engram.distributed import clip_grad_norm_, global_mean, parallelize, sync_expert_counts, unwrap
from engram.distributed.checkpoint import ShardedCheckpointManager, gather_full_state_dict
from engram.train.checkpoint import CheckpointError
from engram.train.optim import OptimConfig, build_optimizers

from .launch import run_ranks
from .test_parallel import LOCAL_B, tiny_model

STEPS = 4  # two before the checkpoint, two after


def batches():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 120, (2 * LOCAL_B, 17), generator=g) for _ in range(STEPS + 1)]


def setup(mode):
    model = tiny_model(seed=5)
    call = parallelize(model, mode)
    return model, call, build_optimizers(model, OptimConfig(warmup_steps=0, lr=3e-3, muon=False))


def step(model, call, optimizers, batch, rank, world):
    rows = batch.shape[0] // world
    b = batch[rank * rows : (rank + 1) * rows]
    loss = call(b[:, :-1], b[:, 1:]).loss
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    loss.backward()
    clip_grad_norm_(model, 1.0)
    for o in optimizers:
        o.step()
    sync_expert_counts(model)
    model.update_moe_biases()
    return global_mean(loss)


def _save_worker(rank, world, folder, mode, save_at, load):
    """Optionally load the latest checkpoint; train up to STEPS, saving after step ``save_at``."""
    model, call, opts = setup(mode)
    ckpt = ShardedCheckpointManager(folder, keep_last=2)
    first = 0
    out = {}
    if load:
        first = ckpt.load(unwrap(call), opts)["step"]
        out["loaded"] = gather_full_state_dict(model)
    losses = {}
    for i in range(first, STEPS):
        losses[i + 1] = step(model, call, opts, batches()[i], rank, world)
        if i + 1 == save_at:
            ckpt.save(i + 1, model, opts, {"config": {"world": world}, "extra": {"note": "x"}})
            out["saved"] = gather_full_state_dict(model)
    out["final"] = gather_full_state_dict(model)
    out["losses"] = losses
    return out


def assert_same(a, b, atol):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def test_resharding_2_to_1_and_1_to_2_gives_the_same_model_and_continues_the_run(tmp_path):
    folder = tmp_path / "ckpt"
    # 2 ranks (FSDP2) train 4 steps and save after step 2
    two, _ = run_ranks(_save_worker, 2, tmp_path, folder, "fsdp", 2, False)
    files = json.loads((folder / "step_00000002" / "manifest.json").read_text())["files"]
    assert {"tables/rank00000-of-00002.safetensors", "tables/rank00001-of-00002.safetensors"} <= set(files)

    # 1 rank (DDP) resumes from it: exactly the saved model, then the same two steps
    (one,) = run_ranks(_save_worker, 1, tmp_path, folder, "ddp", 4, True)
    assert_same(one["loaded"], two["saved"], atol=0)
    assert sorted(one["losses"]) == [3, 4]
    for s in (3, 4):
        assert abs(one["losses"][s] - two["losses"][s]) < 2e-5
    assert_same(one["final"], two["final"], atol=2e-5)

    # and 2 ranks resume the 1-rank checkpoint of step 4 exactly
    (again, _) = run_ranks(_save_worker, 2, tmp_path, folder, "fsdp", None, True)
    assert_same(again["loaded"], one["saved"], atol=0)


def _corrupt_worker(rank, world, folder):
    model, call, opts = setup("ddp")
    try:
        ShardedCheckpointManager(folder).load(unwrap(call), opts)
    except CheckpointError as e:
        return str(e)
    return None


def test_a_corrupt_table_shard_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    run_ranks(_save_worker, 2, tmp_path, folder, "ddp", 1, False)
    shard = folder / "step_00000001" / "tables" / "rank00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    msgs = run_ranks(_corrupt_worker, 1, tmp_path, folder)
    assert msgs[0] is not None and "rank00001-of-00002.safetensors" in msgs[0]


@pytest.mark.parametrize("rows,old,new", [(23, 2, 3), (23, 3, 1), (5, 4, 2)])
def test_resliced_rows_are_the_saved_rows(tmp_path, rows, old, new):
    """Row bookkeeping alone (no processes): reading [start, end) back from any saved layout."""
    from safetensors.torch import save_file

    from engram.distributed import shard_bounds
    from engram.distributed.checkpoint import ShardedCheckpointManager as M

    full = torch.arange(rows * 2, dtype=torch.float32).view(rows, 2)
    step_t = torch.tensor(7.0)
    b_old = shard_bounds(rows, old)
    names = []
    for r in range(old):
        names.append(f"r{r}.safetensors")
        save_file(
            {
                "t.weight": full[b_old[r] : b_old[r + 1]].contiguous(),
                "t.weight::exp_avg": full[b_old[r] : b_old[r + 1]].contiguous() * 2,
                "t.weight::step": step_t,
            },
            str(tmp_path / names[-1]),
        )

    class Table:
        def __init__(self, start, end):
            self.start, self.end = start, end
            self.weight = torch.nn.Parameter(torch.empty(end - start, 2))

    from safetensors import safe_open

    b_new = shard_bounds(rows, new)
    got, moments = [], []
    for r in range(new):
        t = Table(b_new[r], b_new[r + 1])
        handles = {i: safe_open(str(tmp_path / n), framework="pt") for i, n in enumerate(names)}
        state = M._read_rows(handles, {"tables": {"t.weight": {"bounds": b_old}}}, {"t": t})["t.weight"]
        got.append(t.weight.detach())
        moments.append(state["exp_avg"])
        assert state["step"] == step_t
    assert torch.equal(torch.cat(got), full)
    assert torch.equal(torch.cat(moments), full * 2)
