"""Communication of row-sharded Engram tables (all-to-all) against replicated tables (dense all-reduce).

Two ways to train one Engram layer's table of R rows x D (value bytes b) on W data-parallel ranks, each
holding B tokens per step:

* **sharded** (``engram.distributed``): each rank owns R/W rows. A rank deduplicates the rows its tokens need
  (U unique of the H = (N-1)K rows per token), sends the U_remote ids owned elsewhere (8 bytes each), serves the
  rows others ask of it, and in the backward sends U_remote row gradients back. Bytes a rank sends per step
  ``= U_remote * 8 + served_remote * D * b + U_remote * D * b`` (plus W counts of 8 bytes).
* **replicated**: every rank holds all R rows and all-reduces the dense table gradient, a ring all-reduce
  sending ``2 (W - 1) / W * R * D * b`` bytes per rank per step, whatever the batch touched.

Part 0 sizes the shards of the paper's tables (rows and GiB per rank). Part 1 counts the bytes per token on
real hash ids: windows of the tokenised Python standard library (the trainer's default corpus) hashed with the
paper's Engram-27B layout (N = 3, K = 8, head_dim 80, so 16 rows per token and d_mem = 1280), rank 0's U and
U_remote measured from its own ids for each W; ``served_remote`` is taken equal to ``U_remote`` (every rank
draws from the same distribution). Part 2 times both on this machine
with 2 gloo processes on the CPU (loopback: it measures the software path, not a network), the sharded lookup
forward + backward against the replicated lookup forward + backward + all-reduce, and the communication alone
(the four all-to-alls against the all-reduce), medians over ``--repeats`` (slowest rank).

    python benchmarks/bench_alltoall.py
    python benchmarks/bench_alltoall.py --head-rows 20000,226240,2262400 --tokens 4096,16384 --worlds 8,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engram import CompressedTokenizer, EngramConfig, MultiHeadEmbedding, NgramHasher  # noqa: E402
from engram.distributed import RowExchange, ShardedEmbedding, shard_bounds  # noqa: E402
from engram.train.trainer import TrainConfig, prepare_data  # noqa: E402

LAYER = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--head-rows",
        default="20000,226240,2262400,7239680",
        help="configured rows per hash head (paper: 2262400 for Engram-27B, 7239680 for Engram-40B)",
    )
    p.add_argument("--tokens", default="4096,16384,65536", help="tokens per rank per step")
    p.add_argument("--worlds", default="8,64,512", help="ranks W for the byte count")
    p.add_argument("--head-dim", type=int, default=80)
    p.add_argument("--heads", type=int, default=8, help="K, heads per n-gram order (N = 3)")
    p.add_argument("--value-bytes", type=int, default=4, help="bytes per table value: 4 fp32 (as trained here), 2 bf16")
    p.add_argument("--seq-len", type=int, default=512, help="window length of the sampled sequences")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--measure-head-rows", default="2000,20000,100000", help="rows per head for the timed 2-process part"
    )
    p.add_argument("--measure-tokens", default="4096,16384")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--skip-measure", action="store_true")
    return p.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x]


def hasher_for(head_rows: int, args: argparse.Namespace, tok) -> NgramHasher:
    cfg = EngramConfig(
        engram_vocab_size=[head_rows, head_rows],
        max_ngram_size=3,
        n_embed_per_ngram=args.heads * args.head_dim,
        n_head_per_ngram=args.heads,
        layer_ids=[LAYER],
        pad_id=tok.pad_id,
    )
    return NgramHasher.from_tokenizer(cfg, CompressedTokenizer(tok.hf))


def sample_windows(tokens, n_tokens: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    import numpy as np

    rows = max(1, n_tokens // seq_len)
    starts = torch.randint(0, len(tokens) - seq_len, (rows,), generator=gen).tolist()
    return torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len], dtype=np.int64) for s in starts]))


def fused_ids(hasher: NgramHasher, windows: torch.Tensor) -> tuple[torch.Tensor, int]:
    ids = hasher.hash_tokens(windows)[LAYER]
    sizes = [p for heads in hasher.table_sizes[LAYER] for p in heads]
    offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
    return ids + offsets, sum(sizes)


# ---------------------------------------------------------------------------------------------------- part 0
def memory_table(args: argparse.Namespace) -> None:
    """Rows and bytes each rank holds for the paper's Engram tables, by number of ranks."""
    import yaml

    from engram.hashing import table_primes
    from engram.model import ModelConfig

    print("## Table memory per rank (all Engram layers of the model, fp32 rows)\n")
    print(
        "weights + dense local gradient + optimizer state: AdamW keeps 2 values per element (16 bytes/element in "
        "all), RowWiseAdam 2 floats per row (8 bytes/element + 8 bytes/row). `replicated` is what every rank "
        "would hold with AdamW if the tables were data-parallel instead.\n"
    )
    print(
        "| model | table params | W | rows/rank | weights GiB/rank | + AdamW GiB/rank | + RowWiseAdam GiB/rank | "
        "replicated GiB/rank |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("engram-27b", "engram-40b"):
        cfg = ModelConfig.from_dict(yaml.safe_load((ROOT / "configs" / "paper" / f"{name}.yaml").read_text())["model"])
        rows = sum(p for layer in table_primes(cfg.engram).values() for heads in layer for p in heads)
        dim = cfg.engram.head_dim
        for world in ints(args.worlds):
            per_rank = -(-rows // world)
            w = per_rank * dim * 4
            print(
                f"| {name} | {rows * dim / 1e9:.2f}B | {world} | {per_rank:,} | {w / 2**30:.2f} | "
                f"{4 * w / 2**30:.2f} | {(2 * w + 8 * per_rank) / 2**30:.2f} | {16 * rows * dim / 2**30:,.0f} |"
            )
    print()


# ---------------------------------------------------------------------------------------------------- part 1
def byte_table(args: argparse.Namespace, tok, tokens) -> None:
    D, b = args.head_dim, args.value_bytes
    rows_per_token = 2 * args.heads
    print(
        f"## Bytes per token per rank, one Engram layer ({rows_per_token} rows/token, head_dim {D}, "
        f"{b}-byte values, ids 8 bytes)\n"
    )
    print(
        "sharded = ids + rows forward + row gradients backward, sent by one rank to the others; replicated = ring "
        "all-reduce of the dense table gradient. `unique/token`: distinct rows per token after deduplication "
        f"(of {rows_per_token}).\n"
    )
    print(
        "| rows per head | table rows | table MiB | tokens/rank | unique/token | W | rows/rank | "
        "sharded B/token | replicated B/token | replicated / sharded |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for head_rows in ints(args.head_rows):
        hasher = hasher_for(head_rows, args, tok)
        gen = torch.Generator().manual_seed(args.seed)
        for n_tok in ints(args.tokens):
            ids, num_rows = fused_ids(hasher, sample_windows(tokens, n_tok, args.seq_len, gen))
            n_tok_real = ids.shape[0] * ids.shape[1]
            unique = ids.reshape(-1).unique()
            for world in ints(args.worlds):
                bounds = shard_bounds(num_rows, world)
                remote = int(((unique < bounds[0]) | (unique >= bounds[1])).sum())  # rank 0 owns [b0, b1)
                sharded = remote * 8 + 2 * remote * D * b + world * 8
                replicated = 2 * (world - 1) / world * num_rows * D * b
                print(
                    f"| {head_rows:,} | {num_rows:,} | {num_rows * D * b / 2**20:,.0f} | {n_tok_real:,} | "
                    f"{unique.numel() / n_tok_real:.2f} | {world} | {bounds[1] - bounds[0]:,} | "
                    f"{sharded / n_tok_real:,.0f} | {replicated / n_tok_real:,.0f} | {replicated / sharded:,.1f}x |"
                )


# ---------------------------------------------------------------------------------------------------- part 2
def _timed(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a collective step takes as long as its slowest rank
    return float(t)


def _measure_worker(rank: int, world: int, store: str, cases: list, args: argparse.Namespace, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    table_group = dist.new_group()
    out = []
    for head_rows, sizes, ids_all in cases:
        ids = ids_all[rank]
        torch.manual_seed(0)
        dense = MultiHeadEmbedding(sizes, args.head_dim)
        sharded = ShardedEmbedding.from_dense(dense, group=table_group)
        grad_out = torch.randn(*ids.shape, args.head_dim)

        def sharded_step():
            sharded.weight.grad = None
            sharded(ids).backward(grad_out)

        def replicated_step():
            dense.weight.grad = None
            dense(ids).backward(grad_out)
            dist.all_reduce(dense.weight.grad)

        fused = sharded.fused_ids(ids)
        local_rows = sharded.weight.shape[0]
        dense_grad = torch.randn_like(dense.weight)

        def exchange_only():  # the communication of the sharded step: plan (counts, ids), rows, row gradients
            plan = RowExchange(fused, sharded.bounds, table_group)
            plan.return_grads(plan.fetch(sharded.weight), local_rows)

        t_sh = _timed(sharded_step, args.warmup, args.repeats)
        t_rep = _timed(replicated_step, args.warmup, args.repeats)
        t_x = _timed(exchange_only, args.warmup, args.repeats)
        t_ar = _timed(lambda: dist.all_reduce(dense_grad), args.warmup, args.repeats)
        moved = RowExchange(fused, sharded.bounds, table_group).bytes_moved(args.head_dim, 4)
        out.append((head_rows, sum(sizes), ids.shape[0] * ids.shape[1], t_sh, t_rep, t_x, t_ar, sum(moved.values())))
    if rank == 0:
        results.put(out)
    dist.barrier()
    dist.destroy_process_group()


def measured_table(args: argparse.Namespace, tok, tokens) -> None:
    world = 2
    cases = []
    for head_rows in ints(args.measure_head_rows):
        hasher = hasher_for(head_rows, args, tok)
        sizes = [p for heads in hasher.table_sizes[LAYER] for p in heads]
        gen = torch.Generator().manual_seed(args.seed + 1)
        for n_tok in ints(args.measure_tokens):
            per_rank = torch.stack(
                [hasher.hash_tokens(sample_windows(tokens, n_tok, args.seq_len, gen))[LAYER] for _ in range(world)]
            )
            cases.append((head_rows, sizes, per_rank))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_measure_worker, args=(r, world, store, cases, args, results)) for r in range(world)
        ]
        for p in procs:
            p.start()
        rows = results.get()
        for p in procs:
            p.join()
    print(
        f"\n## Measured: {world} gloo processes on this CPU, one thread each, fp32, head_dim {args.head_dim}, "
        f"median of {args.repeats}\n"
    )
    print(
        "sharded = ShardedEmbedding forward + backward (dedup, id and row all-to-all, gradient all-to-all, "
        "index_add); replicated = MultiHeadEmbedding forward + backward + all_reduce of the table gradient. "
        "The communication alone: `exchange` = the sharded step's four all-to-alls (plan, rows, gradients), "
        "`all_reduce` = the replicated step's all-reduce.\n"
    )
    print(
        "| rows per head | table rows | tokens/rank | sharded ms | replicated ms | replicated / sharded | "
        "exchange ms | all_reduce ms | all_reduce / exchange | sharded bytes sent/rank |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for head_rows, num_rows, n_tok, t_sh, t_rep, t_x, t_ar, moved in rows:
        print(
            f"| {head_rows:,} | {num_rows:,} | {n_tok:,} | {t_sh * 1e3:,.1f} | {t_rep * 1e3:,.1f} | "
            f"{t_rep / t_sh:,.1f}x | {t_x * 1e3:,.1f} | {t_ar * 1e3:,.1f} | {t_ar / t_x:,.1f}x | "
            f"{moved / 2**20:,.2f} MiB |"
        )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tok, files = prepare_data(TrainConfig(progress=False))
    tokens = files.train.tokens
    print(
        f"corpus: {len(tokens):,} training tokens (Python standard library, BPE {tok.vocab_size}); "
        f"torch {torch.__version__}\n"
    )
    memory_table(args)
    byte_table(args, tok, tokens)
    if not args.skip_measure:
        measured_table(args, tok, tokens)


if __name__ == "__main__":
    main()
