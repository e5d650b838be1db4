"""Context extension: continue a trained model at a longer ``max_seq_len`` with YaRN on (paper section 4.4).

An extension is an ordinary run (:func:`engram.train.trainer.train`: same checkpoints, resume and metrics) whose
config differs from the pre-training run's in three places:

- ``model.max_seq_len`` is the new context and ``model.rope_scaling`` switches YaRN on
  (:class:`~engram.model.config.RopeScaling`, ``original_max_seq_len`` = the old context);
- ``train.seq_len`` is the longer training window;
- ``train.init_from`` names the weights to start from: the pre-training run's final ``model/`` folder, its run
  folder, or one of its checkpoint step folders. They are read once, at step 0; a resumed extension continues
  from its own checkpoints. Optimizer state and schedule start fresh, as a new stage does.

:func:`extension_run` writes that config from the pre-training one.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

from ..errors import ConfigError
from ..model.config import ModelConfig, RopeScaling
from ..model.io import load_model
from ..model.model import EngramLM
from ..model.tables import TABLES_MANIFEST
from .checkpoint import CheckpointManager
from .data import load_tokenizer
from .optim import OptimConfig

# What an extension may change in the model config; everything else must match the weights it starts from.
EXTENSION_FIELDS = ("max_seq_len", "rope_scaling")


def extension_run(
    pretrain,
    *,
    seq_len: int,
    steps: int,
    out_dir: str,
    factor: float | None = None,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float = 0.707,
    optim: OptimConfig | None = None,
    init_from: str | None = None,
):
    """The :class:`~engram.train.trainer.RunConfig` that extends ``pretrain`` (a RunConfig) to ``seq_len`` tokens.

    ``factor`` is YaRN's s (default ``seq_len / pretrain.model.max_seq_len``); ``beta_fast``, ``beta_slow``,
    ``mscale`` default to the Engram paper's beta = 32, alpha = 1, f = 0.707 (``mscale = mscale_all_dim``, see
    docs/long_context.md). ``init_from`` defaults to the pre-training run's final model folder. The data,
    tokenizer, seed and batch size stay the pre-training run's; ``optim`` defaults to its recipe.
    """
    old = pretrain.model
    if old.rope_scaling is not None:
        raise ConfigError(
            f"the pre-training run already uses rope_scaling {old.rope_scaling}; extend from a model trained "
            f"with plain RoPE"
        )
    if seq_len <= old.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} must exceed the pre-training context {old.max_seq_len} to extend it")
    scaling = RopeScaling(
        factor=float(factor if factor is not None else seq_len / old.max_seq_len),
        original_max_seq_len=old.max_seq_len,
        beta_fast=beta_fast,
        beta_slow=beta_slow,
        mscale=mscale,
        mscale_all_dim=mscale,
    )
    run = copy.deepcopy(pretrain)
    run.model = old.replace(max_seq_len=seq_len, rope_scaling=dataclasses.asdict(scaling))
    run.train = dataclasses.replace(
        run.train,
        out_dir=out_dir,
        steps=steps,
        seq_len=seq_len,
        init_from=init_from or str(Path(pretrain.train.out_dir) / "model"),
        eval_every=min(run.train.eval_every, steps),
        ckpt_every=min(run.train.ckpt_every, steps),
    )
    if optim is not None:
        run.optim = optim
    return run


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(k for k in set(saved) | set(current) if k not in EXTENSION_FIELDS)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def load_initial_weights(model: EngramLM, source: str | Path, tokenizer_fingerprint: str) -> str:
    """Copy the weights of ``source`` into ``model`` (built for this run) and return what was read.

    ``source`` is a model folder (``config.json`` + ``model.safetensors``), a run folder (its ``model/``) or a
    checkpoint step folder (``checkpoints/step_N``). Refused, with the fields named: a model config that differs
    in anything but :data:`EXTENSION_FIELDS`, another text tokenizer, a model folder with offloaded tables.
    """

    path = Path(source)
    if path.is_dir() and not (path / "model.safetensors").is_file() and (path / "model").is_dir():
        path = path / "model"
    if (path / "model.safetensors").is_file() and (path / "config.json").is_file():
        if (path / TABLES_MANIFEST).is_file():
            raise ConfigError(
                f"train.init_from: {path} keeps its Engram tables in their own files (a host / disk run); "
                f"extend from one of its checkpoint step folders instead"
            )
        old = load_model(path, tokenizer=model.tokenizer)
        saved_cfg, state = old.cfg.to_dict(), old.state_dict()
        has_tokenizer = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
        saved_fp = load_tokenizer(path).fingerprint if has_tokenizer else None
        label = f"model folder {path}"
    elif (path / "meta.json").is_file():
        loaded = CheckpointManager(path.parent).load(path)
        saved_cfg, state = (loaded.get("config") or {}).get("model") or {}, loaded["model"]
        saved_fp = ((loaded.get("extra") or {}).get("fingerprints") or {}).get("tokenizer")
        label = f"checkpoint {path} (step {loaded['step']})"
    else:
        raise ConfigError(
            f"train.init_from={str(source)!r} is neither a model folder (config.json + model.safetensors), a run "
            f"folder with model/, nor a checkpoint step folder (meta.json); point it at the pre-training run's "
            f"model/ folder"
        )
    diff = _differences(ModelConfig.from_dict(saved_cfg).to_dict(), model.cfg.to_dict())
    if diff:
        raise ConfigError(
            f"train.init_from: {label} holds a different model than this run asks for ({'; '.join(diff)}); an "
            f"extension may change only {', '.join(EXTENSION_FIELDS)}"
        )
    if saved_fp is not None and saved_fp != tokenizer_fingerprint:
        raise ConfigError(
            f"train.init_from: {label} was trained with another text tokenizer (fingerprint {saved_fp[:12]} vs "
            f"{tokenizer_fingerprint[:12]}); extend with the pre-training run's train.data / train.tokenizer"
        )
    model.load_state_dict(state)
    return label
