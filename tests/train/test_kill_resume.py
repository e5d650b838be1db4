"""`engram train` with a disk table, killed with SIGKILL with the table half-updated and again inside a checkpoint,
resumed each time, ends with exactly the losses, table rows and row-optimizer state of an uninterrupted run (the
small version of ``benchmarks/bench_big_table.py``)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import torch
import yaml

from engram import EngramConfig
from engram.train.optim import OptimConfig


def config_file(tiny_run, root, out):
    run = tiny_run(out, table_tier="disk", ckpt_every=4, log_every=1, eval_every=12)
    engram = EngramConfig(
        engram_vocab_size=[20011, 20011], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1]
    )  # 4 heads of ~20k rows: a 2.5 MiB table
    run = dataclasses.replace(
        run, model=run.model.replace(engram=engram), optim=OptimConfig(table_optimizer="rowwise", warmup_steps=2)
    )
    path = root / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(run.to_dict()))
    return path


def start(config, fault=None, marker=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fault:
        env.update({"ENGRAM_FAULT": fault, "ENGRAM_FAULT_MARKER": str(marker)})
    cmd = [sys.executable, "-m", "engram.cli", "train", "--config", str(config)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_at(proc, marker):
    """SIGKILL the run once it stands at its fault point."""
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the run never reached its fault point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    marker.unlink()


def finish(proc):
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]


def losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def table_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "tables").glob("layer01.rows*")) if p.is_file()}


def test_sigkill_mid_row_update_and_mid_checkpoint_then_resume_equals_the_uninterrupted_run(tmp_path, tiny_run):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    finish(start(config_file(tiny_run, tmp_path, reference)))
    config = config_file(tiny_run, tmp_path, killed)
    marker = tmp_path / "at-fault"
    # step 6: the row state of the touched rows is written in place, the table rows are not yet
    kill_at(start(config, "row-update-6", marker), marker)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    # resumed at 4, it trains to 8 and is killed inside that checkpoint: journal sealed, step 8 not published
    kill_at(start(config, "checkpoint-8", marker), marker)
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    finish(start(config))
    assert losses(killed) == losses(reference) and len(losses(reference)) == 12
    got, want = table_bytes(killed), table_bytes(reference)
    assert set(want) == {"layer01.rows", "layer01.rows.rowstate"}
    for name in want:
        assert got[name] == want[name], name


def test_resume_from_an_older_checkpoint_undoes_the_later_intervals_and_pruning_drops_their_logs(tmp_path, tiny_run):
    from engram.storage import offloaded_tables
    from engram.train.trainer import train

    def run(out, **kw):
        r = tiny_run(out, **{"table_tier": "disk", "ckpt_every": 4, "keep_last": 3, **kw})
        return dataclasses.replace(r, optim=OptimConfig(table_optimizer="rowwise"))

    full = train(run(tmp_path / "full"))
    resumed_dir = tmp_path / "resumed"
    train(run(resumed_dir))  # checkpoints 4, 8, 12; the live table is at step 12
    journal = resumed_dir / "tables" / "layer01.rows.journal"
    assert sorted(p.name for p in journal.glob("undo-*.log")) == ["undo-00000004.log", "undo-00000008.log"]
    again = train(run(resumed_dir, resume_from=4))  # back to 4 through both logs, then steps 5..12 again
    assert [h["loss"] for h in again.history] == [h["loss"] for h in full.history]
    ((_, table),) = offloaded_tables(again.model).values()
    ((_, want),) = offloaded_tables(full.model).values()
    assert torch.equal(table.store.read_range(0, table.num_rows), want.store.read_range(0, want.num_rows))
    # the rerun's intervals replaced the old ones; with keep_last=2 the oldest checkpoint's log goes too
    assert sorted(p.name for p in journal.glob("undo-*.log")) == ["undo-00000004.log", "undo-00000008.log"]
    train(run(resumed_dir, steps=16, keep_last=2))
    assert sorted(p.name for p in journal.glob("undo-*.log")) == ["undo-00000012.log"]


def test_a_save_killed_after_publishing_its_folder_but_before_latest_resumes_the_previous_checkpoint(
    tmp_path, tiny_run
):
    from engram.train.trainer import train

    def run(out, **kw):
        r = tiny_run(out, **{"table_tier": "disk", "ckpt_every": 4, **kw})
        return dataclasses.replace(r, optim=OptimConfig(table_optimizer="rowwise"))

    full = train(run(tmp_path / "full"))
    out = tmp_path / "killed"
    train(run(out), stop_after=8)
    (out / "checkpoints" / "latest").write_text("step_00000004\n")  # the folder of step 8 exists, latest lags
    train(run(out), stop_after=1)  # resumes from 4 (the table is undone to 4), stops after step 5
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000005"]
    (out / "checkpoints" / "latest").unlink()  # now the newest intact folder decides: 5, not a stale 8
    resumed = train(run(out))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
