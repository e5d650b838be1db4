"""Experiment fixtures: tiny run configs (on the shared corpus) that train in well under a second."""

import pytest
import torch

from engram import EngramConfig
from engram.model import ModelConfig
from engram.train.optim import OptimConfig
from engram.train.trainer import RunConfig, TrainConfig


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and several threads thrash on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_run(corpus_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")

    def make(family="moe", steps=2, **model_kw):
        engram = None
        if family == "engram":
            engram = EngramConfig(engram_vocab_size=[31, 37], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1])
        model = ModelConfig(
            family=family,
            hidden_size=16,
            num_layers=2,
            num_heads=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            intermediate_size=32,
            max_seq_len=16,
            engram=engram,
            **model_kw,
        )
        train = TrainConfig(
            steps=steps,
            batch_size=2,
            seq_len=16,
            eval_every=steps,
            eval_batches=1,
            log_every=1,
            ckpt_every=steps,
            data=str(corpus_dir),
            max_bytes=None,
            vocab_size=300,
            cache_dir=str(cache),
            progress=False,
        )
        return RunConfig(model=model, train=train, optim=OptimConfig(warmup_steps=0))

    return make
