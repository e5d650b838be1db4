"""Decode step of matched models at the demo size, Engram vs its MoE vs a dense model (engram.model.generate).

The models are built like ``engram demo``'s (``engram.reports.compare.demo_base`` / ``demo_engram_template``,
Engram derived from the MoE by ``allocate`` at rho = 0.75, the dense model of the MoE's activated size); weights
are untrained, which does not change the work per step. Each model runs ``engram.model.generate`` (greedy) over
the same prompts; the per-step time is ``(t(new_tokens) - t(1)) / (new_tokens - 1)``, which leaves out the prefill.
Models alternate round-robin, each round starting with the next model, so machine noise and the order hit all
alike; medians are reported with ratios to the MoE, and
the fastest round of each (noise only ever adds time, so on a shared machine the minimum is the steadier figure).
On the CPU every decode step of the long generation is also timed on its own (a wrapper around
``forward_checked``, the same for every model): the per-step-median columns take each step's median over the
rounds and average those, which leaves out the bursts of noise that hit a few steps of a round.
``--clock cpu`` times with the process's CPU time instead of wall time, which leaves out the time other
processes hold the cores on a shared machine (it still sees their cache and memory traffic). ``--compile``
adds rows for the same models with ``forward_checked`` under ``torch.compile`` (same settings for each).

    python benchmarks/bench_decode.py --threads 1 --clock cpu           # batch 4, 64 new tokens
    python benchmarks/bench_decode.py --threads 1 --rounds 60 --clock cpu --control   # + an identical MoE copy
    python benchmarks/bench_decode.py --threads 1 --batch 8 --prompt-len 128 --new-tokens 256
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

import engram
from engram import CompressedTokenizer
from engram.model import EngramLM, SamplingConfig, allocate, generate
from engram.model.params import dense_counterpart
from engram.reports.compare import demo_base, demo_engram_template


def demo_models(
    vocab_size: int = 4096, rho: float = 0.75, max_seq_len: int = 512, device: str | torch.device = "cpu"
) -> dict[str, EngramLM]:
    """The demo's MoE, its Engram counterpart and the dense model of the same activated size, in eval mode.
    Where the fused CPU decode kernels apply (``engram.decode_kernels``), ``"engram (torch ops)"`` is the same
    Engram model decoded with them switched off (:func:`generate_seconds` switches them per call)."""
    base = demo_base().replace(vocab_size=vocab_size, max_seq_len=max_seq_len)
    configs = {"moe": base, "engram": allocate(base, rho, demo_engram_template()), "dense": dense_counterpart(base)}
    tok = CompressedTokenizer.identity(vocab_size)
    torch.manual_seed(0)
    models = {
        name: EngramLM(cfg, tok if cfg.family == "engram" else None).to(device).eval() for name, cfg in configs.items()
    }
    if torch.device(device).type == "cpu" and engram.cpu_kernels_enabled():
        models[TORCH_OPS] = models["engram"]
    return models


TORCH_OPS = "engram (torch ops)"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def generate_seconds(
    model: EngramLM,
    prompts: list[list[int]],
    new_tokens: int,
    clock: str = "wall",
    kernels: bool = True,
    steps: list[float] | None = None,
) -> float:
    """Time of one greedy ``generate`` call (prefill + ``new_tokens`` decode steps) on ``clock``; ``kernels=False``
    decodes without the fused CPU kernels. With ``steps`` (a list, CPU models) the time of every forward call of
    the generation (the prefill first) is appended to it."""
    now = CLOCKS[clock]
    before = engram.cpu_kernels_enabled()
    engram.set_cpu_kernels(kernels and before)
    own = model.__dict__.get("forward_checked")  # a compiled twin's
    if steps is not None:
        forward = model.forward_checked

        def timed(*args, **kwargs):
            t0 = now()
            out = forward(*args, **kwargs)
            steps.append(now() - t0)
            return out

        model.forward_checked = timed
    try:
        t0 = now()
        generate(model, prompts, SamplingConfig(max_new_tokens=new_tokens, temperature=0.0))
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()
        return now() - t0
    finally:
        engram.set_cpu_kernels(before)
        if own is not None:
            model.forward_checked = own
        elif "forward_checked" in model.__dict__:
            del model.forward_checked


def decode_step_ms(
    model: EngramLM,
    prompts: list[list[int]],
    new_tokens: int,
    clock: str = "wall",
    kernels: bool = True,
    steps: list[float] | None = None,
) -> float:
    """Milliseconds per decode step: one generate of ``new_tokens`` minus one of a single token, per extra step.
    With ``steps`` the milliseconds of each decode step of the long generate are appended to it."""
    calls: list[float] | None = [] if steps is not None else None
    long = generate_seconds(model, prompts, new_tokens, clock, kernels, calls)
    if steps is not None:
        steps.extend(1e3 * t for t in calls[1:])  # calls[0] is the prefill
    return 1e3 * (long - generate_seconds(model, prompts, 1, clock, kernels)) / (new_tokens - 1)


def typical_step_ms(rounds: list[list[float]]) -> float:
    """The per-step-median estimate: each decode step's median over the rounds, averaged over the steps. A burst
    of machine noise slows a few steps of one round, which the per-step median leaves out."""
    return statistics.fmean(statistics.median(column) for column in zip(*rounds))


def compiled(model: EngramLM) -> EngramLM:
    """A copy of ``model`` whose ``forward_checked`` (the call ``generate`` makes) runs under ``torch.compile``
    (dynamic shapes: the KV cache grows every step)."""
    twin = copy.deepcopy(model)
    twin.forward_checked = torch.compile(twin.forward_checked, dynamic=True)
    return twin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per model (median)")
    ap.add_argument("--validate", action="store_true", help="keep engram's value checks on (default off)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time or this process's CPU time")
    ap.add_argument("--compile", action="store_true", help="add torch.compile'd rows of the MoE and Engram models")
    ap.add_argument(
        "--control", action="store_true", help="add a second copy of the MoE: its ratio shows the method's own bias"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2")
    engram.set_validation(args.validate)
    models = demo_models(max_seq_len=args.prompt_len + args.new_tokens, device=args.device)
    if args.control:
        models["moe (copy)"] = copy.deepcopy(models["moe"])
    if args.compile:
        models.update({f"{name} (compiled)": compiled(models[name]) for name in ("moe", "engram")})
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 4096, (args.batch, args.prompt_len), generator=gen).tolist()
    for name, model in models.items():  # warm-up (and the kernels' first load)
        decode_step_ms(model, prompts, args.new_tokens, kernels=name != TORCH_OPS)
    times: dict[str, list[float]] = {name: [] for name in models}
    per_step: dict[str, list[list[float]]] = {name: [] for name in models}
    names = list(models)
    cpu = torch.device(args.device).type == "cpu"
    for r in range(args.rounds):
        # each round starts with the next model: no model always runs first (or after the same one)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            steps: list[float] | None = [] if cpu else None
            times[name].append(
                decode_step_ms(models[name], prompts, args.new_tokens, args.clock, name != TORCH_OPS, steps)
            )
            if steps is not None:
                per_step[name].append(steps)
    print(
        f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} batch={args.batch} "
        f"prompt={args.prompt_len} new={args.new_tokens} greedy rounds={args.rounds} (median) "
        f"validation={'on' if args.validate else 'off'} clock={args.clock} load={os.getloadavg()[0]:.1f}"
    )
    print(
        "| model | ms / decode step | tokens/s (batch) | vs moe | vs moe, same round (min-max) | fastest round "
        "| vs moe, fastest rounds | ms / step, per-step medians | vs moe, per-step medians |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in models:
        ref_name = "moe (compiled)" if name.endswith("(compiled)") else "moe"
        ref = times[ref_name]
        med = statistics.median(times[name])
        per_round = [t / r for t, r in zip(times[name], ref)]
        typical = f"{typical_step_ms(per_step[name]):.2f} | " if cpu else "- | "
        typical += f"{typical_step_ms(per_step[name]) / typical_step_ms(per_step[ref_name]):.3f}x |" if cpu else "- |"
        print(
            f"| {name} | {med:.2f} | {args.batch * 1e3 / med:,.0f} | {med / statistics.median(ref):.3f}x | "
            f"{statistics.median(per_round):.3f}x ({min(per_round):.3f}-{max(per_round):.3f}) | "
            f"{min(times[name]):.2f} | {min(times[name]) / min(ref):.3f}x | {typical}"
        )


if __name__ == "__main__":
    main()
