"""Decode speed against the ecosystem: engram's ``generate`` vs transformers' ``generate()``, side by side.

Models of the same width, depth and vocabulary (a byte-level BPE trained on the standard-library corpus, cached),
random weights (untrained: speed does not depend on them), greedy decoding of the same random prompts, no early
stop:

* ``engram``: the Engram model :func:`engram.model.allocate` derives from the MoE (demo shape by default), decoded
  by :func:`engram.model.generate` (what ``engram generate`` runs);
* ``engram exported``: the SAME model after :func:`engram.hf.export`, loaded with
  ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` and decoded by transformers'
  ``model.generate()``; its greedy tokens are checked equal to engram's before anything is timed;
* ``moe``: that pure MoE; ``dense``: the dense model of the MoE's activated FFN width
  (:func:`engram.model.params.dense_counterpart`), both by engram's ``generate``;
* ``llama (transformers)``: a transformers ``LlamaForCausalLM`` with the dense model's width, depth, heads, FFN
  width and vocabulary, decoded by ``model.generate()``: the ecosystem's baseline for the same work.

Table 1 gives tokens/s of the whole call (prefill included) for each batch size, with ratios to the MoE and to
transformers in the same run; calls are interleaved round-robin over models, so machine noise hits all alike,
and the median of ``--repeats`` is shown. ``--clock cpu`` times this thread's CPU time instead of wall time
(robust to other processes on a shared machine; CPU with one thread only). Table 2 is the per-token cost at a
position: after a prefill of ``position`` tokens (untimed), ``--window`` single-token steps are timed for the
Engram model and its MoE, and forward hooks time the Engram modules inside the step. Attention's share grows with
the position; the Engram modules' must not (O(1) per token: N-1 hash lookups per head whatever the context).

    python benchmarks/bench_generate.py --clock cpu           # CPU, demo size, 1 thread: a few minutes
    python benchmarks/bench_generate.py --quick               # every path on tiny sizes, seconds (the test runs it)
    python benchmarks/bench_generate.py --device cuda --hidden 1024 --layers 8 --vocab 32768
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram import CompressedTokenizer, EngramConfig
from engram.model import EngramLM, ModelConfig, SamplingConfig, allocate, generate
from engram.model.params import dense_counterpart
from engram.train.data import TextTokenizer, load_corpus, load_tokenizer

#: --quick: every path (tokenizer, export, transformers loading, both tables) at sizes that run in seconds
QUICK = dict(
    vocab=512, corpus_bytes=200_000, batches="1,2", prompt_len=16, new_tokens=8, positions="16,64", window=2, repeats=1
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16, help="routed experts of the MoE")
    p.add_argument("--vocab", type=int, default=4096, help="BPE vocabulary size (the trainer may stop a bit short)")
    p.add_argument("--corpus-bytes", type=int, default=2_000_000, help="standard-library text the BPE is trained on")
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
    p.add_argument("--skip-transformers", action="store_true", help="no transformers rows (baseline and export)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall-clock time, or this thread's CPU time (robust to other processes; CPU only, with --threads 1)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes that exercise every path in seconds: " + str(QUICK))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu measures one CPU thread: use it with --threads 1 (and --device cpu)")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def text_tokenizer(args: argparse.Namespace) -> TextTokenizer:
    """A byte-level BPE of ``--vocab`` ids on the standard-library corpus (cached like the demo's)."""
    corpus = load_corpus("stdlib", max_bytes=args.corpus_bytes)
    return load_tokenizer("bpe", corpus.train, vocab_size=args.vocab)


def build_models(
    args: argparse.Namespace, device: torch.device, tok: TextTokenizer, export_dir: Path
) -> dict[str, torch.nn.Module]:
    max_len = max(args.prompt_len + args.new_tokens, max(positions(args)) + args.window + 1)
    base = ModelConfig(
        family="moe",
        vocab_size=tok.vocab_size,
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
    ctok = CompressedTokenizer(tok.hf)
    models: dict[str, torch.nn.Module] = {}
    for name, cfg in configs.items():
        torch.manual_seed(args.seed)
        models[name] = EngramLM(cfg, ctok if cfg.family == "engram" else None).to(device).eval()
    if not args.skip_transformers:
        models["engram exported (transformers)"] = exported(models["engram"], tok, export_dir, device)
        models["llama (transformers)"] = llama_like(configs["dense"], device, args.seed)
    return models


def exported(model: EngramLM, tok: TextTokenizer, folder: Path, device: torch.device) -> torch.nn.Module:
    """``model`` through ``engram.hf.export`` and back with ``AutoModelForCausalLM``, as the export docs load it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from engram.hf import export

    hf_logging.disable_progress_bar()
    export(model.cpu(), folder, tok)
    model.to(device)
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True).to(device).eval()


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


def generate_call(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], list[list[int]]]:
    """One greedy generation of ``new_tokens`` per row; returns the generated ids of each row."""
    if not isinstance(model, EngramLM):  # a transformers model: its generate(), without an end-of-text stop
        mask = torch.ones_like(prompt)
        model.generation_config.eos_token_id = None

        def run() -> list[list[int]]:
            with torch.no_grad():
                out = model.generate(
                    prompt, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, use_cache=True
                )
            return out[:, prompt.shape[1] :].tolist()

        return run
    prompts = prompt.tolist()
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)

    def run() -> list[list[int]]:
        return [list(o) for o in generate(model, prompts, sampling)]

    return run


def table_generate(models: dict, args: argparse.Namespace, device: torch.device, clock) -> list[dict]:
    gen = torch.Generator().manual_seed(args.seed)
    vocab = models["engram"].cfg.vocab_size
    rows = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        prompt = torch.randint(0, vocab, (b, args.prompt_len), generator=gen).to(device)
        calls = {name: generate_call(m, prompt, args.new_tokens) for name, m in models.items()}
        first = {name: call() for name, call in calls.items()}  # warm-up (allocator, lazy init), and the outputs
        for name, ids in first.items():
            if [len(r) for r in ids] != [args.new_tokens] * b:
                raise SystemExit(f"{name} generated {[len(r) for r in ids]} tokens per row, expected {args.new_tokens}")
        if "engram exported (transformers)" in first and first["engram exported (transformers)"] != first["engram"]:
            raise SystemExit("the exported model's greedy tokens under transformers' generate() differ from engram's")
        times: dict[str, list[float]] = {n: [] for n in calls}
        for _ in range(args.repeats):
            for name, call in calls.items():
                sync(device)
                t0 = clock()
                call()
                sync(device)
                times[name].append(clock() - t0)
        for name in calls:
            sec = statistics.median(times[name])
            rows.append(
                {
                    "model": name,
                    "batch": b,
                    "seconds": sec,
                    "tokens_per_s": b * args.new_tokens / sec,
                    "ms_per_step": sec / args.new_tokens * 1e3,
                }
            )
    return rows


class ModuleTimer:
    """Forward pre/post hooks that add up the wall time spent inside some modules (device-synchronised)."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device, clock):
        self.device, self.clock, self.total, self._t0 = device, clock, 0.0, 0.0
        self.handles = [
            h for m in modules for h in (m.register_forward_pre_hook(self._start), m.register_forward_hook(self._stop))
        ]

    def _start(self, module, args) -> None:
        sync(self.device)
        self._t0 = self.clock()

    def _stop(self, module, args, output) -> None:
        sync(self.device)
        self.total += self.clock() - self._t0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def step_times(
    model: EngramLM, position: int, args: argparse.Namespace, device: torch.device, clock
) -> tuple[float, float]:
    """Median wall time of one decode step at ``position`` (after an untimed prefill of that many tokens), and
    the median time of the Engram modules within it (0 for models without Engram)."""
    gen = torch.Generator().manual_seed(args.seed + position)
    prompt = torch.randint(0, model.cfg.vocab_size, (args.position_batch, position), generator=gen).to(device)
    state = model.new_state()
    logits = model(prompt, state=state).logits[:, -1]
    engram_modules = list(model.engram_layers.values())
    timer = ModuleTimer(engram_modules, device, clock) if engram_modules else None
    total, inner = [], []
    try:
        for _ in range(args.window):
            nxt = logits.argmax(-1)
            before = timer.total if timer else 0.0
            sync(device)
            t0 = clock()
            logits = model(nxt[:, None], state=state).logits[:, -1]
            sync(device)
            total.append(clock() - t0)
            inner.append((timer.total if timer else 0.0) - before)
    finally:
        if timer:
            timer.remove()
    return statistics.median(total), statistics.median(inner)


def table_positions(models: dict, args: argparse.Namespace, device: torch.device, clock) -> list[dict]:
    rows = []
    for pos in positions(args):
        times = {}
        for _ in range(args.repeats):  # interleaved: both models see the same load
            for name in ("engram", "moe"):
                times.setdefault(name, []).append(step_times(models[name], pos, args, device, clock))
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
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures one CPU thread: use it with --device cpu")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    tok = text_tokenizer(args)
    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        models = build_models(args, device, tok, Path(tmp) / "engram-hf")
        print(
            f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} hidden={args.hidden} "
            f"layers={args.layers} vocab={tok.vocab_size} (BPE); random weights; greedy, prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, median of {args.repeats}, {args.clock} clock; "
            f"load average {os.getloadavg()[0]:.1f}\n"
        )
        rows = table_generate(models, args, device, clock)
    if "engram exported (transformers)" in models:
        print("the exported model's greedy tokens under transformers' generate() equal engram generate's")
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
    for r in rows:
        if r["model"] == "engram exported (transformers)":
            own = next(x for x in rows if x["model"] == "engram" and x["batch"] == r["batch"])
            print(
                f"batch {r['batch']}: engram generate is {own['tokens_per_s'] / r['tokens_per_s']:.2f}x transformers' "
                f"generate() on the same exported model"
            )
    print(
        f"\nper decode step at a position (batch {args.position_batch}, median of {args.window} steps x "
        f"{args.repeats} repeats; 'Engram modules' = time inside the Engram layers of the step, hooks synchronised)"
    )
    prow = table_positions(models, args, device, clock)
    print("| position | engram step ms | moe step ms | engram / moe | Engram modules ms | Engram modules vs first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in prow:
        print(
            f"| {r['position']} | {r['engram_ms']:.3f} | {r['moe_ms']:.3f} | {r['engram_ms'] / r['moe_ms']:.3f}x | "
            f"{r['engram_modules_ms']:.3f} | {r['engram_modules_ms'] / prow[0]['engram_modules_ms']:.2f}x |"
        )


if __name__ == "__main__":
    main()
