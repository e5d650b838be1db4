"""bench_generate --quick: every path (BPE, export, transformers loading, both tables) runs and checks itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_compares_engram_and_the_exported_model_under_transformers(tmp_path):
    """The quick run prints tokens/s for every model at both batch sizes, including the exported Engram model under
    transformers' generate() (whose greedy tokens the script checks equal to engram's), and the per-position table
    with the Engram modules' time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENGRAM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--quick", "--clock", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "the exported model's greedy tokens under transformers' generate() equal engram generate's" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    speed = {
        (r[0].strip(), r[1].strip()): float(r[3].replace(",", ""))
        for r in rows
        if len(r) == 7 and r[1].strip().isdigit()
    }
    models = ["engram", "moe", "dense", "engram exported (transformers)", "llama (transformers)"]
    assert set(speed) == {(m, b) for m in models for b in ("1", "2")}
    assert all(v > 0 for v in speed.values())
    for b in ("1", "2"):
        assert f"batch {b}: engram generate is" in out
    positions = [r for r in rows if len(r) == 6 and r[0].strip().isdigit()]
    assert [int(r[0]) for r in positions] == [16, 64] and all(float(r[4]) > 0 for r in positions)
