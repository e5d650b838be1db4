"""Random row reads and writes of a disk table, three ways: through the memory map (``DiskRowStore``'s
default), through the map dropped (``MADV_DONTNEED``) after every 64 rows, and with ``pread`` / ``pwrite`` per
row (``DiskRowStore.use_pread``, what a training run uses). Reports milliseconds per access of ``--rows``
random rows and the process's mapped file pages (``RssFile``): pages of a file map count in the resident
memory, and one fault can map a whole page-cache folio (up to 2 MiB) for one row.

    python benchmarks/bench_row_access.py --gib 2 --rows 2048 --repeats 20

The table file is written first, so it starts in the page cache (where folios are largest); it is deleted at
the end.
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engram.storage import DiskRowStore  # noqa: E402

DIM = 256
CHUNK = 64


def rss_file_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def released(store: DiskRowStore, rows: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor | None:
    """A gather (or, with ``values``, a scatter) through the map, dropping the map after every CHUNK rows."""
    parts = []
    for start in range(0, rows.numel(), CHUNK):
        chunk = rows[start : start + CHUNK]
        if values is None:
            parts.append(store.gather(chunk, check=False))
        else:
            store.scatter(chunk, values[start : start + CHUNK], check=False)
        store.advise(mmap.MADV_DONTNEED)
    return torch.cat(parts) if values is None else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0, help="table size in GiB (rows of 256 float32)")
    p.add_argument("--rows", type=int, default=2048, help="random rows per access")
    p.add_argument("--repeats", type=int, default=20, help="accesses per method")
    p.add_argument("--dir", default=None, help="folder for the table file (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(1)
    num_rows = int(args.gib * 2**30) // (DIM * 4)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t0 = time.perf_counter()
        store = DiskRowStore.create(Path(tmp) / "t.rows", num_rows, DIM, seed=0)
        print(
            f"table {num_rows:,} x {DIM} float32 = {store.nbytes / 2**30:.2f} GiB, written in "
            f"{time.perf_counter() - t0:.1f} s; {args.rows} random rows per access, {args.repeats} accesses"
        )
        gen = np.random.default_rng(0)
        batches = [
            torch.from_numpy(np.sort(gen.choice(num_rows, args.rows, replace=False))) for _ in range(args.repeats)
        ]
        results = []
        for name in ("map", f"map, dropped every {CHUNK} rows", "pread / pwrite"):
            store.use_pread(name == "pread / pwrite")
            store.advise(mmap.MADV_DONTNEED)  # every method starts with nothing mapped
            before = rss_file_mib()
            reads, writes, peak = [], [], 0.0
            for rows in batches:
                t0 = time.perf_counter()
                values = released(store, rows) if name.startswith("map, dropped") else store.gather(rows)
                t1 = time.perf_counter()
                if name.startswith("map, dropped"):
                    released(store, rows, values + 1.0)
                else:
                    store.scatter(rows, values + 1.0)
                t2 = time.perf_counter()
                reads.append(t1 - t0)
                writes.append(t2 - t1)
                peak = max(peak, rss_file_mib() - before)
            results.append((name, statistics.median(reads) * 1e3, statistics.median(writes) * 1e3, peak))
        store.use_pread(False)
        print("\n| access | read ms | write ms | mapped file pages, most after an access (MiB) |\n|---|---:|---:|---:|")
        for name, r, w, m in results:
            print(f"| {name} | {r:.2f} | {w:.2f} | {m:,.0f} |")


if __name__ == "__main__":
    main()
