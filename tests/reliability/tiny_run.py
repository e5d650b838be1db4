"""A tiny trained Engram run (a few seconds on a CPU) and a way to call the ``engram`` CLI in a subprocess."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

WORDS = "the quick brown fox jumps over lazy dog engram memory table hash gate value".split()


def write_corpus(folder: Path, n_docs: int = 6) -> Path:
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(60))
        (folder / f"doc{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    return folder


def tiny_run_config(root: Path) -> dict:
    """A 2-block Engram model with one Engram layer, 4 steps, checkpoints at steps 2 and 4."""
    return {
        "model": {
            "family": "engram",
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "max_seq_len": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "n_routed_experts": 4,
            "engram": {"engram_vocab_size": [97, 97], "n_embed_per_ngram": 16, "n_head_per_ngram": 2, "layer_ids": [1]},
        },
        "train": {
            "out_dir": str(root / "run"),
            "steps": 4,
            "batch_size": 2,
            "seq_len": 16,
            "eval_every": 4,
            "eval_batches": 2,
            "log_every": 2,
            "ckpt_every": 2,
            "data": str(root / "data"),
            "tokenizer": "bpe",
            "vocab_size": 300,
            "cache_dir": str(root / "cache"),
            "progress": False,
        },
        "optim": {"warmup_steps": 1},
    }


def train_tiny(root: Path) -> Path:
    """Train the tiny run under ``root`` (corpus in root/data, run in root/run); returns root/run.yaml."""
    from engram.train.trainer import RunConfig, train

    write_corpus(root / "data")
    cfg = tiny_run_config(root)
    config_path = root / "run.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    train(RunConfig.from_dict(cfg))
    return config_path


def run_cli(
    *args: str | bytes, root: Path, stdin: bytes | None = None, env: dict | None = None, prelude: str = ""
) -> subprocess.CompletedProcess:
    """``engram ARGS`` in a fresh interpreter; ``prelude`` is Python run before the CLI (to inject a fault)."""
    full_env = {k: v for k, v in os.environ.items() if k != "ENGRAM_DEBUG"}
    full_env.update({"ENGRAM_CACHE_DIR": str(root / "cache"), "OMP_NUM_THREADS": "1", **(env or {})})
    code = f"{prelude}\nfrom engram.cli import main\nmain()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], input=stdin or b"", capture_output=True, env=full_env, timeout=300
    )


def error_lines(proc: subprocess.CompletedProcess, command: str) -> list[str]:
    """The lines from the ``engram COMMAND: error:`` line to the end of stderr."""
    lines = proc.stderr.decode("utf-8", "replace").rstrip("\n").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"engram {command}: error: ")]
    assert starts, f"no 'engram {command}: error:' line in stderr:\n" + "\n".join(lines)
    return lines[starts[-1] :]
