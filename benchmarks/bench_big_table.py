"""Train a disk-tier Engram table larger than RAM with `engram train`, kill it twice with SIGKILL, resume, and
check the result equals an uninterrupted run: losses exactly, table and row-optimizer state byte for byte.

Every run is the real CLI (``python -m engram.cli train``) in a subprocess under ``nice -n 10``; its peak
resident memory is the kernel's high-water mark (``ru_maxrss`` from ``wait4``: anonymous and file-mapped pages
together, so the table pages a process touched through its memory map count). The phases:

1. ``small``: the same model with a 16x smaller disk table (same steps, batches, checkpoints), for the
   checkpoint cost at two table sizes;
2. ``device``: the same model with a 256x smaller table on the device (``train.table_tier=device``: an
   ``nn.Parameter`` trained by the same row-wise Adam rule), for tokens/s against the disk tier;
3. ``reference``: the big table, uninterrupted; its losses and the SHA-256 of its table and row-state files
   (streamed) are recorded, then its files are deleted (the two big tables never exist at once);
4. ``killed``: the same config, killed with ``kill -9`` at two fault points (``ENGRAM_FAULT``, see
   :func:`engram.files.fault_point`: the process stops there and the script kills it): (a) in the row update of
   step ``--kill-step``, after the row-optimizer state was written in place and before the table rows are (the
   table half-updated), and (b) inside the checkpoint of step ``--fault-step``, after the table journal was
   sealed and before the step folder is published; resumed each time, the final run must end with the
   reference's losses and checksums.

    nice -n 10 python benchmarks/bench_big_table.py --root /tmp/J/big            # 32 GiB table, 300 steps
    python benchmarks/bench_big_table.py --root /tmp/J/try --table-gib 0.25 --steps 60 --ckpt-every 20 \\
        --kill-step 25 --fault-step 40 --skip-small --skip-device                 # a quick dry run

Figures (JSON) go to ``--root/results.json``; every big file is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROW_DIM = 256  # head_dim: n_embed_per_ngram 512 / 2 heads; one row = 1 KiB in float32
HEADS = 4  # 2 n-gram orders x 2 heads


def run_config(root: Path, table_gib: float, steps: int, ckpt_every: int) -> dict:
    """A tiny Engram model (width 64, 2 blocks, one Engram layer) whose table is ``table_gib`` GiB: 4 heads of
    ``table_gib * 2**30 / 1 KiB / 4`` rows each (rounded up to primes by the model)."""
    per_head = int(table_gib * 2**30 / (ROW_DIM * 4) / HEADS) + 1
    return {
        "model": {
            "family": "engram",
            "hidden_size": 64,
            "num_layers": 2,
            "num_heads": 2,
            "max_seq_len": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "engram": {
                "engram_vocab_size": [per_head, per_head],
                "n_embed_per_ngram": 2 * ROW_DIM,
                "n_head_per_ngram": 2,
                "layer_ids": [1],
            },
        },
        "train": {
            "steps": steps,
            "batch_size": 8,
            "seq_len": 64,
            "eval_every": steps,
            "eval_batches": 2,
            "log_every": 1,
            "ckpt_every": ckpt_every,
            "keep_last": 2,
            "max_bytes": 2_000_000,
            "vocab_size": 2048,
            "cache_dir": str(root / "cache"),
            "table_tier": "disk",
            "save_model": False,  # the trained rows stay in the run's table file (no 32 GiB copy at the end)
            "progress": True,
        },
        "optim": {"table_optimizer": "rowwise", "warmup_steps": 10},
    }


class Run:
    """One `engram train` subprocess with its log, for a run folder ``out``."""

    def __init__(self, config: Path, out: Path, table_dir: Path | None, extra: list[str], env: dict | None = None):
        self.out = out
        sets = [f"train.out_dir={out}"] + ([f"train.table_dir={table_dir}"] if table_dir else []) + extra
        cmd = ["nice", "-n", "10", sys.executable, "-m", "engram.cli", "train", "--config", str(config), "--set", *sets]
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out.parent / f"{out.name}.log"
        self.log = open(self.log_path, "ab")
        self.log.write(f"\n$ {' '.join(cmd)}\n".encode())
        self.log.flush()
        self.t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.peak_rss = None
        self.returncode = None

    def wait(self) -> int:
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = self.returncode = os.waitstatus_to_exitcode(status)
        self.peak_rss = usage.ru_maxrss * 1024  # KiB on Linux
        self.seconds = time.time() - self.t0
        self.log.close()
        return self.returncode

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.wait()

    def check(self) -> None:
        if self.wait() != 0:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise SystemExit(f"engram train failed ({self.returncode}); log {self.log_path}:\n{tail}")


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last_logged_step(out: Path) -> int:
    steps = [r["step"] for r in metrics(out) if r.get("kind") == "train"]
    return max(steps, default=0)


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if r.get("kind") == "train"}


def sha256_stream(path: Path) -> str:
    """SHA-256 of a file read in 64 MiB blocks, dropping each block from the page cache behind the read."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while block := os.pread(fd, 64 << 20, offset):
            h.update(block)
            os.posix_fadvise(fd, offset, len(block), os.POSIX_FADV_DONTNEED)
            offset += len(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def table_files(table_dir: Path) -> list[Path]:
    return sorted(p for p in table_dir.iterdir() if p.suffix in (".rows", ".rowstate"))


def init_seconds(log_path: Path) -> float | None:
    """The elapsed time of the last 'init disk table' progress bar in a run's log (tqdm's [mm:ss<...])."""
    text = log_path.read_text(errors="replace").replace("\r", "\n")
    bars = [line for line in text.splitlines() if line.startswith("init disk table") and "100%" in line]
    if not bars:
        return None
    elapsed = bars[-1].split("[", 1)[1].split("<", 1)[0]
    parts = [float(x) for x in elapsed.split(":")]
    return sum(v * 60**i for i, v in enumerate(reversed(parts)))


def checkpoint_figures(out: Path) -> list[dict]:
    return [r for r in metrics(out) if r.get("kind") == "checkpoint"]


def summary(out: Path, run: Run, table_dir: Path | None) -> dict:
    rates = [r["tokens_per_s"] for r in metrics(out) if r.get("kind") == "train"]
    size = sum(p.stat().st_size for p in table_files(table_dir)) if table_dir else None
    return {
        "seconds": run.seconds,
        "peak_rss_bytes": run.peak_rss,
        "tokens_per_s_median": statistics.median(rates[5:] or rates),
        "checkpoints": checkpoint_figures(out),
        "table_and_state_bytes": size,
        "init_seconds": init_seconds(run.log_path),
    }


def wait_for(condition, proc: Run, what: str, timeout: float = 3600) -> None:
    t0 = time.time()
    while not condition():
        if proc.proc.poll() is not None:
            raise SystemExit(f"the run ended ({proc.proc.returncode}) before {what}; log {proc.log_path}")
        if time.time() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def killed_run(config: Path, out: Path, tables: Path, fault: str, marker: Path) -> Run:
    """A run of ``config`` killed with SIGKILL once it reaches the fault point ``fault`` (``ENGRAM_FAULT``, see
    :func:`engram.files.fault_point`; there the run writes its pid to ``marker`` and waits)."""
    run = Run(config, out, tables, [], env={"ENGRAM_FAULT": fault, "ENGRAM_FAULT_MARKER": str(marker)})
    wait_for(marker.exists, run, f"the fault point {fault}")
    run.kill()
    marker.unlink()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="scratch folder for every run (big files go here)")
    p.add_argument("--table-gib", type=float, default=32.0, help="size of the big table in GiB (float32 rows)")
    p.add_argument("--steps", type=int, default=300, help="training steps of every run")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint cadence")
    p.add_argument("--kill-step", type=int, default=76, help="first kill: inside the row update of this step")
    p.add_argument("--fault-step", type=int, default=150, help="second kill: inside the checkpoint of this step")
    p.add_argument("--skip-small", action="store_true", help="leave out the 16x smaller disk table run")
    p.add_argument("--skip-device", action="store_true", help="leave out the device-table run")
    p.add_argument("--keep", action="store_true", help="keep the run folders and tables")
    args = p.parse_args()
    if not args.kill_step < args.fault_step < args.steps or args.fault_step % args.ckpt_every:
        raise SystemExit("need kill-step < fault-step < steps, and fault-step a checkpoint step")
    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    big = root / "big.yaml"
    big.write_text(yaml.safe_dump(run_config(root, args.table_gib, args.steps, args.ckpt_every)))
    small = root / "small.yaml"
    small.write_text(yaml.safe_dump(run_config(root, args.table_gib / 16, args.steps, args.ckpt_every)))
    tiny = root / "device.yaml"
    tiny.write_text(yaml.safe_dump(run_config(root, args.table_gib / 256, args.steps, args.steps)))

    def record(name: str, value) -> None:
        results[name] = value
        (root / "results.json").write_text(json.dumps(results, indent=1))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {json.dumps(value)[:600]}", flush=True)

    try:
        if not args.skip_small:
            tables = root / "small-tables"
            run = Run(small, root / "small", tables, [])
            run.check()
            record("small_disk", summary(root / "small", run, tables))
            shutil.rmtree(tables)
        if not args.skip_device:
            run = Run(tiny, root / "device", None, ["train.table_tier=device"])
            run.check()
            record("small_device", summary(root / "device", run, None))
        tables = root / "ref-tables"
        run = Run(big, root / "reference", tables, [])
        run.check()
        reference = summary(root / "reference", run, tables)
        t0 = time.time()
        reference["sha256"] = {p.name: sha256_stream(p) for p in table_files(tables)}
        reference["sha256_seconds"] = time.time() - t0
        record("reference", reference)
        ref_losses = losses(root / "reference")
        shutil.rmtree(tables)

        tables = root / "kill-tables"
        out = root / "killed"
        processes = []
        marker = root / "fault-marker"
        first = killed_run(big, out, tables, f"row-update-{args.kill_step}", marker)
        processes.append(
            {
                "killed_in_row_update_of_step": args.kill_step,
                "logged_steps": last_logged_step(out),
                "peak_rss_bytes": first.peak_rss,
            }
        )
        second = killed_run(big, out, tables, f"checkpoint-{args.fault_step}", marker)
        latest = (out / "checkpoints" / "latest").read_text().strip()
        processes.append(
            {"killed_in_checkpoint": args.fault_step, "latest_then": latest, "peak_rss_bytes": second.peak_rss}
        )
        third = Run(big, out, tables, [])
        third.check()
        processes.append({"completed": True, "peak_rss_bytes": third.peak_rss, "seconds": third.seconds})
        got = losses(out)
        t0 = time.time()
        sha = {p.name: sha256_stream(p) for p in table_files(tables)}
        killed = {
            "processes": processes,
            "sha256": sha,
            "sha256_seconds": time.time() - t0,
            "losses_equal": got == ref_losses,
            "steps_compared": len(got),
            "rows_equal": sha == reference["sha256"],
            "resume_log_lines": [
                line
                for line in (root / "killed.log").read_text(errors="replace").splitlines()
                if "undo" in line or "resum" in line
            ][:20],
        }
        record("killed", killed)
        peak = max([reference["peak_rss_bytes"]] + [q["peak_rss_bytes"] for q in processes])
        record(
            "verdict",
            {
                "losses_equal": killed["losses_equal"],
                "rows_equal": killed["rows_equal"],
                "peak_rss_gib": peak / 2**30,
                "peak_rss_under_4_gib": peak < 4 * 2**30,
            },
        )
        if not (killed["losses_equal"] and killed["rows_equal"]):
            raise SystemExit("the killed and resumed run differs from the reference")
    finally:
        if not args.keep:
            for name in ("small-tables", "ref-tables", "kill-tables"):
                shutil.rmtree(root / name, ignore_errors=True)


if __name__ == "__main__":
    main()
