"""Serving throughput with the Engram table on device vs host vs disk, prefetch on vs off, cache on vs off.

One process, one set of weights, one set of inputs. The table variants share the non-table weights of one
model; the device baseline is the plain :class:`~engram.MultiHeadEmbedding` model. Before anything is timed every
variant's prefill logits and greedy generations are checked to equal the baseline's. Variants are timed in
interleaved rounds (every variant once per round, in a rotating order, so all see the same machine load); the
table gives medians, the best round, and CPU-time ratios (robust to other tenants of a shared machine).

* prefill: one forward over ``--batch`` x ``--prefill-len`` tokens (``torch.no_grad``), tokens/s;
* decode: ``--new-tokens`` greedy steps with the KV cache after a ``--prompt-len`` prompt, generated tokens/s.
* "disk (cold)": before every timed call the table file's pages are dropped from the page cache
  (``madvise(MADV_DONTNEED)`` on the map, then ``posix_fadvise(POSIX_FADV_DONTNEED)``), so rows come from the
  block device; the other disk rows find the file in the page cache (it is read there at the start of every
  round, untimed). A last table times the row gather alone per tier against one block of compute: the
  placement rule of ``docs/offload.md``.

The default model has a 512 MiB table next to a dense backbone of 17.7M other parameters, with one Engram layer
in the second block (the paper's section 5 setup, scaled down). On CUDA (``--device cuda``) the baseline's table
is in HBM and the host table pinned; that path has not been run yet. ``--huge`` instead serves a table larger
than this machine's RAM from a sparse file (see :func:`run_huge`).

    python benchmarks/bench_offload.py                        # device / host / disk side by side
    python benchmarks/bench_offload.py --ids uniform          # the same with uniformly random tokens
    python benchmarks/bench_offload.py --huge --huge-gib 32   # a 32 GiB table from disk, checked row by row
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engram import EngramConfig  # noqa: E402
from engram.model import EngramLM, ModelConfig  # noqa: E402
from engram.model.model import engram_hasher  # noqa: E402
from engram.storage import (  # noqa: E402
    DeviceRowStore,
    DiskRowStore,
    OffloadedEmbedding,
    create_row_store,
    offloaded_tables,
    to_tier,
)
from engram.table import EngramTable  # noqa: E402
from engram.train.trainer import TrainConfig, model_config_for, prepare_data  # noqa: E402

HEADS_PER_ORDER, N_EMBED = 8, 512  # K = 8 heads per order, N = 3: 16 heads of 64 floats, d_mem = 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table-mib", type=float, default=512, help="Engram table size (float32)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="prefill batch")
    p.add_argument("--prefill-len", type=int, default=256)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--cache-mib", type=float, default=32, help="hot-row cache of the cache variants")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None, help="folder for the disk table files (default: a temporary folder)")
    p.add_argument("--huge", action="store_true", help="only the larger-than-RAM disk table run")
    p.add_argument("--huge-gib", type=float, default=32)
    p.add_argument(
        "--huge-random-rows",
        type=int,
        default=200_000,
        help="rows written at random positions of the huge table, besides the rows the inputs use",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="compute device: auto (cuda if available), cpu or cuda")
    p.add_argument(
        "--tiers",
        default="device,host,disk",
        help="comma list of the table tiers to time (the device baseline always runs)",
    )
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of the stdlib corpus for the inputs")
    p.add_argument(
        "--ids",
        choices=["corpus", "uniform"],
        default="corpus",
        help="inputs: windows of the corpus (Zipf-distributed n-grams) or uniformly random tokens",
    )
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary of the inputs' tokenizer")
    args = p.parse_args(argv)
    unknown = set(args.tiers.split(",")) - {"device", "host", "disk"}
    if unknown:
        p.error(f"--tiers takes device, host and disk, got {sorted(unknown)}")
    return args


# ---------------------------------------------------------------------------------------------------- setup
def model_config(args: argparse.Namespace, per_head_rows: int) -> ModelConfig:
    """A dense backbone (every block dense: first_k_dense = num_layers), one Engram layer in block 1."""
    return ModelConfig(
        family="engram",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=8,
        intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
        first_k_dense=args.layers,
        max_seq_len=max(args.prefill_len, args.prompt_len + args.new_tokens),
        engram=EngramConfig(
            engram_vocab_size=[per_head_rows] * 2,
            max_ngram_size=3,
            n_embed_per_ngram=N_EMBED,
            n_head_per_ngram=HEADS_PER_ORDER,
            layer_ids=[1],
        ),
    )


def per_head_rows_for(table_bytes: float) -> int:
    row_bytes = N_EMBED // HEADS_PER_ORDER * 4
    return int(table_bytes / (2 * HEADS_PER_ORDER * row_bytes))


def corpus_inputs(args: argparse.Namespace):
    """The stdlib corpus tokenised with the training BPE; fixed windows for prefill and prompts."""
    tok, files = prepare_data(TrainConfig(max_bytes=args.max_bytes, vocab_size=args.vocab, progress=False))
    tokens = files.train.tokens
    rng = np.random.default_rng(args.seed)
    if args.ids == "uniform":  # every token equally likely: n-gram rows accessed uniformly, no hot set to cache
        tokens = rng.integers(0, args.vocab, size=len(tokens), dtype=np.int64)

    def windows(n: int, length: int, rounds: int) -> list[torch.Tensor]:
        out = []
        for _ in range(rounds):
            starts = rng.integers(0, len(tokens) - length, n)
            out.append(torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64)))
        return out

    rounds = args.rounds + 1  # one extra batch for the warm-up
    device = compute_device(args)
    return (
        tok,
        [x.to(device) for x in windows(args.batch, args.prefill_len, rounds)],
        [x.to(device) for x in windows(args.gen_batch, args.prompt_len, rounds)],
    )


def compute_device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def with_tables(cfg: ModelConfig, ctok, stores: dict[int, object], base: EngramLM, cache_bytes: int = 0) -> EngramLM:
    """A model with ``base``'s weights whose Engram tables are OffloadedEmbeddings over ``stores``."""
    model = EngramLM(
        cfg,
        ctok,
        table_factory=lambda layer, heads, dim, std: OffloadedEmbedding(
            heads, dim, stores[layer], init_std=std, cache_bytes=cache_bytes
        ),
    )
    keys = set(offloaded_tables(model))
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in base.state_dict().items() if k not in keys}, strict=False
    )
    assert sorted(missing) == sorted(keys) and not unexpected, (missing, unexpected)
    return model.eval()


def drop_page_cache(model: EngramLM) -> None:
    """Evict the pages of the model's disk tables from the page cache."""
    for _, table in offloaded_tables(model).values():
        if isinstance(table.store, DiskRowStore):
            drop_store_pages(table.store)


def drop_store_pages(store: DiskRowStore) -> None:
    """Unmap our pages of the table file, then ask the kernel to drop its (clean) cached pages."""
    store.flush()
    store.advise(mmap.MADV_DONTNEED)
    fd = os.open(store.path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_into_page_cache(store: DiskRowStore) -> None:
    """Read the table file once with plain reads, so that its pages are in the page cache (untimed)."""
    with open(store.path, "rb", buffering=0) as f:
        buf = bytearray(64 << 20)
        while f.readinto(buf):
            pass


def resident_mib(path: Path) -> str:
    """Page-cache residency of a file, from util-linux ``fincore`` (or '?' where it is missing)."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return f"{int(out[0]) / 2**20:,.1f} MiB"
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        return "?"


# ---------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: EngramLM, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits
    sync(ids.device)
    return logits


@torch.no_grad()
def decode(model: EngramLM, prompt: torch.Tensor, new_tokens: int) -> tuple[list, float, float]:
    """Greedy decoding with the KV cache; returns the tokens, and the wall and CPU seconds of the decode steps
    (the prompt's prefill excluded)."""
    state = model.new_state()
    logits = model(prompt, state=state).logits[:, -1]
    out = []
    sync(prompt.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(new_tokens):
        nxt = logits.argmax(-1)
        out.append(nxt)
        logits = model(nxt[:, None], state=state).logits[:, -1]
    sync(prompt.device)
    t1, c1 = time.perf_counter(), time.process_time()
    return torch.stack(out, 1).tolist(), t1 - t0, c1 - c0


class Variant:
    """One row of the table: a model (shared between variants of a tier) with its prefetch / cache settings.
    Each variant keeps its own hot-row cache across rounds, installed in the tables while it runs."""

    def __init__(self, name: str, model: EngramLM, prefetch: bool = True, cache_bytes: int = 0, cold: bool = False):
        self.name, self.model, self.prefetch, self.cache_bytes, self.cold = name, model, prefetch, cache_bytes, cold
        self.caches: dict[str, object] = {}
        self.prefill_tps: list[float] = []  # tokens per wall-clock second
        self.decode_tps: list[float] = []
        self.prefill_cpu: list[float] = []  # tokens per CPU second of this process (all its threads)
        self.decode_cpu: list[float] = []

    def activate(self) -> None:
        for key, (_, table) in offloaded_tables(self.model).items():
            table.prefetch_enabled = self.prefetch
            table.cache_bytes, table.cache = self.cache_bytes, self.caches.get(key)

    def deactivate(self) -> None:
        for key, (_, table) in offloaded_tables(self.model).items():
            self.caches[key] = table.cache

    def before_call(self) -> None:
        if self.cold:
            drop_page_cache(self.model)

    def cache_stats(self):
        return [c.stats for c in self.caches.values() if c is not None]


def run_rounds(variants: list[Variant], prefill_batches, prompts, args, warm_files=()) -> None:
    """Warm-up call (batch 0) then ``args.rounds`` timed rounds. A round reads ``warm_files`` into the page
    cache, runs the variants that keep the page cache, then the "cold" ones (which drop it before every call);
    within each group the order rotates from round to round, so that all variants see the same machine load."""
    for v in variants:
        v.activate()
        prefill(v.model, prefill_batches[0])
        decode(v.model, prompts[0], args.new_tokens)
        v.deactivate()
    warm, cold = [v for v in variants if not v.cold], [v for v in variants if v.cold]
    for r in range(1, args.rounds + 1):
        for store in warm_files:
            read_into_page_cache(store)
        for v in [
            *warm[r % len(warm) :],
            *warm[: r % len(warm)],
            *cold[r % max(len(cold), 1) :],
            *cold[: r % max(len(cold), 1)],
        ]:
            v.activate()
            v.before_call()
            t0, c0 = time.perf_counter(), time.process_time()
            prefill(v.model, prefill_batches[r])
            t1, c1 = time.perf_counter(), time.process_time()
            v.prefill_tps.append(prefill_batches[r].numel() / (t1 - t0))
            v.prefill_cpu.append(prefill_batches[r].numel() / max(c1 - c0, 1e-9))
            v.before_call()
            _, seconds, cpu = decode(v.model, prompts[r], args.new_tokens)
            v.decode_tps.append(prompts[r].shape[0] * args.new_tokens / seconds)
            v.decode_cpu.append(prompts[r].shape[0] * args.new_tokens / max(cpu, 1e-9))
            v.deactivate()


def report(variants: list[Variant], baseline: Variant) -> str:
    """ "vs device" = throughput / the baseline's (1.000 = as fast, < 1 = slower): from the median wall time over
    rounds, from the best round of each (the least disturbed by other tenants of the machine), and from this
    process's CPU time (median; all its threads)."""
    med = statistics.median

    def cols(v: Variant, tps: str, cpu: str) -> str:
        b_tps, b_cpu = getattr(baseline, tps), getattr(baseline, cpu)
        x, c = getattr(v, tps), getattr(v, cpu)
        return f"{med(x):,.1f} | {med(x) / med(b_tps):.3f} | {max(x) / max(b_tps):.3f} | {med(c) / med(b_cpu):.3f}"

    lines = [
        "| variant | prefill tok/s | vs device: median | best | CPU | decode tok/s | vs device: median | best | CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in variants:
        lines.append(f"| {v.name} | {cols(v, 'prefill_tps', 'prefill_cpu')} | {cols(v, 'decode_tps', 'decode_cpu')} |")
    return "\n".join(lines)


def spread(variants: list[Variant]) -> str:
    def rel(xs):
        return (max(xs) - min(xs)) / statistics.median(xs)

    worst_p = max(rel(v.prefill_tps) for v in variants)
    worst_d = max(rel(v.decode_tps) for v in variants)
    return f"largest (max - min) / median over rounds: prefill {worst_p:.1%}, decode {worst_d:.1%}"


def machine() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load}"
    )


# ---------------------------------------------------------------------------------------------------- main run
def run_main(args: argparse.Namespace, work: Path) -> None:
    tok, prefill_batches, prompts = corpus_inputs(args)
    cfg, ctok = model_config_for(model_config(args, per_head_rows_for(args.table_mib * 2**20)), tok)
    torch.manual_seed(args.seed)
    base = EngramLM(cfg, ctok).eval()
    weight = base.blocks[1].engram.table.weight.detach()
    table_mib = weight.numel() * 4 / 2**20
    backbone = sum(p.numel() for n, p in base.named_parameters() if not n.endswith("table.weight"))
    print(
        f"model: hidden {cfg.hidden_size}, {cfg.num_layers} dense blocks, Engram at block 1; table "
        f"{weight.shape[0]:,} x {weight.shape[1]} float32 = {table_mib:,.0f} MiB; other parameters "
        f"{backbone / 1e6:.1f}M ({backbone * 4 / 2**20:,.0f} MiB)"
    )
    print(
        f"inputs: prefill {args.batch} x {args.prefill_len}, decode {args.gen_batch} x {args.new_tokens} "
        f"after a {args.prompt_len}-token prompt, {args.rounds} rounds, {args.ids} ids; {machine()}"
    )

    tiers = set(args.tiers.split(","))
    t0 = time.perf_counter()
    # built from the CPU weights, before the move
    host_store = to_tier(DeviceRowStore(weight), "host") if "host" in tiers else None
    disk_store = (
        to_tier(DeviceRowStore(weight), "disk", path=work / "layer01.rows", overwrite=True) if "disk" in tiers else None
    )
    print(f"host copy / disk file written in {time.perf_counter() - t0:.1f} s")
    device = compute_device(args)
    base.to(device)
    cache = int(args.cache_mib * 2**20)
    baseline = Variant("device (MultiHeadEmbedding)", base)
    variants = [baseline]
    if "device" in tiers:
        dev_store_model = with_tables(
            cfg, ctok, {1: DeviceRowStore(base.blocks[1].engram.table.weight.detach())}, base
        ).to(device)
        variants.append(Variant("device store (OffloadedEmbedding)", dev_store_model))
    if host_store is not None:
        host_model = with_tables(cfg, ctok, {1: host_store}, base).to(device)
        variants += [
            Variant("host, prefetch", host_model),
            Variant("host, no prefetch", host_model, prefetch=False),
            Variant(f"host, prefetch + {args.cache_mib:g} MiB cache", host_model, cache_bytes=cache),
        ]
    if disk_store is not None:
        disk_model = with_tables(cfg, ctok, {1: disk_store}, base).to(device)
        variants += [
            Variant("disk (page cache warm), prefetch", disk_model),
            Variant("disk (page cache warm), no prefetch", disk_model, prefetch=False),
            Variant(f"disk (page cache warm), prefetch + {args.cache_mib:g} MiB cache", disk_model, cache_bytes=cache),
            Variant("disk (cold), prefetch", disk_model, cold=True),
            Variant("disk (cold), no prefetch", disk_model, prefetch=False, cold=True),
            Variant(f"disk (cold), prefetch + {args.cache_mib:g} MiB cache", disk_model, cache_bytes=cache, cold=True),
        ]

    # correctness first: every variant gives the baseline's logits and greedy tokens
    want_logits = prefill(base, prefill_batches[0])
    want_tokens = decode(base, prompts[0], args.new_tokens)[0]
    for v in variants[1:]:
        v.activate()
        v.before_call()
        assert torch.equal(prefill(v.model, prefill_batches[0]), want_logits), v.name
        v.before_call()
        assert decode(v.model, prompts[0], args.new_tokens)[0] == want_tokens, v.name
        v.caches.clear()  # the timed runs start from empty caches
    print(
        f"checked: all {len(variants) - 1} variants give the device model's prefill logits (torch.equal) and "
        f"greedy tokens"
    )
    if disk_store is not None:
        drop_page_cache(disk_model)
        print(f"page cache holding the disk table after a drop: {resident_mib(disk_store.path)}")

    run_rounds(variants, prefill_batches, prompts, args, warm_files=[disk_store] if disk_store is not None else [])
    print()
    print(report(variants, baseline))
    print()
    print(spread(variants))
    for v in variants:
        for s in v.cache_stats():
            print(
                f"{v.name}: cache hit rate {s.hit_rate:.1%} over warm-up and rounds ({s.hits:,} hits, "
                f"{s.misses:,} misses)"
            )
    print()
    stores = [
        (name, store, cold)
        for name, store, cold in [
            ("host", host_store, False),
            ("disk (page cache warm)", disk_store, False),
            ("disk (cold)", disk_store, True),
        ]
        if store is not None
    ]
    if stores:
        print(fetch_report(base, stores, prefill_batches, prompts, args, baseline))


def fetch_report(base: EngramLM, stores, prefill_batches, prompts, args, baseline: Variant) -> str:
    """The placement rule measured: how long one batch's row gather takes in each tier (the fetch that prefetch
    must hide), against the compute time of one block of the baseline (prefill batch, and one decode step)."""
    table = base.blocks[1].engram.table
    block_prefill = args.batch * args.prefill_len / statistics.median(baseline.prefill_tps) / args.layers
    block_decode = args.gen_batch / statistics.median(baseline.decode_tps) / args.layers
    times = {name: ([], []) for name, _, _ in stores}
    n_rows = ([], [])
    for r in range(1, args.rounds + 1):
        # a decode step fetches the rows of one position per sequence: the prompt's last, say
        ids = (base.hash_tokens(prefill_batches[r])[1], base.hash_tokens(prompts[r])[1][:, -1:])
        rows = [torch.unique(table.fused_ids(x).reshape(-1)).cpu() for x in ids]
        for i in range(2):
            n_rows[i].append(rows[i].numel())
        for name, store, cold in stores:  # the cold tier last: its drops do not reach the warm one
            if isinstance(store, DiskRowStore) and not cold:
                read_into_page_cache(store)
            for i in range(2):
                if cold:
                    drop_store_pages(store)
                t0 = time.perf_counter()
                store.gather(rows[i])
                times[name][i].append(time.perf_counter() - t0)
    med = statistics.median
    lines = [
        f"one block of the device model: {block_prefill * 1e3:.1f} ms in prefill, {block_decode * 1e3:.2f} ms "
        f"per decode step (median time / {args.layers} blocks)",
        "",
        "| tier | prefill batch: unique rows | gather ms | in blocks | decode step: unique rows | gather ms "
        "| in blocks |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (tp, td) in times.items():
        lines.append(
            f"| {name} | {med(n_rows[0]):,.0f} | {med(tp) * 1e3:.2f} | {med(tp) / block_prefill:.3f} | "
            f"{med(n_rows[1]):,.0f} | {med(td) * 1e3:.3f} | {med(td) / block_decode:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- huge run
class CompactTable(EngramTable):
    """Reference for the huge table: only the rows that were written (all others are zero), held in memory."""

    def __init__(self, head_sizes: list[int], head_dim: int, rows: torch.Tensor, values: torch.Tensor):
        super().__init__(head_sizes, head_dim)
        order = torch.argsort(rows)
        self.register_buffer("rows", rows[order], persistent=False)
        zero_row = values.new_zeros(1, head_dim)  # what every unwritten row holds
        self.register_buffer("values", torch.cat([values[order], zero_row]), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fused = self.fused_ids(ids).reshape(-1)
        pos = torch.searchsorted(self.rows, fused).clamp_(max=self.rows.numel() - 1)
        pos = torch.where(self.rows[pos] == fused, pos, self.rows.numel())
        return self.values[pos].view(*ids.shape, self.head_dim)


def run_huge(args: argparse.Namespace, work: Path) -> None:
    """A sparse table file larger than RAM; known rows written at the rows the inputs use and at random
    positions; served from disk (page cache dropped before every timed call) and checked against a reference
    that holds only the written rows."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    tok, prefill_batches, prompts = corpus_inputs(args)
    cfg, ctok = model_config_for(model_config(args, per_head_rows_for(args.huge_gib * 2**30)), tok)
    torch.manual_seed(args.seed)
    hasher = engram_hasher(cfg, ctok)
    heads = [p for per_order in hasher.table_sizes[1] for p in per_order]
    dim = cfg.engram.head_dim
    num_rows = sum(heads)
    path = work / "huge.rows"
    t0 = time.perf_counter()
    store = create_row_store("disk", num_rows, dim, init_std=0.0, path=path, overwrite=True)  # sparse: no writes
    # the rows the inputs look up (prefill batches and prompts), plus random rows across the whole file
    used = torch.cat([(hasher.hash_tokens(x)[1] + hasher.offsets[1]).reshape(-1) for x in prefill_batches + prompts])
    gen = torch.Generator().manual_seed(args.seed)
    random_rows = torch.randint(0, num_rows, (args.huge_random_rows,), generator=gen)
    rows = torch.unique(torch.cat([used, random_rows]))
    values = torch.randn(rows.numel(), dim, generator=gen)
    store.scatter(rows, values)
    drop_store_pages(store)  # flushes, then evicts: the writer's map must not keep the pages resident
    table_bytes = store.nbytes
    del store
    st = path.stat()
    print(
        f"huge table: {num_rows:,} x {dim} float32 = {table_bytes / 2**30:.2f} GiB file "
        f"(machine RAM {ram / 2**30:.1f} GiB); {rows.numel():,} known rows written "
        f"({st.st_blocks * 512 / 2**20:,.0f} MiB allocated on disk) in {time.perf_counter() - t0:.1f} s"
    )

    disk_model = EngramLM(
        cfg,
        ctok,
        table_factory=lambda layer, h, d, std: OffloadedEmbedding(
            h, d, DiskRowStore(path, num_rows=sum(h), dim=d), init_std=std
        ),
    ).eval()
    table = disk_model.blocks[1].engram.table
    ref_model = with_tables_ref(cfg, ctok, disk_model, heads, dim, rows, values)
    disk_model.to(compute_device(args))
    ref_model.to(compute_device(args))
    drop_page_cache(disk_model)
    print(f"page cache holding the table file after the drop: {resident_mib(path)}")

    # rows: every written row reads back exactly, from disk
    t0 = time.perf_counter()
    back = table.store.gather(rows)
    seconds = time.perf_counter() - t0
    assert torch.equal(back, values), "rows read back from the disk table differ from the rows written"
    others = torch.randint(0, num_rows, (100_000,), generator=gen)
    others = others[~torch.isin(others, rows)]
    assert not table.store.gather(others).any(), "rows never written must read as zeros"
    print(
        f"checked: all {rows.numel():,} written rows read back exactly from disk ({seconds:.2f} s cold, "
        f"{rows.numel() / seconds:,.0f} rows/s), and {others.numel():,} random unwritten rows read as zeros"
    )
    # outputs: the disk model equals the reference on the benchmark inputs
    for x, p in zip(prefill_batches[:2], prompts[:2]):
        drop_page_cache(disk_model)
        assert torch.equal(prefill(disk_model, x), prefill(ref_model, x)), "prefill logits differ"
        assert decode(disk_model, p, args.new_tokens)[0] == decode(ref_model, p, args.new_tokens)[0]
    print("checked: prefill logits (torch.equal) and greedy generations equal the in-memory reference's")

    variants = [
        Variant("in-memory reference (written rows only)", ref_model),
        Variant("disk (cold), prefetch", disk_model, cold=True),
        Variant("disk (cold), no prefetch", disk_model, prefetch=False, cold=True),
        Variant("disk (page cache kept between calls), prefetch", disk_model),
    ]
    run_rounds(variants, prefill_batches, prompts, args)
    print()
    print(report(variants, variants[0]).replace("vs device", "vs reference"))
    print()
    print(spread(variants))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"peak resident memory of this process: {rss:,.0f} MiB (the table file is {table_bytes / 2**30:.1f} GiB)")


def with_tables_ref(cfg, ctok, disk_model, heads, dim, rows, values) -> EngramLM:
    ref = EngramLM(cfg, ctok, table_factory=lambda layer, h, d, std: CompactTable(h, d, rows, values))
    state = {k: v for k, v in disk_model.state_dict().items() if not k.endswith("table.weight")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ref.eval()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(
            prefix="engram-offload-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None
        )
        work = Path(tmp.name)
    else:
        work = Path(args.dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        (run_huge if args.huge else run_main)(args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
