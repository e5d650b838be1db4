"""Sharded tables in the host and disk tiers: each rank's rows live in its own row store (host memory, or a row
file per rank) and are trained by the row-wise optimizer in that tier. A 2-rank run is the single-process run of
the same config; its checkpoints resume exactly after a kill, re-slice onto 1 or 2 ranks as the same rows and
row-optimizer state, and refuse missing files, another tier and too many ranks on every rank."""

import dataclasses
import os
import re
import signal

import pytest
import torch

from engram.distributed import ShardedEmbedding
from engram.files import FAULT_ENV, FAULT_MARKER_ENV
from engram.model import load_model
from engram.storage import offloaded_tables
from engram.train.optim import OptimConfig
from engram.train.trainer import RunConfig, train

from ..conftest import tiny_engram_run
from .launch import kill_ranks_when, run_ranks

TOL = 1e-4  # the tolerance of the device-sharded run equivalence (test_train.py)


def offload_run(out, corpus_dir, cache, tier, **train_kw) -> RunConfig:
    """The tiny Engram run with its table in ``tier`` (row-wise Adam, the one table optimizer of host / disk)."""
    kw = dict(steps=6, eval_every=3, log_every=1, ckpt_every=3, table_tier=tier, data_parallel="ddp")
    run = tiny_engram_run(out, corpus_dir, cache, **{**kw, **train_kw})
    return dataclasses.replace(run, optim=OptimConfig(table_optimizer="rowwise"))


def _train_worker(rank, world, run_dict, stop_after, pause_at=None, marker=None):
    from engram.distributed.checkpoint import gather_full_state_dict
    from engram.distributed.train import train_distributed

    def pause(record):  # wait to be killed after this step's update: the table files are ahead of the checkpoint
        if record["step"] == pause_at:
            marker.write_text(str(os.getpid()))
            while True:
                signal.pause()

    r = train_distributed(RunConfig.from_dict(run_dict), stop_after=stop_after, on_eval=pause)
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


def test_a_2_rank_disk_run_killed_after_during_and_inside_a_step_resumes_exactly(tmp_path, corpus_dir, monkeypatch):
    cache = tmp_path / "cache"
    kw = dict(steps=6, ckpt_every=2, eval_every=3)
    full, _ = run_ranks(
        _train_worker, 2, tmp_path, offload_run(tmp_path / "full", corpus_dir, cache, "disk", **kw).to_dict(), None
    )
    run = offload_run(tmp_path / "run", corpus_dir, cache, "disk", **kw).to_dict()
    ckpts = tmp_path / "run" / "checkpoints"
    # killed after step 3: the shards' files hold step 3, the latest checkpoint is step 2
    kill_ranks_when(_train_worker, 2, tmp_path, tmp_path / "paused", run, None, 3, tmp_path / "paused")
    assert (ckpts / "latest").read_text().strip() == "step_00000002"
    # killed inside the checkpoint of step 4 (journals sealed, step folder not yet published), then inside the
    # update of step 4 (row-optimizer state written in place, table rows not yet: a half-updated shard)
    monkeypatch.setenv(FAULT_MARKER_ENV, str(tmp_path / "fault"))
    for fault in ("checkpoint-4", "row-update-2"):
        monkeypatch.setenv(FAULT_ENV, fault)
        kill_ranks_when(_train_worker, 2, tmp_path, tmp_path / "fault", run, None)
        (tmp_path / "fault").unlink()
        assert (ckpts / "latest").read_text().strip() == "step_00000002"
    monkeypatch.delenv(FAULT_ENV)
    resumed, _ = run_ranks(_train_worker, 2, tmp_path, run, None)
    assert resumed["losses"] == full["losses"] and resumed["val"] == full["val"]
    for k, v in full["state"].items():
        assert torch.equal(resumed["state"][k], v), k


def resharding_run(out, corpus_dir, cache, tier, steps):
    """No decay (the warmup factor depends on the step only), so that a run extended on resume takes the steps
    an uninterrupted run takes."""
    run = offload_run(out, corpus_dir, cache, tier, steps=steps, ckpt_every=2, eval_every=2)
    return dataclasses.replace(run, optim=OptimConfig(table_optimizer="rowwise", schedule="constant"))


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_host_and_disk_shards_reshard_2_to_1_and_1_to_2_as_the_same_rows(tmp_path, corpus_dir, tier):
    cache, out = tmp_path / "cache", tmp_path / "run"
    table = "blocks.1.engram.table.weight"
    # 2 ranks train 2 steps and stop with a checkpoint
    saved, _ = run_ranks(_train_worker, 2, tmp_path, resharding_run(out, corpus_dir, cache, tier, 6).to_dict(), 2)
    # 1 process resumes it without training (train.steps = 2): the exported model holds the resharded rows
    (loaded,) = run_ranks(_train_worker, 1, tmp_path, resharding_run(out, corpus_dir, cache, tier, 2).to_dict(), None)
    assert torch.equal(loaded["state"][table], saved["interrupted_state"][table])
    # it trains on to step 4 as the single-process run does (row-optimizer state included), and saves a 1-rank
    # checkpoint, which 2 ranks load as the same rows
    (one,) = run_ranks(_train_worker, 1, tmp_path, resharding_run(out, corpus_dir, cache, tier, 4).to_dict(), None)
    assert_same_run(single_process(resharding_run(tmp_path / "reference", corpus_dir, cache, tier, 4)), one, TOL)
    two, _ = run_ranks(_train_worker, 2, tmp_path, resharding_run(out, corpus_dir, cache, tier, 4).to_dict(), None)
    assert torch.equal(two["state"][table], one["state"][table])


def _too_many_ranks_worker(rank, world):
    try:
        ShardedEmbedding([1], 4, tier="host")
    except ValueError as e:
        return str(e)
    return None


def test_a_table_with_fewer_rows_than_ranks_is_refused_on_every_rank(tmp_path):
    messages = run_ranks(_too_many_ranks_worker, 2, tmp_path)
    assert all(m is not None and "1 rows cannot give each of 2 ranks" in m for m in messages)


def failures(excinfo) -> list[str]:
    """The traceback of each rank that raised, from run_ranks' report (a rank left hanging shows as a timeout)."""
    text = str(excinfo.value)
    assert "did not finish" not in text, text
    return re.split(r"^rank \d+ failed:$", text, flags=re.MULTILINE)[1:]


@pytest.mark.parametrize(
    "missing, own_error, other_error",
    [
        ("tables/rank00001-of-00002/layer01.rows", "layer01.rows is missing", "rank 1 could not create its disk shard"),
        ("checkpoints/step_00000002/tables/rank00001-of-00002.journal.pt", "is missing from the checkpoint", None),
    ],
)
def test_resuming_a_disk_run_with_a_missing_rank_file_fails_on_every_rank(
    tmp_path, corpus_dir, missing, own_error, other_error
):
    run = offload_run(tmp_path / "run", corpus_dir, tmp_path / "cache", "disk").to_dict()
    run_ranks(_train_worker, 2, tmp_path, run, 2)
    (tmp_path / "run" / missing).unlink()
    with pytest.raises(AssertionError) as excinfo:
        run_ranks(_train_worker, 2, tmp_path, run, None, timeout=60)
    errors = failures(excinfo)
    assert len(errors) == 2, errors
    assert any(own_error in e for e in errors), errors
    assert (
        all(own_error in e or other_error in e for e in errors) if other_error else all(own_error in e for e in errors)
    )


def test_resuming_with_another_table_tier_is_refused_on_every_rank(tmp_path, corpus_dir):
    cache = tmp_path / "cache"
    run_ranks(_train_worker, 2, tmp_path, offload_run(tmp_path / "run", corpus_dir, cache, "host").to_dict(), 2)
    disk = offload_run(tmp_path / "run", corpus_dir, cache, "disk").to_dict()
    with pytest.raises(AssertionError) as excinfo:
        run_ranks(_train_worker, 2, tmp_path, disk, None, timeout=60)
    errors = failures(excinfo)
    assert len(errors) == 2 and all("train.table_tier was 'host'" in e for e in errors)
