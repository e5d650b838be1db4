"""Progress is never lost and run folders stay one run: a missing ``latest`` falls back to the newest intact
checkpoint, a torn metrics line is tolerated and truncated, another run's files are not overwritten unless asked,
``--resume-from`` loads an earlier checkpoint, files are readable by others, a killed run's temporaries are
cleaned up, and Ctrl-C exits 130 after saving."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from engram.train.checkpoint import CheckpointError
from engram.train.trainer import train


def losses(result):
    return [h["loss"] for h in result.history]


def test_a_missing_latest_pointer_resumes_from_the_newest_intact_checkpoint(tmp_path, tiny_run, caplog):
    full = train(tiny_run(tmp_path / "full"))
    train(tiny_run(tmp_path / "run"), stop_after=8)
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    with caplog.at_level(logging.WARNING):
        resumed = train(tiny_run(tmp_path / "run"))
    assert "resuming from the newest intact checkpoint, step 8" in caplog.text
    assert resumed.steps_done == 12 and losses(resumed) == losses(full)
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == [2, 4, 6, 8, 10, 12], "the metrics of steps 1..8 were kept, not restarted from step 0"


def test_a_torn_last_metrics_line_is_tolerated_and_truncated_on_resume(tmp_path, tiny_run):
    train(tiny_run(tmp_path / "run"), stop_after=5)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"kind": "train", "step": 6, "lo')  # killed mid-write
    r = train(tiny_run(tmp_path / "run"))
    assert r.steps_done == 12
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line parses
    assert [rec["step"] for rec in records if rec["kind"] == "train"] == [2, 4, 6, 8, 10, 12]


def test_a_corrupt_metrics_line_before_the_last_is_reported_with_file_and_line(tmp_path, tiny_run):
    train(tiny_run(tmp_path / "run"), stop_after=5)
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[0] = "garbage"
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        train(tiny_run(tmp_path / "run"))


def test_another_runs_files_in_out_dir_are_refused_unless_overwrite(tmp_path, tiny_run):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": {"hidden_size": 4096}}))
    (out / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="already holds another run .*train.overwrite=true"):
        train(tiny_run(out, steps=2))
    assert json.loads((out / "config.json").read_text()) == {"model": {"hidden_size": 4096}}
    assert (out / "metrics.jsonl").read_text().startswith('{"kind": "train", "step": 1, "loss": 1.0}')
    r = train(tiny_run(out, steps=2, overwrite=True))
    assert r.steps_done == 2 and json.loads((out / "config.json").read_text())["train"]["steps"] == 2


def test_the_same_run_may_start_over_in_its_own_folder(tmp_path, tiny_run):
    train(tiny_run(tmp_path / "run", steps=2))
    again = train(tiny_run(tmp_path / "run", steps=2, resume=False))  # its own config.json: not foreign
    assert again.steps_done == 2


def test_resume_from_an_earlier_step_when_the_latest_is_corrupt(tmp_path, tiny_run):
    full = train(tiny_run(tmp_path / "full"))
    train(tiny_run(tmp_path / "run", keep_last=3), stop_after=12)
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_00000012" / "state.pt").write_bytes(b"corrupt")
    (tmp_path / "run" / "model").rename(tmp_path / "model-kept")  # pretend the run had not finished
    with pytest.raises(CheckpointError, match=r"--resume-from 8 \(train.resume_from=8\)"):
        train(tiny_run(tmp_path / "run", keep_last=3))
    from engram.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_run(tmp_path / "run", keep_last=3).to_dict()))
    main(["train", "--config", str(cfg), "--resume-from", "8"])
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in history if h["kind"] == "train"] == losses(full)
    assert json.loads((ckpts / "step_00000012" / "meta.json").read_text())["step"] == 12  # rewritten, intact
    with pytest.raises(CheckpointError, match="no intact checkpoint of step 3"):
        train(tiny_run(tmp_path / "run", keep_last=3, resume_from=3))


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_run_files_get_the_permissions_the_umask_gives(tmp_path, tiny_run, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        train(tiny_run(tmp_path / "run", steps=2))
    finally:
        os.umask(old)
    for path in (tmp_path / "run").rglob("*"):
        if "tb" in path.relative_to(tmp_path / "run").parts:
            continue  # TensorBoard's own files
        mode = path.stat().st_mode & 0o777
        assert mode == (dir_mode if path.is_dir() else file_mode), f"{path}: {oct(mode)}"


def test_a_killed_runs_temporaries_are_removed_at_the_next_start(tmp_path, tiny_run):
    train(tiny_run(tmp_path / "run"), stop_after=4)
    out = tmp_path / "run"
    (out / "model").mkdir()
    stale = [
        out / ".config.json.tmp-99999-0",
        out / "model" / ".model.safetensors.tmp-99999-3",
        out / "checkpoints" / ".latest.tmp-99999-1",
    ]
    for p in stale:
        p.write_bytes(b"half")
    (out / "checkpoints" / ".tmp-step_00000008-99999").mkdir()
    (out / "checkpoints" / ".tmp-step_00000008-99999" / "model.safetensors").write_bytes(b"half")
    train(tiny_run(out))
    assert not any(p.exists() for p in stale)
    assert not (out / "checkpoints" / ".tmp-step_00000008-99999").exists()


def test_sigint_stops_the_cli_with_exit_code_130_after_saving(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run", steps=100_000, log_every=1, ckpt_every=100_000, eval_every=100_000)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engram.cli", "train", "--config", str(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted (checkpoint saved" in stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()
