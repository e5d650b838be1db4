"""``engram`` command line: a thin shell over the library.

    engram demo                                   # Engram vs matched MoE on the Python stdlib, report folder
    engram train --config run.yaml --set train.steps=200 model.hidden_size=256
    engram eval --model runs/x/model [--data PATH]
    engram generate --model runs/x/model --prompt "def main(" [--temperature 0.8 --top-p 0.9]
    engram compare --config base.yaml --rho 0.75
    engram alloc --config configs/paper/moe-27b.yaml --rhos 1,0.9,0.8,0.7
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _parse_value(text: str) -> Any:
    """A YAML scalar/list ("3", "1e-3", "true", "[1, 2]", "null") or the plain string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # PyYAML reads "2e-3" as a string (YAML 1.1); numbers are meant here
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (dotted paths, YAML values) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
        path, value = item.split("=", 1)
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SystemExit(f"--set {item!r}: {k!r} is not a section")
        node[keys[-1]] = _parse_value(value)
    return d


def load_run_dict(path: str | None, overrides: list[str]) -> dict:
    d: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"config file {path!r} not found")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise SystemExit(f"{path} must hold a mapping with sections model / train / optim")
    return apply_overrides(d, overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with sections model, train, optim")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. train.steps=100 optim.lr=1e-3 model.engram.layer_ids=[1,2]")


def cmd_train(args: argparse.Namespace) -> None:
    from .train.trainer import RunConfig, train

    run = RunConfig.from_dict(load_run_dict(args.config, args.set))
    r = train(run)
    state = "interrupted (checkpoint saved; rerun to resume)" if r.interrupted else "done"
    print(f"{state}: step {r.steps_done}, val loss {r.final.get('val_loss', float('nan')):.4f}, "
          f"{r.tokens_per_s:,.0f} tokens/s; run folder {r.out_dir}")


def _load_model_and_tokenizer(model_dir: str):
    from .model.io import load_model
    from .train.data import load_tokenizer
    from .train.trainer import pick_device

    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, map_location=pick_device("auto"))
    if model.cfg.vocab_size != tok.vocab_size:
        raise SystemExit(f"{model_dir}: tokenizer has {tok.vocab_size} ids, the model {model.cfg.vocab_size}")
    return model, tok


def cmd_eval(args: argparse.Namespace) -> None:
    from .train.data import build_token_files, default_cache_dir, load_corpus
    from .train.evaluate import evaluate

    model, tok = _load_model_and_tokenizer(args.model)
    corpus = load_corpus(args.data, max_bytes=args.max_bytes)
    files = build_token_files(corpus, tok, default_cache_dir() / "tokens" /
                              f"eval-{corpus.fingerprint('val')[:12]}-{tok.fingerprint[:12]}")
    r = evaluate(model, files.val, batch_size=args.batch_size, seq_len=min(args.seq_len, model.cfg.max_seq_len),
                 max_batches=args.max_batches)
    print(json.dumps(r, indent=2))


def cmd_generate(args: argparse.Namespace) -> None:
    from .model.generate import SamplingConfig, generate

    model, tok = _load_model_and_tokenizer(args.model)
    prompts = args.prompt or [sys.stdin.read()]
    cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, eos_id=tok.eos_id, seed=args.seed)
    for p, out in zip(prompts, generate(model, tok.encode(prompts), cfg, pad_id=tok.pad_id)):
        print(p + tok.decode(out))
        print("-" * 40)


def cmd_compare(args: argparse.Namespace) -> None:
    from .config import EngramConfig
    from .model.config import ModelConfig
    from .train.compare import compare
    from .train.optim import OptimConfig
    from .train.trainer import TrainConfig

    d = load_run_dict(args.config, args.set)
    base = ModelConfig.from_dict(d.get("model", {}))
    engram = EngramConfig.from_dict(d["engram"]) if "engram" in d else None
    s = compare(base, args.rho, TrainConfig(**d.get("train", {})), OptimConfig.from_dict(d.get("optim", {})),
                engram, args.out)
    print(f"report: {Path(args.out) / 'report.md'} (val loss engram - moe = {s['delta_val_loss']:+.4f})")


def cmd_alloc(args: argparse.Namespace) -> None:
    from .config import EngramConfig
    from .model.config import ModelConfig
    from .model.params import allocation_table, format_table

    d = load_run_dict(args.config, args.set)
    base = ModelConfig.from_dict(d.get("model", d))
    engram = EngramConfig.from_dict(d["engram"]) if "engram" in d else None
    rhos = [float(r) for r in args.rhos.split(",")]
    print(format_table(allocation_table(base, rhos, engram)))


def cmd_demo(args: argparse.Namespace) -> None:
    from .train.compare import demo

    s = demo(args.out, steps=args.steps, rho=args.rho, device=args.device)
    print((Path(args.out) / "report.md").read_text().split("![loss curves]")[0])
    print(f"Report folder: {Path(args.out).resolve()} (report.md, loss_curves.png, gate_heatmap.png, summary.json)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram", description="Conditional memory (Engram) for language models")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="train a matched MoE and an Engram model on the stdlib corpus; write a report")
    s.add_argument("--out", default="reports/demo")
    s.add_argument("--steps", type=int, default=600)
    s.add_argument("--rho", type=float, default=0.75, help="share of the sparse budget kept in routed experts")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("train", help="train one model (resumes from its out_dir)")
    _add_common(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("eval", help="validation loss / perplexity / bits per byte of a saved model")
    s.add_argument("--model", required=True, help="a model folder (runs/NAME/model)")
    s.add_argument("--data", default=None, help="text file, folder or .jsonl (default: stdlib corpus)")
    s.add_argument("--max-bytes", type=int, default=4_000_000)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--max-batches", type=int, default=50)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="sample continuations from a saved model")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", action="append", help="repeat for a batch; default: read stdin")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("compare", help="Engram vs its matched MoE from a base MoE config")
    _add_common(s)
    s.add_argument("--rho", type=float, default=0.75)
    s.add_argument("--out", default="reports/compare")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("alloc", help="the sparsity-allocation table for a base MoE config")
    _add_common(s)
    s.add_argument("--rhos", default="1.0,0.9,0.8,0.7,0.6,0.5,0.4")
    s.set_defaults(func=cmd_alloc)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f"engram {args.command}: error: {e}") from e


if __name__ == "__main__":
    main()
