"""Hashing throughput (torch NgramHasher: eager, the default and ``compile=True``, vs the plain-numpy reference)
and Engram forward+backward time.

The default hasher (``compile=None``) is first driven through a bulk job as a user's would be: eager calls until
the process has hashed ``engram.hashing.COMPILE_AFTER_IDS`` ids, then the call that compiles (both printed); its
row is the steady state after that. Calls below ``BULK_IDS`` ids, and CUDA, stay eager by design.

The hashers run in one process on the same token ids, and their outputs are checked to be identical before
anything is timed. Times are medians over ``--repeats`` runs (3x as many for the cheap hashing rows, with the
hashers alternating run by run so that all see the same machine load) after ``--warmup`` runs; on CUDA every
run is synchronised. The hashing rows also give the median process CPU time, the steadier figure on a shared
machine (with ``--threads 1`` both hashers run on one thread, so it is the work each does; only then is its
ratio printed). Prints a markdown table.

    python benchmarks/bench_hashing.py                      # defaults: N=3, K=8, 2 layers, V'=99092, 8 x 4096
    python benchmarks/bench_hashing.py --skip-module --threads 1   # the hashing rows only, one thread
    python benchmarks/bench_hashing.py --skip-module --threads 2 --compile-after-ids 0   # scaling, steady state
    python benchmarks/bench_hashing.py --device cpu --repeats 5 --module-batch 1 --module-seq 256
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "core"))

from reference_numpy import ref_hash_layer, ref_multipliers, ref_primes  # noqa: E402

from engram import Engram, EngramConfig, NgramHasher, hashing, set_validation  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--max-ngram", type=int, default=3, help="N")
    p.add_argument("--heads", type=int, default=8, help="K, heads per order")
    p.add_argument("--layers", type=int, default=2, help="Engram layers hashed in one call")
    p.add_argument("--vprime", type=int, default=99092, help="compressed vocab size V'")
    p.add_argument("--table-size", type=int, default=5 * 129280, help="configured per-head table size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 compares like for like with single-threaded numpy",
    )
    p.add_argument(
        "--compile-after-ids",
        type=int,
        default=None,
        help="override engram.hashing.COMPILE_AFTER_IDS for this run (0: the default hasher's steady state at "
        "once, skipping its eager phase; default: the library's value)",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--skip-module", action="store_true", help="only the hashing benchmark")
    p.add_argument("--hidden", type=int, default=1024, help="backbone width d of the Engram benchmark")
    p.add_argument("--d-mem", type=int, default=1024, help="d_mem = (N-1) * n_embed_per_ngram")
    p.add_argument("--hc-mults", default="4,1", help="comma list of M values to time")
    p.add_argument("--module-batch", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    p.add_argument("--module-seq", type=int, default=None, help="default: 4096 on CUDA, 512 on CPU")
    p.add_argument(
        "--module-table-size",
        type=int,
        default=None,
        help="per-head table size of the Engram benchmark; default: 5*129280 on CUDA, 20000 on CPU "
        "(the dense table gradient of the full size is GBs)",
    )
    return p.parse_args(argv)


def timeit(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall seconds of ``fn`` (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(
    fns: list[Callable[[], object]], devices: list[torch.device], warmup: int, repeats: int
) -> list[tuple[float, float]]:
    """Median (wall, process CPU) seconds of each fn, alternating them run by run so that both see the same
    machine load. On a shared machine the CPU time is the steadier measure of the work done."""

    def once(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(warmup):
        for fn, dev in zip(fns, devices):
            once(fn, dev)
    times: list[list[tuple[float, float]]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, (fn, dev) in enumerate(zip(fns, devices)):
            times[i].append(once(fn, dev))
    return [(statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for t in times]


def bench_hashing(args: argparse.Namespace, device: torch.device) -> list[dict]:
    n = args.max_ngram
    cfg = EngramConfig(
        engram_vocab_size=[args.table_size] * (n - 1),
        max_ngram_size=n,
        n_embed_per_ngram=args.heads,
        n_head_per_ngram=args.heads,
        layer_ids=[1 + 13 * i for i in range(args.layers)],
        seed=args.seed,
        pad_id=0,
    )
    pad = 2
    rng = np.random.default_rng(args.seed)
    tokens_np = rng.integers(0, args.vprime, size=(args.batch, args.seq), dtype=np.int64)
    tokens = torch.from_numpy(tokens_np).to(device)

    primes = ref_primes(cfg.layer_ids, cfg.engram_vocab_size, cfg.n_head_per_ngram)
    mults = {l: ref_multipliers(cfg.seed, l, n, args.vprime) for l in cfg.layer_ids}

    def run_numpy() -> dict[int, np.ndarray]:
        return {l: ref_hash_layer(tokens_np, mults[l], primes[l], pad) for l in cfg.layer_ids}

    ref = run_numpy()

    def check(name: str, got: dict[int, torch.Tensor]) -> None:  # never time something wrong
        for l in cfg.layer_ids:
            if not np.array_equal(got[l].cpu().numpy(), ref[l]):
                raise SystemExit(f"{name} and numpy hashes differ at layer {l}")

    default = NgramHasher(cfg, args.vprime, pad)
    if args.compile_after_ids is not None:
        hashing.COMPILE_AFTER_IDS = args.compile_after_ids
    n_ids = len(cfg.layer_ids) * (n - 1) * args.heads * args.batch * args.seq
    if device.type == "cpu" and n_ids >= hashing.BULK_IDS:
        # the default hasher's life in a bulk job: eager calls until COMPILE_AFTER_IDS, then one call that compiles
        t0, calls = time.perf_counter(), 0
        while hashing._bulk_kernel.eager_bulk_ids < hashing.COMPILE_AFTER_IDS:
            check("default (eager phase)", default.hash(tokens))
            calls += 1
        t1 = time.perf_counter()
        check("default (switching call)", default.hash(tokens))
        print(
            f"default hasher: {calls} eager bulk calls ({calls * n_ids / 1e6:.0f}M ids) in {t1 - t0:.1f} s, then the "
            f"compiled kernel; the switching call took {time.perf_counter() - t1:.1f} s (the compile; inductor's "
            f"cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default dir')})"
        )
    else:
        print(f"default hasher: {n_ids} ids per call is below BULK_IDS={hashing.BULK_IDS} or not on the CPU: eager")
    runs = {
        "NgramHasher.hash, compile=False (eager)": functools.partial(
            NgramHasher(cfg, args.vprime, pad, compile=False).hash, tokens
        ),
        "NgramHasher.hash, default (compile=None)": functools.partial(default.hash, tokens),
        "NgramHasher.hash, compile=True": functools.partial(
            NgramHasher(cfg, args.vprime, pad, compile=True).hash, tokens
        ),
    }
    t0 = time.perf_counter()
    for name, run in runs.items():
        check(name, run())
    print(f"outputs checked equal ({time.perf_counter() - t0:.1f} s, including any compile)")

    n_tok = args.batch * args.seq
    timed = timeit_interleaved(
        [run_numpy, *runs.values()], [torch.device("cpu")] + [device] * len(runs), args.warmup, 3 * args.repeats
    )
    (t_np, c_np) = timed[0]
    desc = (
        f"N={n}, K={args.heads}, {args.layers} layers, V'={args.vprime}, table {args.table_size}, "
        f"{args.batch}x{args.seq}"
    )
    rows = [
        dict(
            name="hash: numpy reference",
            device="cpu",
            config=desc,
            ms=t_np * 1e3,
            cpu_ms=c_np * 1e3,
            tok_s=n_tok / t_np,
            us_tok=t_np / n_tok * 1e6,
            note="1.00x",
        )
    ]
    for name, (t_pt, c_pt) in zip(runs, timed[1:]):
        # with more threads, idle OpenMP workers spinning between torch's parallel regions count as CPU time
        one_thread = device.type == "cpu" and torch.get_num_threads() == 1
        cpu_ratio = f", {c_np / c_pt:.2f}x in CPU time" if one_thread else ""
        rows.append(
            dict(
                name=f"hash: {name}",
                device=str(device),
                config=desc,
                ms=t_pt * 1e3,
                cpu_ms=c_pt * 1e3,
                tok_s=n_tok / t_pt,
                us_tok=t_pt / n_tok * 1e6,
                note=f"{t_np / t_pt:.2f}x numpy throughput{cpu_ratio}",
            )
        )
    return rows


def engram_step(mod: Engram, hidden: torch.Tensor, grad: torch.Tensor, hash_ids: torch.Tensor) -> None:
    mod.zero_grad(set_to_none=True)
    hidden.grad = None
    mod(hidden, hash_ids=hash_ids).backward(grad)


def bench_module(args: argparse.Namespace, device: torch.device) -> list[dict]:
    cuda = device.type == "cuda"
    b = args.module_batch or (8 if cuda else 2)
    t = args.module_seq or (4096 if cuda else 512)
    size = args.module_table_size or (5 * 129280 if cuda else 20000)
    n = args.max_ngram
    if args.d_mem % (n - 1) or (args.d_mem // (n - 1)) % args.heads:
        raise SystemExit(f"--d-mem {args.d_mem} must split into {n - 1} orders x {args.heads} heads")
    cfg = EngramConfig(
        engram_vocab_size=[size] * (n - 1),
        max_ngram_size=n,
        n_embed_per_ngram=args.d_mem // (n - 1),
        n_head_per_ngram=args.heads,
        layer_ids=[1],
        seed=args.seed,
        pad_id=0,
    )
    hasher = NgramHasher(cfg, args.vprime, 2)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vprime, (b, t), generator=gen).to(device)
    hash_ids = hasher.hash(ids)[1]
    rows = []
    for m in [int(x) for x in args.hc_mults.split(",") if x]:
        torch.manual_seed(args.seed)
        mod = Engram(cfg, 1, args.hidden, hc_mult=m, hasher=hasher, device=device)
        set_validation(False)  # the ids are known good; keeps host syncs out of the timing
        shape = (b, t, args.hidden) if m == 1 else (b, t, m, args.hidden)
        hidden = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
        grad = torch.randn(shape, generator=gen).to(device)

        sec = timeit(functools.partial(engram_step, mod, hidden, grad, hash_ids), device, args.warmup, args.repeats)
        n_tok = b * t
        rows.append(
            dict(
                name=f"Engram fwd+bwd, M={m}",
                device=str(device),
                config=f"d={args.hidden}, d_mem={args.d_mem}, N={n}, K={args.heads}, table {size}/head, {b}x{t}",
                ms=sec * 1e3,
                cpu_ms=None,
                tok_s=n_tok / sec,
                us_tok=sec / n_tok * 1e6,
                note="",
            )
        )
        del mod
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"device: {device} ({name}); torch {torch.__version__}, numpy {np.__version__}, "
        f"torch CPU threads {torch.get_num_threads()} of {os.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f}: other work on the machine slows the torch rows most); "
        f"warmup {args.warmup}, median of {args.repeats}\n"
    )
    rows = bench_hashing(args, device)
    if not args.skip_module:
        rows += bench_module(args, device)
    print("| benchmark | device | config | median ms | CPU ms | tokens/s | us/token | ratio |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        cpu = "" if r["cpu_ms"] is None else f"{r['cpu_ms']:.1f}"
        print(
            f"| {r['name']} | {r['device']} | {r['config']} | {r['ms']:.1f} | {cpu} | {r['tok_s']:,.0f} | "
            f"{r['us_tok']:.3f} | {r['note']} |"
        )


if __name__ == "__main__":
    main()
