"""Fixtures every test area shares: a tiny code corpus, a tiny Engram run that trains in seconds on a CPU, and a
counter of device-to-host reads."""

import contextlib

import pytest
import torch

import engram
from engram import EngramConfig
from engram.model import ModelConfig
from engram.train.trainer import RunConfig, TrainConfig

CODE = """def add(a, b):
    return a + b


class Point(object):
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __repr__(self):
        return "Point(%r, %r)" % (self.x, self.y)
"""


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """40 small Python modules (distinct names, shared idioms): enough text for a 300-token BPE."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        (d / f"mod_{i:02d}.py").write_text(CODE.replace("Point", f"Point{i}").replace("add", f"add_{i}") * 3)
    return d


def tiny_engram_run(out, corpus_dir, cache, **train_kw) -> RunConfig:
    """A 2-block Engram MoE (width 32) on ``corpus_dir``: 12 steps of 4 x 32 tokens, checkpoints every 4."""
    model = ModelConfig(
        family="engram",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=64,
        max_seq_len=32,
        engram=EngramConfig(engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1]),
    )
    kw = dict(
        out_dir=str(out),
        steps=12,
        batch_size=4,
        seq_len=32,
        eval_every=6,
        eval_batches=2,
        log_every=2,
        ckpt_every=4,
        data=str(corpus_dir),
        max_bytes=None,
        vocab_size=300,
        cache_dir=str(cache),
        progress=False,
    )
    kw.update(train_kw)
    return RunConfig(model=model, train=TrainConfig(**kw))


@pytest.fixture
def tiny_run(corpus_dir, tmp_path):
    """``tiny_run(out, **train_kw)``: :func:`tiny_engram_run` with the shared corpus and a per-test token cache."""
    return lambda out, **train_kw: tiny_engram_run(out, corpus_dir, tmp_path / "cache", **train_kw)


# Every Python-level way a tensor value reaches the host; on a GPU each one is a stream synchronisation, and on
# the CPU the same calls happen, so CPU tests can count them.
HOST_READS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__int__",
    "__index__",
    "__float__",
    "__complex__",
    "__array__",
    "__iter__",
)


@contextlib.contextmanager
def count_host_reads():
    """Yield a list that collects the name of every host read (:data:`HOST_READS`) made meanwhile."""
    seen: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _name=name, _original=original, **kwargs):
                seen.append(_name)
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        yield seen


@pytest.fixture
def no_validation():
    """Value checks off for one test (``engram.set_validation(False)``), back on afterwards."""
    engram.set_validation(False)
    yield
    engram.set_validation(True)


def tiny_model_config(**overrides) -> ModelConfig:
    """A width-32, 2-block Engram MoE (vocab 96, 4 routed experts, one Engram module at block 1) for unit tests of
    the model; ``overrides`` replace any ModelConfig field (``family="moe"``, ``attention="mla"``, ...)."""
    args = dict(
        family="engram",
        vocab_size=96,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        n_shared_experts=1,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense=1,
        engram=EngramConfig(
            engram_vocab_size=[61, 67],
            max_ngram_size=3,
            n_embed_per_ngram=16,
            n_head_per_ngram=2,
            layer_ids=[1],
            pad_id=0,
        ),
    )
    args.update(overrides)
    return ModelConfig(**args)


@pytest.fixture(params=["torch", "kernel"])
def decode_path(request):
    """Run a test once through each decode-step path: the torch ops and the fused CPU kernels
    (``engram.decode_kernels``, needs numba: the ``cpu-kernels`` extra, part of ``dev``)."""
    from engram import decode_kernels

    if request.param == "kernel":
        pytest.importorskip("numba")
    before = decode_kernels._enabled
    decode_kernels.set_cpu_kernels(request.param == "kernel")
    yield request.param
    decode_kernels.set_cpu_kernels(before)
