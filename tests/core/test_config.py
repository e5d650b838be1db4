"""EngramConfig: validation errors, derived sizes, dict round trip."""

from __future__ import annotations

import json

import pytest

from engram import EngramConfig


def good(**over) -> dict:
    base = dict(
        engram_vocab_size=[100, 200],
        max_ngram_size=3,
        n_embed_per_ngram=32,
        n_head_per_ngram=4,
        layer_ids=[1, 5],
        pad_id=0,
        seed=0,
        kernel_size=4,
    )
    base.update(over)
    return base


def test_defaults_are_the_reference_setup():
    cfg = EngramConfig()
    assert cfg.engram_vocab_size == [646400, 646400]
    assert (cfg.max_ngram_size, cfg.n_embed_per_ngram, cfg.n_head_per_ngram) == (3, 512, 8)
    assert cfg.layer_ids == [1, 15] and cfg.kernel_size == 4 and cfg.signed_sqrt


def test_derived_sizes():
    cfg = EngramConfig(
        **good(max_ngram_size=4, engram_vocab_size=[10, 20, 30], n_embed_per_ngram=24, n_head_per_ngram=3)
    )
    assert cfg.num_orders == 3
    assert cfg.num_heads_total == 9
    assert cfg.head_dim == 8
    assert cfg.memory_dim == 72


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(max_ngram_size=1, engram_vocab_size=[]), "max_ngram_size"),
        (dict(max_ngram_size=0, engram_vocab_size=[]), "max_ngram_size"),
        (dict(engram_vocab_size=[100]), "one table size per n-gram order"),
        (dict(engram_vocab_size=[100, 200, 300]), "one table size per n-gram order"),
        (dict(engram_vocab_size=[100, 1]), "engram_vocab_size"),
        (dict(engram_vocab_size=[0, 100]), "engram_vocab_size"),
        (dict(engram_vocab_size=[-5, 100]), "engram_vocab_size"),
        (dict(n_embed_per_ngram=30, n_head_per_ngram=4), "divisible"),
        (dict(n_embed_per_ngram=0), "n_embed_per_ngram"),
        (dict(n_embed_per_ngram=-8), "n_embed_per_ngram"),
        (dict(n_head_per_ngram=0), "n_head_per_ngram"),
        (dict(kernel_size=0), "kernel_size"),
        (dict(layer_ids=[]), "layer_ids"),
        (dict(layer_ids=[1, 1]), "duplicates"),
        (dict(layer_ids=[-1, 3]), "layer_ids"),
        (dict(seed=-1), "seed"),
        (dict(pad_id=-1), "pad_id"),
    ],
)
def test_validation_errors(over, match):
    with pytest.raises(ValueError, match=match):
        EngramConfig(**good(**over))


def test_layer_ids_checked_against_the_model_depth():
    cfg = EngramConfig(**good(layer_ids=[1, 14]))
    cfg.validate(num_layers=15)
    cfg.validate()
    with pytest.raises(ValueError, match="outside a 14-block model"):
        cfg.validate(num_layers=14)
    with pytest.raises(ValueError, match="outside"):
        EngramConfig(**good(layer_ids=[0])).validate(num_layers=0)


def test_dict_round_trip():
    cfg = EngramConfig(**good(signed_sqrt=False, gating=False, multi_branch=False, seed=7))
    d = cfg.to_dict()
    assert d["signed_sqrt"] is False and d["seed"] == 7
    again = EngramConfig.from_dict(json.loads(json.dumps(d)))
    assert again == cfg
    assert again.to_dict() == d
    # the dict is a copy: editing it leaves the config alone
    d["layer_ids"].append(99)
    assert cfg.layer_ids == [1, 5]


def test_from_dict_unknown_field():
    d = EngramConfig(**good()).to_dict()
    d["engram_vocab_sizes"] = [1, 2]
    with pytest.raises(ValueError, match="engram_vocab_sizes"):
        EngramConfig.from_dict(d)


def test_from_dict_validates():
    d = EngramConfig(**good()).to_dict()
    d["n_head_per_ngram"] = 5
    with pytest.raises(ValueError, match="divisible"):
        EngramConfig.from_dict(d)


def test_sequences_are_normalised_to_int_lists():
    cfg = EngramConfig(**good(engram_vocab_size=(100.0, 200), layer_ids=(3, 2)))
    assert cfg.engram_vocab_size == [100, 200] and all(type(v) is int for v in cfg.engram_vocab_size)
    assert cfg.layer_ids == [3, 2]
