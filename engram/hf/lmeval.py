"""lm-eval-harness on engram models, offline: ``engram eval --model DIR --tasks engram_text,engram_choice``.

Two entry points:

* :func:`evaluate_hf` runs lm-eval on any ready ``transformers`` causal LM and tokenizer (an exported engram
  model, a base model with an adapter, ...) through lm-eval's ``HFLM(pretrained=model, tokenizer=tok)``.
* :func:`evaluate_folder` loads a folder first: an exported one (``config.json`` with ``model_type: engram``)
  through ``AutoModelForCausalLM(trust_remote_code=True)``, or an engram model folder (``save_model`` + its
  ``tokenizer.json``) wrapped in memory by :class:`~engram.hf.modeling_engram.EngramForCausalLM`, no export needed.

Tasks: the names of the tasks shipped in ``engram/hf/tasks`` (YAML + JSONL, written for this repo; their data
paths are resolved here, so they run from any working directory without a download), ``include_path`` folders
of your own YAML tasks, or any lm-eval task whose dataset is already in the local Hugging Face cache (set
``HF_DATASETS_OFFLINE=1`` to be sure nothing is fetched).

Reported per task: bits per byte (``bits_per_byte``, plus word / byte perplexity) for ``loglikelihood_rolling``
tasks, accuracy (``acc``, ``acc_norm``) for multiple-choice ones, as lm-eval computes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).with_name("tasks")


def shipped_tasks() -> dict[str, Path]:
    """``{task name: YAML path}`` of the tasks in ``engram/hf/tasks``."""
    return {yaml.safe_load(p.read_text())["task"]: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


def _shipped_config(path: Path) -> dict[str, Any]:
    """A shipped task's YAML as an lm-eval task config, with its data files made absolute."""
    config = yaml.safe_load(path.read_text())
    files = config.get("dataset_kwargs", {}).get("data_files", {})
    for split, name in files.items():
        files[split] = str(path.parent / name)
    return config


def _task_specs(tasks: list[str]) -> list[str | dict[str, Any]]:
    shipped = shipped_tasks()
    return [_shipped_config(shipped[t]) if t in shipped else t for t in tasks]


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results (filter suffixes and stderr entries dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results["results"].items():
        out[task] = {
            key.split(",")[0]: float(value)
            for key, value in metrics.items()
            if "," in key and "_stderr" not in key and isinstance(value, (int, float))
        }
    return out


def evaluate_hf(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int | None = None,
    include_path: list[str | os.PathLike] | None = None,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval ``tasks`` on a ready ``transformers`` causal LM and its tokenizer; ``{task: {metric: value}}``.

    ``limit`` caps the documents per task; ``max_length`` is the context lm-eval packs rolling windows into
    (default: the model config's ``max_position_embeddings``).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError(f"no tasks given; shipped tasks: {sorted(shipped_tasks())}, or any lm-eval task name")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    # lm-eval's own task index (thousands of YAML files) is only read when a task is not one of ours
    shipped = shipped_tasks()
    manager = TaskManager(
        include_path=[str(p) for p in include_path] if include_path else None,
        include_defaults=any(t not in shipped for t in tasks),
    )
    results = simple_evaluate(
        model=lm,
        tasks=_task_specs(list(tasks)),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    return summarize(results)


def is_exported(model_dir: str | os.PathLike) -> bool:
    """Whether ``model_dir`` is a transformers folder written by ``engram export`` (``config.json`` with
    ``model_type: engram``) rather than an engram model folder."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == "engram"
    except (OSError, ValueError):
        return False


def load_for_eval(model_dir: str | os.PathLike, device: str | None = None) -> tuple[Any, Any]:
    """(transformers model, tokenizer) of an exported folder or of an engram model folder (see module docstring)."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{d} has no config.json: pass an engram model folder or an exported one")
    if is_exported(d):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(d), trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(str(d), trust_remote_code=True)
    else:
        from transformers import PreTrainedTokenizerFast

        from ..model.io import load_model
        from ..train.data import load_tokenizer
        from .export import hf_config
        from .modeling_engram import EngramForCausalLM

        tok = load_tokenizer(d)
        engram_model = load_model(d)  # tables saved as their own files open in their tier
        model = EngramForCausalLM(hf_config(engram_model, tok), model=engram_model)
        if hasattr(tok.hf, "token_to_id"):
            tokenizer = PreTrainedTokenizerFast(
                tokenizer_object=tok.hf,
                eos_token=tok.hf.id_to_token(tok.eos_id),
                pad_token=tok.hf.id_to_token(tok.pad_id),
                padding_side="left",
            )
        else:
            tokenizer = tok.hf
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def evaluate_folder(
    model_dir: str | os.PathLike, tasks: list[str], *, device: str | None = None, **kwargs: Any
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_hf` on the model in ``model_dir`` (exported or an engram model folder)."""
    model, tokenizer = load_for_eval(model_dir, device)
    return evaluate_hf(model, tokenizer, tasks, **kwargs)
