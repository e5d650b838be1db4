"""Decode speed against the ecosystem: engram's ``generate`` vs transformers' ``generate()``, side by side.

Four models of the same width, depth and vocabulary, random weights, greedy decoding of the same random prompts
(no early stop):

* ``engram``: the Engram model :func:`engram.model.allocate` derives from the MoE (demo shape by default);
* ``moe``: that pure MoE;
* ``dense``: the dense model of the MoE's activated FFN width (:func:`engram.model.params.dense_counterpart`);
* ``llama (transformers)``: a transformers ``LlamaForCausalLM`` with the dense model's width, depth, heads,
  FFN width and vocabulary, decoded by ``model.generate()``: the ecosystem's baseline for the same work.

Table 1 gives tokens/s of the whole call (prefill included) for each batch size, with ratios to the MoE and to
transformers in the same run; calls are interleaved round-robin over models, so machine noise hits all alike,
and the median of ``--repeats`` is shown. Table 2 is the per-token cost at a position: after a prefill of
``position`` tokens (untimed), ``--window`` single-token steps are timed for the Engram model and its MoE, and
forward hooks time the Engram modules inside the step. Attention's share grows with the position; the Engram
modules' must not (O(1) per token: N-1 hash lookups per head whatever the context length).

    python benchmarks/bench_generate.py                       # CPU, demo size, 1 thread: a few minutes
    python benchmarks/bench_generate.py --device cuda --hidden 1024 --layers 8 --vocab 32768
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram import CompressedTokenizer, EngramConfig
from engram.model import EngramLM, ModelConfig, SamplingConfig, allocate, generate
from engram.model.params import dense_counterpart


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16, help="routed experts of the MoE")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rho", type=float, default=0.75)
    p.add_argument("--batches", default="1,8", help="comma list of batch sizes for table 1")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--positions", default="128,1024,4096", help="comma list of positions for table 2")
    p.add_argument("--window", type=int, default=16, help="timed decode steps at each position")
    p.add_argument("--position-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-transformers", action="store_true", help="no transformers baseline")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_models(args: argparse.Namespace, device: torch.device) -> dict[str, torch.nn.Module]:
    max_len = max(args.prompt_len + args.new_tokens, max(positions(args)) + args.window + 1)
    base = ModelConfig(
        family="moe",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=max(1, args.hidden // 32),
        max_seq_len=max_len,
        intermediate_size=3 * args.hidden,
        moe_intermediate_size=args.hidden,
        n_shared_experts=1,
        n_routed_experts=args.experts,
        num_experts_per_tok=2,
        first_k_dense=1,
        hc_mult=1,
    )
    # the demo's Engram shape: d_mem = d/2 (2 orders x 4 heads), one module at block 1
    template = EngramConfig(
        engram_vocab_size=[1000, 1000], n_embed_per_ngram=args.hidden // 4, n_head_per_ngram=4, layer_ids=[1], pad_id=0
    )
    configs = {"engram": allocate(base, args.rho, template), "moe": base, "dense": dense_counterpart(base)}
    tok = CompressedTokenizer.identity(args.vocab)
    models: dict[str, torch.nn.Module] = {}
    for name, cfg in configs.items():
        torch.manual_seed(args.seed)
        models[name] = EngramLM(cfg, tok if cfg.family == "engram" else None).to(device).eval()
    if not args.skip_transformers:
        models["llama (transformers)"] = llama_like(configs["dense"], device, args.seed)
    return models


def llama_like(cfg: ModelConfig, device: torch.device, seed: int) -> torch.nn.Module:
    """transformers' LlamaForCausalLM with the dense model's shape (MHA, SwiGLU, RMSNorm, RoPE, untied head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_cfg).to(device).eval()


def positions(args: argparse.Namespace) -> list[int]:
    return [int(p) for p in args.positions.split(",") if p]


def generate_call(name: str, model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], int]:
    """One greedy generation of ``new_tokens`` per row; returns the number of generated tokens."""
    if name.startswith("llama"):
        mask = torch.ones_like(prompt)

        def run() -> int:
            with torch.no_grad():
                out = model.generate(
                    prompt,
                    attention_mask=mask,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    use_cache=True,
                )
            return (out.shape[1] - prompt.shape[1]) * out.shape[0]

        return run
    prompts = prompt.tolist()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)

    def run() -> int:
        return sum(len(o) for o in generate(model, prompts, sampling))

    return run


def table_generate(models: dict, args: argparse.Namespace, device: torch.device) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        prompt = torch.randint(0, args.vocab, (b, args.prompt_len), generator=gen).to(device)
        calls = {name: generate_call(name, m, prompt, args.new_tokens) for name, m in models.items()}
        for call in calls.values():  # warm-up (allocator, lazy init)
            call()
        times: dict[str, list[float]] = {n: [] for n in calls}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            for name, call in calls.items():
                sync(device)
                t0 = time.perf_counter()
                counts[name] = call()
                sync(device)
                times[name].append(time.perf_counter() - t0)
        for name in calls:
            if counts[name] != b * args.new_tokens:
                raise SystemExit(f"{name} generated {counts[name]} tokens, expected {b * args.new_tokens}")
            sec = statistics.median(times[name])
            rows.append(
                {
                    "model": name,
                    "batch": b,
                    "seconds": sec,
                    "tokens_per_s": counts[name] / sec,
                    "ms_per_step": sec / args.new_tokens * 1e3,
                }
            )
    return rows


class ModuleTimer:
    """Forward pre/post hooks that add up the wall time spent inside some modules (device-synchronised)."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device):
        self.device, self.total, self._t0 = device, 0.0, 0.0
        self.handles = [
            h for m in modules for h in (m.register_forward_pre_hook(self._start), m.register_forward_hook(self._stop))
        ]

    def _start(self, module, args) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def _stop(self, module, args, output) -> None:
        sync(self.device)
        self.total += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def step_times(model: EngramLM, position: int, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Median wall time of one decode step at ``position`` (after an untimed prefill of that many tokens), and
    the median time of the Engram modules within it (0 for models without Engram)."""
    gen = torch.Generator().manual_seed(args.seed + position)
    prompt = torch.randint(0, args.vocab, (args.position_batch, position), generator=gen).to(device)
    state = model.new_state()
    logits = model(prompt, state=state).logits[:, -1]
    engram_modules = list(model.engram_layers.values())
    timer = ModuleTimer(engram_modules, device) if engram_modules else None
    total, inner = [], []
    try:
        for _ in range(args.window):
            nxt = logits.argmax(-1)
            before = timer.total if timer else 0.0
            sync(device)
            t0 = time.perf_counter()
            logits = model(nxt[:, None], state=state).logits[:, -1]
            sync(device)
            total.append(time.perf_counter() - t0)
            inner.append((timer.total if timer else 0.0) - before)
    finally:
        if timer:
            timer.remove()
    return statistics.median(total), statistics.median(inner)


def table_positions(models: dict, args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    for pos in positions(args):
        times = {}
        for _ in range(args.repeats):  # interleaved: both models see the same load
            for name in ("engram", "moe"):
                times.setdefault(name, []).append(step_times(models[name], pos, args, device))
        eng = [statistics.median(t[i] for t in times["engram"]) for i in range(2)]
        moe = statistics.median(t[0] for t in times["moe"])
        rows.append(
            {"position": pos, "engram_ms": eng[0] * 1e3, "moe_ms": moe * 1e3, "engram_modules_ms": eng[1] * 1e3}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    models = build_models(args, device)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} hidden={args.hidden} "
        f"layers={args.layers} vocab={args.vocab}; greedy, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"median of {args.repeats}; load average {os.getloadavg()[0]:.1f}\n"
    )
    rows = table_generate(models, args, device)
    print("| model | batch | seconds | tokens/s | ms/step | vs moe | vs transformers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        same = {x["model"]: x for x in rows if x["batch"] == r["batch"]}
        hf = same.get("llama (transformers)")
        vs_hf = f"{r['tokens_per_s'] / hf['tokens_per_s']:.3f}x" if hf else "-"
        print(
            f"| {r['model']} | {r['batch']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['ms_per_step']:.2f} | {r['tokens_per_s'] / same['moe']['tokens_per_s']:.3f}x | {vs_hf} |"
        )
    print(
        f"\nper decode step at a position (batch {args.position_batch}, median of {args.window} steps x "
        f"{args.repeats} repeats; 'Engram modules' = time inside the Engram layers of the step, hooks synchronised)"
    )
    prow = table_positions(models, args, device)
    print("| position | engram step ms | moe step ms | engram / moe | Engram modules ms | Engram modules vs first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in prow:
        print(
            f"| {r['position']} | {r['engram_ms']:.3f} | {r['moe_ms']:.3f} | {r['engram_ms'] / r['moe_ms']:.3f}x | "
            f"{r['engram_modules_ms']:.3f} | {r['engram_modules_ms'] / prow[0]['engram_modules_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
