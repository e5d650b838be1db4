"""Row formats: gather throughput per format per tier, and the quality and size cost of each format on a model.

Gather: one ``[--rows, --dim]`` table per (tier, format), filled with the same ``normal(0, 0.02)`` rows; each call
gathers ``--batch-rows`` uniformly random rows and decodes them to float32 (what the Engram module receives).
Variants are timed in interleaved rounds (every variant once per round, rotating order, so all see the same machine
load); the table gives the median rows/s and the ratio to float32 in the same tier and the same run. The disk
tables are read into the page cache first (warm): the figures are the decode cost, not the block device's.

Quality (``--model DIR``, a trained model folder): the model is converted with
:func:`engram.model.quantize.quantize_model` to each format and scored on the validation split of its corpus
(the windows ``engram eval`` scores), with the bytes per table row; "rows zeroed" scores the model with every
table row set to 0, to show how much of the loss the table carries at all.

    python benchmarks/bench_formats.py                                   # gather throughput
    python benchmarks/bench_formats.py --model runs/x/model --skip-gather   # quality and size per format
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engram import MultiHeadEmbedding  # noqa: E402
from engram.model import load_model, load_offloaded  # noqa: E402
from engram.model.quantize import quantize_model  # noqa: E402
from engram.storage import OffloadedEmbedding, create_row_store, to_tier  # noqa: E402
from engram.storage.formats import row_format  # noqa: E402

FORMATS = ("float32", "bfloat16", "fp8_e4m3")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=262144, help="rows per table (float32: rows x dim x 4 bytes)")
    p.add_argument("--dim", type=int, default=256, help="row width (a multiple of 32 for fp8)")
    p.add_argument("--batch-rows", type=int, default=16384, help="rows per gather")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--calls", type=int, default=5, help="gathers per variant per round")
    p.add_argument("--tiers", default="device,host,disk", help="comma-separated tiers to time")
    p.add_argument("--dir", default=None, help="folder for the disk tables (default: a temporary folder)")
    p.add_argument("--model", default=None, help="a trained model folder: also measure loss and bytes per format")
    p.add_argument("--data", default=None, help="with --model: the corpus to score (default: the stdlib corpus)")
    p.add_argument("--max-batches", type=int, default=50, help="with --model: validation batches of 8 x 128 tokens")
    p.add_argument("--skip-gather", action="store_true", help="only the --model part")
    return p.parse_args(argv)


def gather_report(args: argparse.Namespace, work: Path) -> str:
    source = create_row_store("host", args.rows, args.dim, seed=0, progress=False)
    stores = {}
    for tier in args.tiers.split(","):
        for fmt in FORMATS:
            kw = {"path": work / f"{fmt}.rows", "overwrite": True} if tier == "disk" else {}
            if tier == "device":
                kw["device"] = "cuda" if torch.cuda.is_available() else "cpu"
            stores[tier, fmt] = to_tier(source, tier, fmt=fmt, dtype=torch.float32, **kw)
    del source
    for (tier, _), store in stores.items():
        if tier == "disk":
            store.read_stored(0, store.num_rows).sum()  # warm: every page in the page cache
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.rows, (args.batch_rows,), generator=gen) for _ in range(args.calls)]
    times = {key: [] for key in stores}
    keys = list(stores)
    for r in range(args.rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            store = stores[key]
            start = time.perf_counter()
            for rows in batches:
                out = store.gather(rows, check=False)
            if out.device.type == "cuda":
                torch.cuda.synchronize()
            times[key].append((time.perf_counter() - start) / args.calls)
    lines = [
        f"gather of {args.batch_rows} random rows of {args.dim} values from [{args.rows}, {args.dim}] tables, decoded "
        f"to float32; median of {args.rounds} interleaved rounds x {args.calls} calls",
        "",
        "| tier | format | bytes/row | table MiB | rows/s | vs float32 (same tier) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for tier, fmt in keys:
        store = stores[tier, fmt]
        rate = args.batch_rows / statistics.median(times[tier, fmt])
        base = args.batch_rows / statistics.median(times[tier, "float32"])
        lines.append(
            f"| {tier} | {fmt} | {store.row_bytes} | {store.nbytes / 2**20:.0f} | {rate / 1e6:.2f}M | "
            f"{rate / base:.2f}x |"
        )
    return "\n".join(lines)


def val_tokens(model_dir: Path, data: str | None):
    from engram.train.data import build_token_files, default_cache_dir, load_corpus, load_tokenizer

    tok = load_tokenizer(model_dir)
    corpus = load_corpus(data, max_bytes=4_000_000)
    name = f"eval-{corpus.fingerprint('val')[:12]}-{tok.fingerprint[:12]}"
    return build_token_files(corpus, tok, default_cache_dir() / "tokens" / name).val


def quality_report(args: argparse.Namespace, work: Path) -> str:
    from engram.train.evaluate import evaluate

    src = Path(args.model)
    tokens = val_tokens(src, args.data)
    seq_len = min(128, load_model(src).cfg.max_seq_len)

    def score(model) -> float:
        return evaluate(model, tokens, batch_size=8, seq_len=seq_len, max_batches=args.max_batches)["loss"]

    rows = []
    for fmt in FORMATS:
        out = quantize_model(src, work / f"model-{fmt}", fmt, overwrite=True, progress=False)
        model = load_model(out)
        tables = [m for m in model.modules() if isinstance(m, OffloadedEmbedding)]
        row_bytes = tables[0].store.row_bytes
        table_mib = sum(t.store.nbytes for t in tables) / 2**20
        rows.append((fmt, row_bytes, tables[0].head_dim, table_mib, score(model)))
    # a copy in host memory (a disk table would be zeroed in its file), every table row set to 0
    zeroed = load_offloaded(src, "host") if (src / "tables.json").is_file() else load_model(src)
    with torch.no_grad():
        for module in zeroed.modules():
            if isinstance(module, OffloadedEmbedding):
                module.store.write_range(0, torch.zeros(module.num_rows, module.head_dim))
            elif isinstance(module, MultiHeadEmbedding):
                module.weight.zero_()
    base_loss = rows[0][4]
    lines = [
        f"validation loss of {src} ({args.max_batches} batches of 8 x {seq_len} tokens) per table row format",
        "",
        "| format | bytes/row (head_dim) | tables MiB | val loss | vs float32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for fmt, row_bytes, dim, mib, loss in rows:
        lines.append(f"| {fmt} | {row_bytes} ({dim}) | {mib:.2f} | {loss:.4f} | {loss - base_loss:+.4f} |")
    zeroed_loss = score(zeroed)
    lines.append(f"| rows zeroed | - | - | {zeroed_loss:.4f} | {zeroed_loss - base_loss:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for fmt in FORMATS:
        row_format(fmt).check_dim(args.dim)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        if not args.skip_gather:
            print(gather_report(args, work), flush=True)
        if args.model:
            print()
            print(quality_report(args, work))


if __name__ == "__main__":
    main()
