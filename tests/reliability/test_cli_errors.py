"""Every CLI failure ends in one or two lines naming the file, field or step and what to do; no traceback unless
``--debug`` / ``ENGRAM_DEBUG=1``.

The cases whose point is the process boundary (the printed traceback, raw argv bytes, stdin, a fault injected
before start-up) run ``engram`` in a subprocess as a user would; the others call ``engram.cli.main`` in this
process, where an exception the handler misses would fail the test just the same.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from engram.cli import main

from .tiny_run import error_lines, run_cli, train_tiny, write_corpus


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    train_tiny(root)
    return root


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ENGRAM_DEBUG", raising=False)


def cli(capsys, *args: str) -> subprocess.CompletedProcess:
    """``engram ARGS`` in this process, as a CompletedProcess (stdout / stderr as bytes)."""
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out.out.encode(), out.err.encode())


def assert_refused(proc, command: str, *needles: str) -> str:
    """Non-zero exit, no traceback, an error of at most two lines that contains every needle."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode != 0, err
    assert "Traceback" not in err, err
    lines = error_lines(proc, command)
    assert 1 <= len(lines) <= 2, lines
    message = "\n".join(lines)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_malformed_yaml_names_file_and_line_and_debug_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  family: moe\n  layer_ids: [1, 2\ntrain:\n  steps: 3\n")
    assert_refused(run_cli("train", "--config", str(bad), root=tmp_path), "train", f"{bad}:4", "invalid YAML")
    debug = run_cli("train", "--config", str(bad), "--debug", root=tmp_path)
    assert debug.returncode == 1 and b"Traceback (most recent call last)" in debug.stderr
    assert error_lines(debug, "train")[0].startswith("engram train: error: ")
    env_debug = run_cli("train", "--config", str(bad), root=tmp_path, env={"ENGRAM_DEBUG": "1"})
    assert b"Traceback (most recent call last)" in env_debug.stderr


def test_set_with_a_wrong_type_names_the_field_and_the_expected_type(tmp_path, capsys):
    proc = cli(capsys, "train", "--set", "train.steps=lots")
    assert_refused(proc, "train", "train.steps", "an integer", "'lots'")


def test_set_with_an_unknown_field_suggests_the_near_one(tmp_path, capsys):
    proc = cli(capsys, "train", "--set", "optim.lrr=1e-3")
    assert_refused(proc, "train", "optim", "'lrr'", "optim.lr")


def test_model_path_that_does_not_exist(tmp_path, capsys):
    assert_refused(
        cli(capsys, "eval", "--model", str(tmp_path / "nowhere")), "eval", str(tmp_path / "nowhere"), "runs/NAME/model"
    )


def test_run_folder_instead_of_its_model_folder_suggests_the_model_folder(tiny, capsys):
    run = tiny / "run"
    assert_refused(cli(capsys, "generate", "--model", str(run), "--prompt", "x"), "generate", str(run / "model"))


def test_corrupt_checkpoint_offers_resume_from_an_earlier_step(tiny, tmp_path, capsys):
    shutil.copytree(tiny / "run", tmp_path / "run")
    config = tiny / "run.yaml"
    weights = tmp_path / "run" / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    proc = cli(capsys, "train", "--config", str(config), "--set", f"train.out_dir={tmp_path / 'run'}", "train.steps=6")
    assert_refused(proc, "train", str(weights), "--resume-from STEP", "2")


@pytest.mark.parametrize(("code", "needle"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_full_or_read_only_disk_names_the_path(tmp_path, capsys, monkeypatch, code, needle):
    out = tmp_path / "out"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert_refused(cli(capsys, "train", "--set", f"train.out_dir={out}"), "train", str(out), needle, "train.out_dir")


def test_unavailable_device_names_train_device(tiny, tmp_path, capsys):
    proc = cli(
        capsys,
        "train",
        "--config",
        str(tiny / "run.yaml"),
        "--set",
        "train.device=cuda:99",
        f"train.out_dir={tmp_path / 'run'}",
    )
    assert_refused(proc, "train", "device 'cuda:99' (train.device")


def test_divergence_names_the_step_and_suggests_a_lower_lr(tiny, tmp_path, capsys):
    proc = cli(
        capsys,
        "train",
        "--config",
        str(tiny / "run.yaml"),
        "--set",
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "train.steps=20",
        f"train.out_dir={tmp_path / 'run'}",
    )
    message = assert_refused(proc, "train", "at step", "optim.lr=1e+30", "lower it")
    assert any(f"at step {s};" in message or f"at step {s} " in message for s in range(1, 21)), message


def test_corpus_file_with_bad_encoding_is_skipped_with_a_warning_naming_it(tiny, tmp_path, capsys):
    data = write_corpus(tmp_path / "data")
    (data / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    proc = cli(capsys, "eval", "--model", str(tiny / "run" / "model"), "--data", str(data), "--max-batches", "1")
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert f"engram eval: warning: skipping {data / 'latin1.txt'}: not UTF-8" in err


def test_empty_validation_split_says_so_and_how_to_fix_it(tiny, tmp_path, capsys):
    data = tmp_path / "one"
    data.mkdir()
    (data / "single.txt").write_text("one document only\n" * 50)  # its name hashes to the training split
    proc = cli(capsys, "eval", "--model", str(tiny / "run" / "model"), "--data", str(data))
    assert_refused(proc, "eval", "validation split is empty", "single.txt", "add a second file")


def test_jsonl_with_a_non_utf8_byte_names_file_and_line(tiny, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(json.dumps({"text": "fine"}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    proc = cli(capsys, "eval", "--model", str(tiny / "run" / "model"), "--data", str(path))
    assert_refused(proc, "eval", f"{path}:2", "not UTF-8", "0xe9")


def test_non_utf8_prompt_argument_is_refused(tiny):
    proc = run_cli("generate", "--model", str(tiny / "run" / "model"), "--prompt", b"def \xff(", root=tiny)
    assert_refused(proc, "generate", "--prompt number 1", "0xff", "UTF-8")


def test_non_utf8_prompt_on_stdin_is_refused(tiny):
    proc = run_cli("generate", "--model", str(tiny / "run" / "model"), root=tiny, stdin=b"class \xfe:")
    assert_refused(proc, "generate", "stdin", "0xfe", "UTF-8")


def test_generate_still_works(tiny, capsys):
    """The checks refuse bad input only: a valid prompt on a valid model generates."""
    proc = cli(
        capsys,
        "generate",
        "--model",
        str(tiny / "run" / "model"),
        "--prompt",
        "the quick",
        "--max-new-tokens",
        "4",
        "--seed",
        "0",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().startswith("the quick")
