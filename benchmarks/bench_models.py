"""Training-step throughput of matched models, side by side in one run.

The pure MoE, the Engram model `allocate()` derives from it (same total and activated parameters) and the dense
model of the same activated size train on identical random batches; steps are interleaved round-robin so machine
noise hits all three alike, and the median step time of each is reported with its ratio to the MoE.

    python benchmarks/bench_models.py                 # CPU, small size
    python benchmarks/bench_models.py --device cuda --hidden 512 --layers 8 --batch 16 --seq 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)

    base = ModelConfig(family="moe", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=max(1, args.hidden // 32), max_seq_len=args.seq, moe_intermediate_size=args.hidden,
                       intermediate_size=3 * args.hidden, n_shared_experts=1, n_routed_experts=args.experts,
                       num_experts_per_tok=2, first_k_dense=1, hc_mult=args.hc)
    # as in the demo: d_mem = d/2 (2 orders x 4 heads), one module at block 1
    template = EngramConfig(engram_vocab_size=[1000, 1000], n_embed_per_ngram=args.hidden // 4, n_head_per_ngram=4,
                            layer_ids=[1], pad_id=0)
    configs = {"moe": base, "engram": allocate(base, args.rho, template), "dense": dense_counterpart(base)}
    tok = CompressedTokenizer.identity(args.vocab)
    models, opts = {}, {}
    for name, cfg in configs.items():
        models[name] = EngramLM(cfg, tok if cfg.family == "engram" else None).to(dev).train()
        opts[name] = build_optimizers(models[name], OptimConfig())
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=dev)
    amp = torch.bfloat16 if dev.type == "cuda" else None

    def step(name: str) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type=dev.type, dtype=amp, enabled=amp is not None):
            loss = models[name](x[:, :-1], x[:, 1:]).loss
        loss.backward()
        for o in opts[name]:
            o.step()
            o.zero_grad(set_to_none=True)
        models[name].update_moe_biases()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {n: [] for n in configs}
    for i in range(args.warmup + args.steps):
        for name in configs:
            t = step(name)
            if i >= args.warmup:
                times[name].append(t)
    tokens = args.batch * args.seq
    print(f"device={dev} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} "
          f"steps={args.steps} (median) load={os.getloadavg()[0]:.1f}")
    print("| model | total | activated | engram | routed experts | step ms | tokens/s | vs moe |")
    print("|---|---|---|---|---|---|---|---|")
    ref = statistics.median(times["moe"])
    for name, cfg in configs.items():
        c = count_params(cfg)
        med = statistics.median(times[name])
        print(f"| {name} | {format_count(c.total)} | {format_count(c.activated)} | {format_count(c.engram)} | "
              f"{c.routed_experts} | {1e3 * med:.1f} | {tokens / med:,.0f} | {ref / med:.3f}x |")


if __name__ == "__main__":
    main()
