"""The GPU check's dry run: every step runs on the CPU at tiny sizes and the JSON records what each did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/ is not a package: found through sys.path)

STEPS = [
    "setup",
    "probe",
    "cuda_tests",
    "train_config",
    "train_bf16",
    "bench_hashing",
    "bench_models",
    "bench_models_compile",
    "bench_offload",
    "bench_generate",
]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_dry_run_runs_every_step_and_passes(dry_run):
    proc, result = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [s["name"] for s in result["steps"]] == STEPS
    assert result["dry_run"] is True and result["device"] == "cpu" and result["ok"] is True
    assert result["steps"][0]["status"] == "skipped"  # no venv and no installs in a dry run
    compile_flag = '"--compile"' in (ROOT / "benchmarks" / "bench_models.py").read_text()
    for step in result["steps"][1:]:
        if step["name"] == "bench_models_compile" and not compile_flag:  # reported, not hidden
            assert step["status"] == "missing" and "--compile" in step["error"], step
            assert result["missing"] == ["bench_models_compile"] and "NOT RUN" in proc.stdout
            continue
        assert step["status"] == "ok", step
        assert step["seconds"] > 0 and step["timeout_s"] >= step["seconds"]
        assert Path(step["log"]).is_file()
    assert "| step | status | seconds | key figures |" in proc.stdout


def test_dry_run_json_holds_the_figures_of_each_step(dry_run):
    _, result = dry_run
    steps = {s["name"]: s for s in result["steps"]}
    assert result["machine"]["cuda_available"] is False
    tests = steps["cuda_tests"]["figures"]
    assert tests["tests"] >= 3 and tests["skipped"] == tests["tests"]  # found, and skipped without CUDA
    assert all("cuda" in name.lower() for name in tests["selected"])
    train = steps["train_bf16"]["figures"]
    assert train["last_loss"] < train["first_loss"] and train["last_val_loss"] < train["first_val_loss"]
    hashing = steps["bench_hashing"]["figures"]
    assert hashing["vs_numpy"] > 0 and hashing["compiled_vs_numpy"] > 0
    for name in ("bench_models", "bench_models_compile"):
        if steps[name]["status"] == "missing":
            continue
        figs = steps[name]["figures"]
        assert figs["moe_vs_moe"] == 1.0 and figs["engram_vs_moe"] > 0 and figs["dense_step_ms"] > 0
    offload = steps["bench_offload"]["figures"]
    assert all(
        offload[k] > 0
        for k in (
            "host_prefetch_prefill_vs_device",
            "host_prefetch_decode_vs_device",
            "host_no_prefetch_prefill_vs_device",
            "host_no_prefetch_decode_vs_device",
        )
    )
    gen = steps["bench_generate"]["figures"]
    assert {
        "engram b1 tokens/s",
        "moe b1 tokens/s",
        "engram exported (transformers) b1 tokens/s",
        "llama (transformers) b1 tokens/s",
    } <= set(gen)


def test_a_step_past_its_time_box_is_killed_and_recorded(tmp_path):
    (tmp_path / "logs").mkdir()
    step = gpu_check.Step(
        "hang", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], timeout_s=1.0
    )
    rec = gpu_check.run_step(step, tmp_path, deadline=gpu_check.time.monotonic() + 30, env=dict(os.environ))
    assert rec["status"] == "timeout" and rec["seconds"] < 10 and rec["rc"] is None
    late = gpu_check.run_step(step, tmp_path, deadline=gpu_check.time.monotonic() + 1, env=dict(os.environ))
    assert late["status"] == "skipped"  # the overall budget is spent: the step does not start


def test_a_failed_figure_check_fails_the_step(tmp_path):
    (tmp_path / "logs").mkdir()

    def must_see_ok(text, tables):
        if "ok" not in text:
            raise gpu_check.StepFailed("no ok")
        return {}

    step = gpu_check.Step("check", [sys.executable, "-c", "print('bad')"], 30, must_see_ok)
    rec = gpu_check.run_step(step, tmp_path, deadline=gpu_check.time.monotonic() + 60, env=dict(os.environ))
    assert rec["status"] == "failed" and "no ok" in rec["error"]


def test_markdown_tables_keep_repeated_columns():
    text = "x\n| a | b | b |\n|---|--:|--:|\n| r1 | 1.5x | 2,000 |\n\nafter"
    assert gpu_check.markdown_tables(text) == [[{"a": "r1", "b": "1.5x", "b #2": "2,000"}]]
    assert gpu_check.number("0.97x of moe") == 0.97 and gpu_check.number("2,000") == 2000.0
    assert gpu_check.number("-") is None
