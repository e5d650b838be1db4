"""`engram train` under torchrun: the same run on 2 ranks or 1, interrupted on 2 and finished on 1, and the CLI."""

import os
import shutil
import subprocess

import pytest
import torch
import yaml

from engram.model import load_model
from engram.train.trainer import RunConfig

from ..conftest import tiny_engram_run
from .launch import run_ranks


def tiny_run(out, corpus_dir, cache, **train_kw) -> dict:
    kw = dict(steps=6, eval_every=3, log_every=1, ckpt_every=3)
    return tiny_engram_run(out, corpus_dir, cache, **{**kw, **train_kw}).to_dict()


def _train_worker(rank, world, run_dict, stop_after):
    from engram.distributed.train import train_distributed

    r = train_distributed(RunConfig.from_dict(run_dict), stop_after=stop_after)
    return {
        "losses": [h["loss"] for h in r.history],
        "val": [e["val_loss"] for e in r.evals],
        "steps_done": r.steps_done,
        "interrupted": r.interrupted,
        "state": {k: v.clone() for k, v in r.model.state_dict().items()} if rank == 0 and not r.interrupted else None,
    }


def test_a_run_interrupted_on_2_ranks_and_finished_on_1_matches_the_2_rank_run(tmp_path, corpus_dir):
    cache = tmp_path / "cache"
    full, _ = run_ranks(_train_worker, 2, tmp_path, tiny_run(tmp_path / "full", corpus_dir, cache), None)
    assert full["steps_done"] == 6 and len(full["losses"]) == 6 and len(full["val"]) == 2

    first, _ = run_ranks(_train_worker, 2, tmp_path, tiny_run(tmp_path / "resumed", corpus_dir, cache), 2)
    assert first["interrupted"] and first["steps_done"] == 2
    (second,) = run_ranks(
        _train_worker, 1, tmp_path, tiny_run(tmp_path / "resumed", corpus_dir, cache, data_parallel="ddp"), None
    )
    assert second["steps_done"] == 6 and not second["interrupted"]
    assert second["losses"][:2] == full["losses"][:2], "the history up to the checkpoint is the saved one"
    torch.testing.assert_close(torch.tensor(second["losses"]), torch.tensor(full["losses"]), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(second["val"]), torch.tensor(full["val"]), rtol=0, atol=1e-4)
    for k, v in full["state"].items():
        torch.testing.assert_close(second["state"][k], v, rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")
    # the exported model is the ordinary single-process format
    saved = load_model(tmp_path / "resumed" / "model")
    for k, v in saved.state_dict().items():
        assert torch.equal(v, second["state"][k]), k


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path, corpus_dir):
    with pytest.raises(AssertionError, match="must divide evenly"):
        run_ranks(
            _train_worker, 2, tmp_path, tiny_run(tmp_path / "odd", corpus_dir, tmp_path / "cache", batch_size=3), None
        )


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_engram_train_under_torchrun_trains_sharded_and_exports_one_model(tmp_path, corpus_dir):
    run = tiny_run(tmp_path / "cli", corpus_dir, tmp_path / "cache", steps=2, eval_every=2, ckpt_every=2)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            shutil.which("torchrun"),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "engram.cli",
            "train",
            "--config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 2") == 1, proc.stdout  # one report per job, from rank 0
    step = tmp_path / "cli" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in (step / "tables").iterdir()) == [
        "rank00000-of-00002.safetensors",
        "rank00001-of-00002.safetensors",
    ]
    model = load_model(tmp_path / "cli" / "model")
    assert model.engram_layers[1].table.weight.shape[0] == model.engram_layers[1].table.num_rows
