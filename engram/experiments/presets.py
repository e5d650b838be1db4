"""The CPU scale the sweeps default to, and the spec dict every sweep is configured from.

A *spec* is a run config (:class:`~engram.train.trainer.RunConfig`'s schema: ``model``, ``train``, ``optim``) whose
``model`` section is the MoE backbone and whose ``model.engram`` is the Engram shape the sweep derives its Engram
points from -- what a sweep's YAML file holds and what ``--set model.engram.layer_ids=[1]`` overrides. The
defaults are sized for 2 shared CPU cores: width 64, 4 blocks, 400 steps of 16 x 128 tokens (0.8M tokens) on 2 MB
of the Python standard library, one to three minutes per point with one torch thread.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from ..config import EngramConfig
from ..errors import ConfigError
from ..model.config import ModelConfig
from ..train.optim import OptimConfig
from ..train.trainer import RunConfig, TrainConfig


def cpu_train(steps: int = 400) -> TrainConfig:
    """400 steps x 16 x 128 tokens; evaluation on the whole validation split (about 40k tokens) at the end."""
    return TrainConfig(
        out_dir="runs/point",
        steps=steps,
        batch_size=16,
        seq_len=128,
        eval_every=steps,
        eval_batches=40,
        log_every=20,
        ckpt_every=max(steps // 2, 1),
        keep_last=1,
        max_bytes=2_000_000,
        val_fraction=0.1,
        vocab_size=2048,
        progress=False,
    )


def cpu_optim() -> OptimConfig:
    """The demo's small-model recipe: lr 2e-3 (Muon + AdamW), tables Adam at 5x, 40 warmup steps, step decay."""
    return OptimConfig(lr=2e-3, warmup_steps=40)


def moe_backbone(hc_mult: int = 1, n_routed_experts: int = 24) -> ModelConfig:
    """Width 64, 4 blocks (1 dense + 3 MoE), 1 shared + ``n_routed_experts`` routed experts of width 64, top-2.

    With 24 routed experts P_tot / P_act is about 4.7 (the paper holds it near 10), and 22 movable experts per
    layer give the allocation sweep a distinct expert count at every rho step of 0.1.
    """
    return ModelConfig(
        family="moe",
        vocab_size=2048,
        hidden_size=64,
        num_layers=4,
        num_heads=4,
        max_seq_len=128,
        intermediate_size=192,
        moe_intermediate_size=64,
        n_shared_experts=1,
        n_routed_experts=n_routed_experts,
        num_experts_per_tok=2,
        first_k_dense=1,
        hc_mult=hc_mult,
    )


def engram_template(rows: int = 1000, layer_ids: tuple[int, ...] = (1, 2)) -> EngramConfig:
    """2/3-grams, 4 heads x 8 dims per order (d_mem 64 = the width), ``rows`` per head, at blocks 1 and 2.

    Blocks 1 and 2 of 4 are the small-model analogue of the paper's 1-based layers 2 and 6 of 12.
    """
    return EngramConfig(
        engram_vocab_size=[rows, rows],
        max_ngram_size=3,
        n_embed_per_ngram=32,
        n_head_per_ngram=4,
        layer_ids=list(layer_ids),
        pad_id=1,
    )


def spec(
    model: ModelConfig, engram: EngramConfig, train: TrainConfig | None = None, optim: OptimConfig | None = None
) -> dict[str, Any]:
    return {
        "model": {**model.to_dict(), "engram": engram.to_dict()},
        "train": dataclasses.asdict(train or cpu_train()),
        "optim": (optim or cpu_optim()).to_dict(),
    }


def merge(base: dict, override: dict) -> dict:
    """``base`` updated section by section (nested dicts merged, other values replaced) with ``override``."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_spec(d: dict) -> tuple[ModelConfig, EngramConfig | None, TrainConfig, OptimConfig]:
    """The backbone, the Engram shape (``model.engram``, None when absent), train and optim configs of a spec.

    The backbone is the ``model`` section without ``engram``; it is the MoE an Engram model is derived from, so
    its family is not ``engram``.
    """
    model = dict(d.get("model") or {})
    engram = model.pop("engram", None)
    if model.get("family") == "engram":
        raise ConfigError(
            "model.family is 'engram', but this command derives the Engram model from a MoE backbone: "
            "set model.family=moe and give the Engram shape as model.engram"
        )
    run = RunConfig.from_dict({**d, "model": model})
    return run.model, None if engram is None else EngramConfig.from_dict(engram), run.train, run.optim
