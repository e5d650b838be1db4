"""Tiny engram models with a real byte-level BPE tokenizer, for the transformers / lm-eval / datasets tests."""

import pytest
import torch

from engram import CompressedTokenizer, EngramConfig
from engram.model import EngramLM, ModelConfig
from engram.train.data import _wrap_fast, train_bpe

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)] + [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France.",
    "Water boils at one hundred degrees.",
    "A cat is an animal. A dog is an animal too.",
]


@pytest.fixture(scope="session")
def text_tokenizer():
    return _wrap_fast(train_bpe(TEXTS, 400), "bpe:test")


def tiny_model(
    tok, attention="mha", hc_mult=1, family="engram", tie=False, seed=0, n_embed_per_ngram=32, max_seq_len=128
) -> EngramLM:
    engram = None
    if family == "engram":
        engram = EngramConfig(
            engram_vocab_size=[97, 101],
            n_embed_per_ngram=n_embed_per_ngram,
            n_head_per_ngram=2,
            layer_ids=[0, 2],
            pad_id=tok.pad_id,
        )
    cfg = ModelConfig(
        family=family,
        vocab_size=tok.vocab_size,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        attention=attention,
        hc_mult=hc_mult,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=128,
        max_seq_len=max_seq_len,
        engram=engram,
        tie_embeddings=tie,
        init_std=0.3,
    )  # a wide init: greedy tokens vary with the context
    torch.manual_seed(seed)
    model = EngramLM(cfg, CompressedTokenizer(tok.hf) if family == "engram" else None)
    for eng in model.engram_layers.values():  # the paper's zero-initialised conv would hide the ShortConv path
        torch.nn.init.normal_(eng.short_conv.conv.weight, std=0.2)
    return model.eval()
