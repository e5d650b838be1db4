"""Engram adapters on tiny random-weight HF models of every supported family (engram.hf.adapter)."""

from __future__ import annotations

import copy

import pytest
import torch

from engram import EngramConfig
from engram.hf import add_engram, get_adapter, load_adapter, remove_engram, save_adapter

from .adapter_models import FAMILIES, VOCAB, tiny_model, word_tokenizer

pytestmark = pytest.mark.hf


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


def small_config(**changes) -> EngramConfig:
    base = {
        "engram_vocab_size": [211, 223],
        "max_ngram_size": 3,
        "n_embed_per_ngram": 16,
        "n_head_per_ngram": 2,
        "layer_ids": [0, 2],
        "pad_id": 0,
    }
    return EngramConfig(**{**base, **changes})


def randomize(model) -> None:
    """Give the zero-initialised value projection and ShortConv weights values, so Y is no longer zero."""
    gen = torch.Generator().manual_seed(1)
    for engram in get_adapter(model).engrams.values():
        with torch.no_grad():
            engram.value_proj.weight.copy_(torch.randn(engram.value_proj.weight.shape, generator=gen) * 0.5)
            engram.short_conv.conv.weight.copy_(torch.randn(engram.short_conv.conv.weight.shape, generator=gen))


def ids(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_equal_the_base_model_exactly_at_init(family):
    model = tiny_model(family)
    x = ids()
    base = model(x).logits
    add_engram(model, word_tokenizer(), small_config())
    assert torch.equal(model(x).logits, base)


def test_a_trained_adapter_changes_the_logits_and_removing_it_restores_them(family):
    model = tiny_model(family)
    x = ids()
    base = model(x).logits
    add_engram(model, word_tokenizer(), small_config())
    randomize(model)
    assert (model(x).logits - base).abs().max() > 1e-3
    remove_engram(model)
    assert torch.equal(model(x).logits, base)


def test_cached_generation_equals_a_full_recompute(family):
    """Greedy generate with the KV cache (Engram history + ShortConv state carried on the cache) gives the same
    tokens as generate without a cache, which recomputes every position from the whole sequence."""
    model = tiny_model(family)
    add_engram(model, word_tokenizer(), small_config(max_ngram_size=4, engram_vocab_size=[211, 223, 227]))
    randomize(model)
    prompt = ids(2, 5, seed=3)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(prompt)}
    cached = model.generate(prompt, use_cache=True, **kw)
    full = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("short_conv", [True, False])
def test_incremental_logits_match_the_full_sequence(family, short_conv):
    model = tiny_model(family)
    add_engram(model, word_tokenizer(), small_config(short_conv=short_conv))
    if short_conv:
        randomize(model)
    else:
        for engram in get_adapter(model).engrams.values():
            torch.nn.init.normal_(engram.value_proj.weight)
    x = ids(2, 10, seed=4)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :4], use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        steps = [out.logits]
        for t in range(4, 10):
            steps.append(model(x[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_decode_steps_keep_the_engram_ring_on_the_cache():
    """Single-token steps without gradients reuse each Engram layer's ShortConv ring across steps (the layer's
    decoding dict lives on the cache, handed to each forward as a copy) and give the full sequence's logits."""
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    randomize(model)
    x = ids(2, 8, seed=5)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :4], use_cache=True)
        cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        steps = [model(x[:, 4:5], cache=cache, use_cache=True).logits]
        ring = cache.engram_state.conv[0]["conv_ring"]
        steps += [model(x[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(5, 8)]
        assert cache.engram_state.conv[0]["conv_ring"] is ring
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 4:], atol=1e-5, rtol=1e-5)


def test_the_n_gram_history_matters_for_decoding():
    """Control for the test above: a cache whose Engram state is dropped (what an adapter that only sees the
    current ids does) is refused rather than silently decoding without the history."""
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    x = ids(1, 6)
    out = model(x, use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.engram_state = None
    with pytest.raises(RuntimeError, match="did not see"):
        model(x[:, :1], cache=cache, use_cache=True)


def test_a_cropped_cache_is_refused():
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    out = model(ids(1, 8), use_cache=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    cache.crop(-3)
    with pytest.raises(RuntimeError, match="cropped"):
        model(ids(1, 1), cache=cache, use_cache=True)


def test_beam_search_with_cache_equals_beam_search_without():
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    randomize(model)
    prompt = ids(1, 4, seed=5)
    kw = {
        "max_new_tokens": 8,
        "do_sample": False,
        "num_beams": 3,
        "pad_token_id": 0,
        "attention_mask": torch.ones_like(prompt),
    }
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_left_padding_gives_the_unpadded_engram_output():
    """Padding positions hash like the sequence start and contribute no Y, so Engram's part of a left-padded row
    equals the unpadded row's (checked on the adapter's Y at the first layer, before attention mixes padding)."""
    model = tiny_model("llama")
    adapter = add_engram(model, word_tokenizer(), small_config(layer_ids=[0]))
    randomize(model)
    seen = []
    engram = adapter.engrams["0"]
    handle = engram.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    x = ids(1, 6, seed=6)
    model(x, attention_mask=torch.ones_like(x))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    model(padded, attention_mask=torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], 1))
    handle.remove()
    torch.testing.assert_close(seen[1][:, 3:], seen[0], atol=1e-6, rtol=1e-6)
    assert torch.equal(seen[1][:, :3], torch.zeros_like(seen[1][:, :3]))


def test_training_changes_only_adapter_parameters(family):
    model = tiny_model(family)
    adapter = add_engram(model, word_tokenizer(), small_config())
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("engram_adapter.")}
    adapter_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = ids(2, 12, seed=7)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        if not k.startswith("engram_adapter."):
            assert torch.equal(v, base_before[k]), k
    changed = [k for k, v in adapter.state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert any("value_proj" in k for k in changed) and any("table" in k for k in changed)


def test_save_load_round_trip(tmp_path, family):
    model = tiny_model(family)
    add_engram(model, word_tokenizer(), small_config())
    randomize(model)
    x = ids()
    expected = model(x).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model(family)
    load_adapter(fresh, tmp_path / "adapter", word_tokenizer())
    assert torch.equal(fresh(x).logits, expected)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if not n.startswith("engram_adapter."))


def test_load_refuses_a_different_base_model(tmp_path):
    model = tiny_model("llama", seed=0)
    add_engram(model, word_tokenizer(), small_config())
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="wrong base model.*weights differ"):
        load_adapter(tiny_model("llama", seed=1), tmp_path)
    with pytest.raises(ValueError, match="wrong base model.*'llama'.*'qwen2'"):
        load_adapter(tiny_model("qwen2", seed=0), tmp_path)


def test_load_refuses_a_different_tokenizer(tmp_path):
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="wrong tokenizer"):
        load_adapter(tiny_model("llama"), tmp_path, word_tokenizer(prefix="v"))


def test_the_base_fingerprint_ignores_the_load_dtype():
    from engram.hf.adapter import base_fingerprint

    model = tiny_model("llama")
    half = copy.deepcopy(model).to(torch.bfloat16)
    rounded = copy.deepcopy(half).to(torch.float32)
    assert base_fingerprint(half) == base_fingerprint(rounded)
    assert base_fingerprint(model) != base_fingerprint(tiny_model("llama", seed=1))


def test_unsupported_families_get_a_clear_error():
    import transformers

    cfg = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32
    )
    model = transformers.OPTForCausalLM(cfg)
    with pytest.raises(ValueError, match="support the model families.*'opt'"):
        add_engram(model, word_tokenizer(), small_config())


def test_layers_outside_the_model_are_refused():
    with pytest.raises(ValueError, match="outside a 3-block model"):
        add_engram(tiny_model("llama"), word_tokenizer(), small_config(), layers=[1, 3])


def test_a_second_adapter_is_refused():
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    with pytest.raises(ValueError, match="already has an Engram adapter"):
        add_engram(model, word_tokenizer(), small_config())


def test_inputs_embeds_without_ids_are_refused():
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 32))
