"""A saved model checks what decides its hash addresses: a tokenizer.json replaced by another of the same size,
and hand-edited hashing fields in config.json, are refused with the fields that changed; models saved before the
address record existed load with one warning."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from engram.model.io import ModelLoadError, load_model

from .tiny_run import error_lines, run_cli, train_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    train_tiny(root)
    return root


@pytest.fixture
def model_dir(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny / "run" / "model", tmp_path / "model"))


def _swap_two_tokens(path: Path) -> None:
    """Another tokenizer of the same size: two vocabulary ids trade places."""
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))


def test_the_saved_model_loads(model_dir):
    assert load_model(model_dir).cfg.family == "engram"


def test_a_swapped_tokenizer_json_of_the_same_size_is_refused(model_dir):
    _swap_two_tokens(model_dir / "tokenizer.json")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json is not the tokenizer the model was trained with"):
        load_model(model_dir)


def test_eval_on_a_swapped_tokenizer_is_refused_without_a_traceback(model_dir, tiny):
    _swap_two_tokens(model_dir / "tokenizer.json")
    proc = run_cli("eval", "--model", str(model_dir), "--data", str(tiny / "data"), root=tiny)
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert str(model_dir / "tokenizer.json") in error_lines(proc, "eval")[0]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 7),
        ("pad_id", 0),
        ("compress_tokens", False),
        ("layer_ids", [0]),
        ("engram_vocab_size", [101, 97]),
        ("n_head_per_ngram", 1),
    ],
)
def test_a_hand_edited_hashing_field_is_refused_by_name(model_dir, field, value):
    config = json.loads((model_dir / "config.json").read_text())
    saved = config["engram"][field]
    config["engram"][field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=re.escape(f"engram.{field} (saved {saved!r}, now {value!r})")):
        load_model(model_dir)


def test_a_changed_n_gram_order_is_refused_by_name(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["engram"].update(max_ngram_size=4, engram_vocab_size=[97, 97, 97])
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"engram\.max_ngram_size \(saved 3, now 4\)"):
        load_model(model_dir)


def test_a_replaced_compression_table_is_refused(model_dir, tmp_path):
    from engram.model.io import save_model
    from engram.tokenizer import CompressedTokenizer

    model = load_model(model_dir)
    lookup = model.tokenizer.lookup.copy()
    lookup[[0, 1]] = lookup[[1, 0]]  # still a surjection onto the same V', with the same vocabulary fingerprint
    other = tmp_path / "other"
    model.tokenizer = CompressedTokenizer.from_lookup(lookup, model.tokenizer.fingerprint)
    save_model(model, other)
    shutil.copy(other / "tokenizer.safetensors", model_dir / "tokenizer.safetensors")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.safetensors holds a different compression table"):
        load_model(model_dir)


def test_an_edited_address_record_is_refused(model_dir):
    record = json.loads((model_dir / "addresses.json").read_text())
    record["addresses"]["engram.seed"] = 7
    (model_dir / "addresses.json").write_text(json.dumps(record))
    with pytest.raises(ModelLoadError, match="addresses.json was edited"):
        load_model(model_dir)


def test_non_address_fields_may_change(model_dir):
    """Only what moves addresses is pinned: e.g. the gate's signed sqrt is a free (if unwise) edit."""
    config = json.loads((model_dir / "config.json").read_text())
    config["engram"]["signed_sqrt"] = not config["engram"]["signed_sqrt"]
    (model_dir / "config.json").write_text(json.dumps(config))
    load_model(model_dir)


def test_a_model_saved_before_address_records_loads_with_one_warning(model_dir, caplog):
    (model_dir / "addresses.json").unlink()
    with caplog.at_level(logging.WARNING, logger="engram.model.io"):
        load_model(model_dir)
        load_model(model_dir)
    warnings = [r for r in caplog.records if "addresses.json" in r.getMessage()]
    assert len(warnings) == 1 and str(model_dir) in warnings[0].getMessage()


def test_an_edited_overencoding_hash_seed_is_refused(tmp_path):
    """OverEncoding hashes n-grams too: its seed and table size are part of the address record."""
    from engram.model import EngramLM, ModelConfig, OverEncodingConfig, save_model

    cfg = ModelConfig(
        family="overencoding",
        vocab_size=64,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=32,
        moe_intermediate_size=8,
        n_routed_experts=2,
        num_experts_per_tok=1,
        overencoding=OverEncodingConfig(table_size=31),
    )
    save_model(EngramLM(cfg), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["overencoding"]["seed"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=re.escape("overencoding.seed (saved 0, now 3)")):
        load_model(tmp_path / "m")
