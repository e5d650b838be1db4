"""Tiny random-weight HF causal LMs of every supported family, and a word-level tokenizer that fits them."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


def word_tokenizer(vocab: int = VOCAB, prefix: str = "w"):
    """A ``tokenizers.Tokenizer`` with ids 0..vocab-1 (``w0`` .. ``w95``); distinct prefixes give distinct
    vocabularies (and fingerprints) of the same size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"{prefix}{i}": i for i in range(vocab)}, unk_token=f"{prefix}0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def tiny_config(family: str):
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
    }
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=8)
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=3,
            n_head=4,
            n_positions=128,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
        )
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gpt2"]


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
