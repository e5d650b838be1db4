"""Export to transformers: the exported folder loads with AutoModelForCausalLM / AutoTokenizer and gives the engram
model's logits and greedy tokens (left-padded batch, cached generate); offloaded tables stay in their own files."""

import json

import pytest
import torch
from safetensors import safe_open

from engram.model import SamplingConfig, generate
from engram.storage import offload_tables

from .conftest import tiny_model

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")

PROMPTS = ["def f3(x):", "The quick brown fox jumps", "A"]


def load(folder):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder)


def assert_same_model(model, hf, tok, hf_tok):
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    ref = generate(model, tok.encode(PROMPTS), SamplingConfig(max_new_tokens=10, temperature=0), pad_id=tok.pad_id)
    batch = hf_tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    assert not bool(batch["attention_mask"].all())  # the batch really is left-padded
    out = hf.generate(**batch, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert out[:, batch["input_ids"].shape[1] :].tolist() == ref
    assert len({tuple(r) for r in ref}) == len(ref)  # the prompts lead to different continuations


@pytest.mark.parametrize("attention,hc_mult", [("mha", 1), ("mha", 4), ("mla", 1), ("mla", 4)])
def test_exported_model_matches_logits_and_greedy_tokens(tmp_path, text_tokenizer, attention, hc_mult):
    from engram.hf import export

    model = tiny_model(text_tokenizer, attention, hc_mult)
    folder = export(model, tmp_path / "hf", text_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_engram.EngramForCausalLM"
    for name in (
        "model.safetensors",
        "modeling_engram.py",
        "configuration_engram.py",
        "tokenizer.json",
        "tokenizer.safetensors",
    ):
        assert (folder / name).is_file(), name
    hf, hf_tok = load(folder)
    assert hf_tok.padding_side == "left"
    assert_same_model(model, hf, text_tokenizer, hf_tok)


def test_tied_embeddings_and_moe_counters_survive_meta_loading(tmp_path, text_tokenizer):
    from engram.hf import export

    model = tiny_model(text_tokenizer, tie=True)
    hf, hf_tok = load(export(model, tmp_path / "hf", text_tokenizer))
    assert hf.model.lm_head.weight is hf.model.tok_emb.weight
    for moe in hf.model.moe_layers():  # non-persistent buffers rebuilt by _init_weights, not left empty
        assert int(moe.expert_counts.abs().sum()) == 0
    for eng in hf.model.engram_layers.values():
        assert eng.table.offsets.tolist() == [0, *torch.tensor(eng.table.head_sizes).cumsum(0)[:-1].tolist()]
    assert_same_model(model, hf, text_tokenizer, hf_tok)


def test_disk_tables_stay_memory_mapped_files(tmp_path, text_tokenizer):
    from engram.hf import export

    model = tiny_model(text_tokenizer)
    (tmp_path / "rows").mkdir()
    offload_tables(model, "disk", path_dir=tmp_path / "rows")
    folder = export(model, tmp_path / "hf", text_tokenizer)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert not [k for k in names if ".table." in k]
    hf, hf_tok = load(folder)
    for eng in hf.model.engram_layers.values():
        assert eng.table.store.kind == "disk" and eng.table.store.path.parent == folder / "tables"
    assert_same_model(model, hf, text_tokenizer, hf_tok)
    hf.save_pretrained(tmp_path / "again")  # transformers' own save keeps the tables out of the weights too
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        names = f.keys()
        assert not [k for k in names if ".table." in k]
    assert (tmp_path / "again" / "tables.json").is_file()


def test_cache_is_accepted_under_both_names(tmp_path, text_tokenizer):
    from engram.hf import export

    model = tiny_model(text_tokenizer)
    hf, _ = load(export(model, tmp_path / "hf", text_tokenizer))
    ids = torch.randint(0, text_tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = hf(ids).logits
        for name in ("cache", "past_key_values"):
            first = hf(ids[:, :5], use_cache=True)
            step = hf(ids[:, 5:], **{name: first.cache})
            torch.testing.assert_close(step.logits, full[:, 5:], rtol=0, atol=1e-5)


def test_export_refuses_another_tokenizer(tmp_path, text_tokenizer):
    from engram.hf import export
    from engram.train.data import _wrap_fast, train_bpe

    other = _wrap_fast(train_bpe(["completely different text " * 50, "zebra quartz"], 400), "bpe:other")
    with pytest.raises(ValueError, match="tokenizer"):
        export(tiny_model(text_tokenizer), tmp_path / "hf", other)


def test_yarn_extended_model_exports_with_its_rope_scaling(tmp_path, text_tokenizer):
    """The exported config carries model.rope_scaling (inside engram_model) and the extended context as
    max_position_embeddings; the loaded model gives the same logits past the pre-training context."""
    from engram.hf import export
    from engram.model import EngramLM

    base = tiny_model(text_tokenizer, "mla")
    cfg = base.cfg.replace(
        max_seq_len=256,
        rope_scaling={"factor": 8.0, "original_max_seq_len": 32, "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    model = EngramLM(cfg, base.tokenizer).eval()
    model.load_state_dict(base.state_dict())
    folder = export(model, tmp_path / "hf", text_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["max_position_embeddings"] == 256
    assert config["engram_model"]["rope_scaling"]["factor"] == 8.0
    hf, _ = load(folder)
    ids = torch.randint(0, text_tokenizer.vocab_size, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
