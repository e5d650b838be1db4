"""``engram`` command line: a thin shell over the library.

    engram demo                                   # Engram vs matched MoE on the Python stdlib, report folder
    engram train --config run.yaml --set train.steps=200 model.hidden_size=256
    torchrun --nproc_per_node 2 $(which engram) train --config run.yaml   # sharded tables, FSDP2 backbone
    engram eval --model runs/x/model [--data PATH]
    engram generate --model runs/x/model --prompt "def main(" [--temperature 0.8 --top-p 0.9]
    engram compare --config base.yaml --rho 0.75
    engram alloc --config configs/paper/moe-27b.yaml --rhos 1,0.9,0.8,0.7
    engram profile --config run.yaml --cache-mb 1,8,64   # Zipf profile of the hash ids, cache hit rates
    engram sweep allocation|memory|ablate --out runs/sweeps/NAME [--jobs 2 --seeds 0,1 --set train.steps=400]
    engram analyze logit-lens|cka|engram-off|curves --model POINT [--model POINT] --out fig.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from .yamlio import load_yaml


def _parse_value(text: str) -> Any:
    """A YAML scalar/list ("3", "1e-3", "true", "[1, 2]", "null") or the plain string."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


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
        d = load_yaml(p.read_text()) or {}
        if not isinstance(d, dict):
            raise SystemExit(f"{path} must hold a mapping with sections model / train / optim")
    return apply_overrides(d, overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with sections model, train, optim")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. train.steps=100 optim.lr=1e-3 model.engram.layer_ids=[1,2]")


def cmd_train(args: argparse.Namespace) -> None:
    from .distributed.train import is_main_process, launched_distributed
    from .train.trainer import RunConfig, train

    run = RunConfig.from_dict(load_run_dict(args.config, args.set))
    if launched_distributed():  # torchrun: tables row-sharded, backbone data-parallel (docs/distributed.md)
        from .distributed.train import train_distributed as train
    r = train(run)
    if not is_main_process():
        return
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

    demo(args.out, steps=args.steps, rho=args.rho, device=args.device)
    print((Path(args.out) / "report.md").read_text().split("![loss curves]")[0])
    print(f"Report folder: {Path(args.out).resolve()} (report.md, loss_curves.png, gate_heatmap.png, summary.json)")


def cmd_profile(args: argparse.Namespace) -> None:
    import dataclasses

    from .model.model import engram_hasher
    from .storage.profile import corpus_row_batches, plot_rank_frequency, profile_corpus, simulate_cache
    from .train.trainer import RunConfig, model_config_for, prepare_data

    if args.model:
        from .model.config import ModelConfig
        from .model.io import load_tokenizer_table
        from .train.data import build_token_files, default_cache_dir, load_corpus, load_tokenizer

        cfg, ctok, tok = ModelConfig.load(Path(args.model) / "config.json"), load_tokenizer_table(args.model), \
            load_tokenizer(args.model)
        corpus = load_corpus(args.data, max_bytes=args.max_bytes or 4_000_000)
        key = f"{corpus.fingerprint('train')[:12]}-{corpus.fingerprint('val')[:8]}-{tok.fingerprint[:12]}"
        tokens = build_token_files(corpus, tok, default_cache_dir() / "tokens" / key).train.tokens
    else:
        run = RunConfig.from_dict(load_run_dict(args.config, args.set))
        tcfg = dataclasses.replace(run.train, data=args.data or run.train.data,
                                   max_bytes=args.max_bytes or run.train.max_bytes)
        tok, files = prepare_data(tcfg)
        cfg, ctok = model_config_for(run.model, tok)
        tokens = files.train.tokens
    if cfg.family != "engram" or ctok is None:
        raise ValueError(f"profile needs an engram-family model (got family {cfg.family!r})")
    hasher = engram_hasher(cfg, ctok)
    cache_mb = [mb.strip() for mb in args.cache_mb.split(",")] if args.cache_mb else []
    cache_bytes = [int(float(mb) * 2**20) for mb in cache_mb]
    batching = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    profiles = profile_corpus(hasher, tokens, dim=cfg.engram.head_dim, min_count=args.min_count, **batching)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for layer, prof in profiles.items():
        print(f"## Engram layer {layer}: {prof.num_rows:,} rows x {cfg.engram.head_dim} (float32), "
              f"{min(len(tokens), args.max_tokens or len(tokens)):,} tokens\n")
        print(prof.summary(cache_bytes=cache_bytes))
        if cache_bytes:
            print("\n| cache | ideal hit rate | HotRowCache hit rate (replayed) |\n|---|---|---|")
            for mb, b in zip(cache_mb, cache_bytes):
                stats = simulate_cache(corpus_row_batches(hasher, tokens, layer, **batching), b,
                                       cfg.engram.head_dim)
                print(f"| {mb} MiB | {prof.ideal_hit_rate(b):.2%} | {stats.hit_rate:.2%} |")
        png = plot_rank_frequency(prof, out / f"rank_frequency_layer{layer}.png",
                                  title=f"Engram layer {layer}: rank-frequency of table rows")
        print(f"\nrank-frequency plot: {png}\n")


def _csv(text: str | None, cast=str) -> list | None:
    return None if not text else [cast(x) for x in text.split(",") if x.strip()]


def cmd_sweep(args: argparse.Namespace) -> None:
    from .experiments.sweeps import run

    s = run(args.kind, args.out, overrides=load_run_dict(args.config, args.set), seeds=_csv(args.seeds, int),
            jobs=args.jobs, threads=args.threads, figure=args.figure, rhos=_csv(args.rhos, float),
            rows=_csv(args.rows, int), variants=_csv(args.variants), dense_ffn_share=args.dense_ffn_share)
    print((Path(args.out) / "results.csv").read_text())
    print(f"figure: {s['figure']}; summary: {Path(args.out) / 'summary.json'}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from .experiments import analyze

    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        raise ValueError(f"give one --label per --model ({len(args.model)}), got {len(labels)}")
    if args.kind == "logit-lens":
        r = analyze.analyze_logit_lens(args.model, labels, args.out)
    elif args.kind == "curves":
        r = analyze.analyze_curves(args.model, labels, args.out)
    elif len(args.model) != (2 if args.kind == "cka" else 1):
        raise ValueError(f"analyze {args.kind} takes {2 if args.kind == 'cka' else 1} --model, got {len(args.model)}")
    elif args.kind == "cka":
        r = analyze.analyze_cka(args.model[0], args.model[1], (labels[0], labels[1]), args.out, k=args.k)
    else:
        r = analyze.analyze_engram_off(args.model[0], args.out, baseline=args.baseline)
    print(json.dumps(r, indent=2))
    print(f"figure: {args.out}; numbers: {Path(args.out).with_suffix('.json')}")


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

    s = sub.add_parser("profile", help="Zipf profile of a corpus's Engram hash ids and the hit rate per cache size")
    _add_common(s)
    s.add_argument("--model", help="a saved model folder (its config and tokenizer); default: --config")
    s.add_argument("--data", default=None, help="text file, folder or .jsonl (default: the run's data / stdlib)")
    s.add_argument("--max-bytes", type=int, default=None, help="corpus bytes to read (default: the run's, or 4 MB)")
    s.add_argument("--max-tokens", type=int, default=None)
    s.add_argument("--cache-mb", default="1,8,64", help="cache sizes in MiB per table, comma-separated")
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--min-count", type=int, default=5, help="rows seen fewer times are left out of the Zipf fit")
    s.add_argument("--out", default="reports/profile", help="folder for the rank-frequency PNGs")
    s.set_defaults(func=cmd_profile)

    s = sub.add_parser("sweep", help="train a sweep of points (resumable, --jobs in parallel): table + figure")
    s.add_argument("kind", choices=["allocation", "memory", "ablate"])
    s.add_argument("--config", help="YAML with sections model (backbone), engram, train, optim")
    s.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="e.g. train.steps=400 model.hc_mult=2")
    s.add_argument("--out", required=True, help="sweep folder (rerun the same command to resume)")
    s.add_argument("--jobs", type=int, default=1, help="points trained at once, in separate processes")
    s.add_argument("--threads", type=int, default=None, help="torch threads per point (default: cores / jobs)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds; every point is run once per seed")
    s.add_argument("--figure", default=None, help="PNG path (default OUT/KIND.png)")
    s.add_argument("--rhos", default=None, help="allocation: comma-separated rho values (default 1.0..0.4)")
    s.add_argument("--rows", default=None, help="memory: comma-separated table rows per head")
    s.add_argument("--variants", default=None, help="ablate: comma-separated subset of the variants")
    s.add_argument("--dense-ffn-share", type=float, default=0.5,
                   help="ablate: share of the dense FFN width traded for Engram in dense+engram-iso")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("analyze", help="LogitLens, CKA, Engram-off or learning-curve analysis of trained models")
    s.add_argument("kind", choices=["logit-lens", "cka", "engram-off", "curves"])
    s.add_argument("--model", action="append", required=True,
                   help="a model, run or sweep-point folder (repeat: logit-lens / curves any, cka 2 (rows, "
                        "columns), engram-off 1)")
    s.add_argument("--label", action="append", help="a name per --model for the figure")
    s.add_argument("--out", required=True, help="PNG path; the numbers go beside it as .json")
    s.add_argument("--k", type=int, default=5, help="cka: top-k of the soft alignment index")
    s.add_argument("--baseline", help="engram-off: a model trained without Engram, scored on the same tokens")
    s.set_defaults(func=cmd_analyze)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f"engram {args.command}: error: {e}") from e


if __name__ == "__main__":
    main()
