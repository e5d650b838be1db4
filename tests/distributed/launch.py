"""Run a function on N fresh CPU processes joined in one gloo process group (what torchrun would start)."""

from __future__ import annotations

import os
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(fn: Callable, rank: int, world_size: int, folder: str, store: str, args: tuple) -> None:
    torch.set_num_threads(1)  # N ranks share a couple of cores
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank)})
    out = Path(folder) / f"rank{rank}"
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        torch.save(result, f"{out}.pt")
    except BaseException:
        Path(f"{out}.err").write_text(traceback.format_exc())
        raise


def _start(fn: Callable, world_size: int, folder: Path, args: tuple) -> tuple[Path, list]:
    folder = Path(folder) / f"ranks-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    store = folder / "store"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, str(folder), str(store), args)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    return folder, procs


def kill_ranks_when(
    fn: Callable, world_size: int, folder: Path, marker: Path, *args: Any, timeout: float = 240
) -> None:
    """Start ``fn`` on ``world_size`` ranks and SIGKILL them all once ``marker`` exists (a crash at that moment);
    fails if they end first or the marker does not appear within ``timeout`` seconds."""
    _, procs = _start(fn, world_size, folder, args)
    deadline = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < deadline and all(p.is_alive() for p in procs):
        time.sleep(0.05)
    appeared = marker.exists()
    for p in procs:
        p.kill()
        p.join()
    assert appeared, f"{marker} did not appear (exit codes {[p.exitcode for p in procs]})"


def run_ranks(fn: Callable, world_size: int, folder: Path, *args: Any, timeout: float = 240) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, each run in its own process; re-raises a rank's error."""
    folder, procs = _start(fn, world_size, folder, args)
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [
        (r, (folder / f"rank{r}.err").read_text()) for r in range(world_size) if (folder / f"rank{r}.err").exists()
    ]
    if errors:
        raise AssertionError("\n".join(f"rank {r} failed:\n{e}" for r, e in errors))
    missing = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if missing:
        raise AssertionError(
            f"ranks {missing} did not finish (exit codes {[procs[r].exitcode for r in missing]}; "
            f"a hang past {timeout}s is killed)"
        )
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
