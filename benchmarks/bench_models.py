"""Training-step throughput of matched models, side by side in one run.

The pure MoE, the Engram model `allocate()` derives from it (same total and activated parameters) and the dense
model of the same activated size train on identical random batches; steps are interleaved round-robin so machine
noise hits all three alike, and the median step time of each is reported with its ratio to the MoE.

Peak memory per step is the high-water mark of live tensor bytes allocated during one extra (untimed) step: on
CUDA ``torch.cuda.max_memory_allocated``; on CPU the allocations torch.profiler records per op
(``profile_memory=True``), summed in op order (the model's parameters and optimizer state are not counted).
With ``--compile`` each model also trains through ``torch.compile`` (inductor), interleaved with the eager steps
on the same batches, and the table gains the compiled step time and the eager / compiled ratio. Value checks
(``engram.set_validation``) are off, as in a tuned run.

    python benchmarks/bench_models.py --threads 1              # CPU, small size
    python benchmarks/bench_models.py --threads 1 --compile    # + compiled vs eager
    python benchmarks/bench_models.py --device cuda --hidden 512 --layers 8 --batch 16 --seq 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import engram
from engram import CompressedTokenizer, EngramConfig
from engram.model import EngramLM, ModelConfig, allocate, count_params
from engram.model.params import dense_counterpart, format_count
from engram.train.optim import OptimConfig, build_optimizers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rho", type=float, default=0.75)
    ap.add_argument("--hc", type=int, default=1, help="residual branches (mHC when > 1)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per model")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd train steps")
    ap.add_argument("--models", default="moe,engram,dense", help="comma-separated subset of moe,engram,dense")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="step time as wall-clock time, or as this thread's CPU time (robust to other processes "
        "on a shared machine; CPU only, with --threads 1)",
    )
    args = ap.parse_args()
    engram.set_validation(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)

    base = ModelConfig(
        family="moe",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 32),
        max_seq_len=args.seq,
        moe_intermediate_size=args.hidden,
        intermediate_size=3 * args.hidden,
        n_shared_experts=1,
        n_routed_experts=args.experts,
        num_experts_per_tok=2,
        first_k_dense=1,
        hc_mult=args.hc,
    )
    # as in the demo: d_mem = d/2 (2 orders x 4 heads), one module at block 1
    template = EngramConfig(
        engram_vocab_size=[1000, 1000], n_embed_per_ngram=args.hidden // 4, n_head_per_ngram=4, layer_ids=[1], pad_id=0
    )
    configs = {"moe": base, "engram": allocate(base, args.rho, template), "dense": dense_counterpart(base)}
    configs = {n: configs[n] for n in args.models.split(",")}
    tok = CompressedTokenizer.identity(args.vocab)
    models, opts = {}, {}
    for name, cfg in configs.items():
        models[name] = EngramLM(cfg, tok if cfg.family == "engram" else None).to(dev).train()
        opts[name] = build_optimizers(models[name], OptimConfig())
    runners = {(name, "eager"): models[name] for name in configs}
    if args.compile:
        runners.update({(name, "compiled"): torch.compile(models[name]) for name in configs})
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=dev)
    amp = torch.bfloat16 if dev.type == "cuda" else None
    if args.clock == "cpu" and (dev.type != "cpu" or torch.get_num_threads() != 1):
        ap.error("--clock cpu measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    def step(key: tuple[str, str]) -> float:
        name = key[0]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        with torch.autocast(device_type=dev.type, dtype=amp, enabled=amp is not None):
            loss = runners[key](x[:, :-1], x[:, 1:]).loss
        loss.backward()
        for o in opts[name]:
            o.step()
            o.zero_grad(set_to_none=True)
        models[name].update_moe_biases()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return clock() - t0

    def peak_bytes(key: tuple[str, str]) -> int:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base_bytes = torch.cuda.memory_allocated(dev)
            step(key)
            return torch.cuda.max_memory_allocated(dev) - base_bytes
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step(key)
        live = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            live += event.self_cpu_memory_usage
            peak = max(peak, live)
        return peak

    t_compile = time.perf_counter()
    for _ in range(args.warmup):
        for key in runners:
            step(key)
    t_compile = time.perf_counter() - t_compile
    peaks = {key: peak_bytes(key) for key in runners if key[1] == "eager"}
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for _ in range(args.steps):
        for key in runners:
            times[key].append(step(key))
    tokens = args.batch * args.seq
    print(
        f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} "
        f"steps={args.steps} (median, {args.clock} clock) load={os.getloadavg()[0]:.1f}"
        + (f" warm-up incl. compilation {t_compile:.0f}s" if args.compile else "")
    )
    head = "| model | total | activated | engram | routed experts | step ms | tokens/s | vs moe | peak MiB/step |"
    if args.compile:
        head += " compiled ms | eager/compiled |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    ref = statistics.median(times["moe", "eager"]) if "moe" in configs else None
    for name, cfg in configs.items():
        c = count_params(cfg)
        med = statistics.median(times[name, "eager"])
        vs = f"{ref / med:.3f}x" if ref else "-"
        row = (
            f"| {name} | {format_count(c.total)} | {format_count(c.activated)} | {format_count(c.engram)} | "
            f"{c.routed_experts} | {1e3 * med:.1f} | {tokens / med:,.0f} | {vs} | "
            f"{peaks[name, 'eager'] / 2**20:.1f} |"
        )
        if args.compile:
            comp = statistics.median(times[name, "compiled"])
            row += f" {1e3 * comp:.1f} | {med / comp:.2f}x |"
        print(row)


if __name__ == "__main__":
    main()
