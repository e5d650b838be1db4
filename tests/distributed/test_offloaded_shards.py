"""Sharded tables in the host and disk tiers: each rank's rows live in its own row store (host memory, or a row
file per rank) and are trained by the row-wise optimizer in that tier. A 2-rank run is the single-process run of
the same config; its checkpoints resume exactly after a kill, re-slice onto 1 or 2 ranks as the same rows and
row-optimizer state, and refuse missing files, another tier and too many ranks on every rank."""

import dataclasses
import os
import signal

import pytest
import torch

from engram.distributed import ShardedEmbedding
from engram.errors import CheckpointError, ConfigError
from engram.model import load_model
from engram.storage import offloaded_tables
from engram.train.optim import OptimConfig
from engram.train.trainer import RunConfig, train

from ..conftest import tiny_engram_run
from .launch import run_ranks

TOL = 1e-4  # the tolerance of the device-sharded run equivalence (test_train.py)


def offload_run(out, corpus_dir, cache, tier, **train_kw) -> RunConfig:
    """The tiny Engram run with its table in ``tier`` (row-wise Adam, the one table optimizer of host / disk)."""
    kw = dict(steps=6, eval_every=3, log_every=1, ckpt_every=3, table_tier=tier, data_parallel="ddp")
    run = tiny_engram_run(out, corpus_dir, cache, **{**kw, **train_kw})
    return dataclasses.replace(run, optim=OptimConfig(table_optimizer="rowwise"))


def _train_worker(rank, world, run_dict, stop_after, kill_at=None):
    from engram.distributed.checkpoint import gather_full_state_dict
    from engram.distributed.train import train_distributed

    def kill(record):  # a crash after the step's update: the table files are ahead of the last checkpoint
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    r = train_distributed(RunConfig.from_dict(run_dict), stop_after=stop_after, on_eval=kill)
    full = gather_full_state_dict(r.model) if r.interrupted else None
    return {
        "losses": [h["loss"] for h in r.history],
        "val": [e["val_loss"] for e in r.evals],
        "steps_done": r.steps_done,
        "state": {k: v.clone() for k, v in r.model.state_dict().items()} if rank == 0 and not r.interrupted else None,
        "interrupted_state": full,
    }


def single_process(run: RunConfig) -> dict:
    r = train(run)
    return {
        "losses": [h["loss"] for h in r.history],
        "val": [e["val_loss"] for e in r.evals],
        "state": {k: v.clone() for k, v in r.model.state_dict().items()},
    }


def assert_same_run(a, b, atol):
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=0, atol=atol)
    torch.testing.assert_close(torch.tensor(a["val"]), torch.tensor(b["val"]), rtol=0, atol=atol)
    assert set(a["state"]) == set(b["state"])
    for k, v in a["state"].items():
        torch.testing.assert_close(b["state"][k], v, rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_2_rank_run_with_host_or_disk_shards_is_the_single_process_run(tmp_path, corpus_dir, tier):
    cache = tmp_path / "cache"
    one = single_process(offload_run(tmp_path / "one", corpus_dir, cache, tier))
    two, _ = run_ranks(
        _train_worker, 2, tmp_path, offload_run(tmp_path / "two", corpus_dir, cache, tier).to_dict(), None
    )
    assert len(two["losses"]) == 6 and len(two["val"]) == 2
    assert_same_run(one, two, TOL)
    table = next(k for k in one["state"] if k.endswith("table.weight"))
    assert (two["state"][table] - one["state"][table]).abs().max() <= TOL  # the table rows are compared too
    if tier == "disk":  # one row file per rank while training, and the export is one disk table
        files = sorted(
            str(p.relative_to(tmp_path / "two" / "tables")) for p in (tmp_path / "two" / "tables").rglob("*.rows")
        )
        assert files == ["rank00000-of-00002/layer01.rows", "rank00001-of-00002/layer01.rows"]
    exported = load_model(tmp_path / "two" / "model")
    ((_, t),) = offloaded_tables(exported).values()
    assert t.store.kind == "disk"
    assert torch.equal(t.store.read_range(0, t.num_rows), two["state"][table])
