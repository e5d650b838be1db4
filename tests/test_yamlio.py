"""Config files read numbers the way people write them."""

from engram.cli import apply_overrides
from engram.yamlio import load_yaml


def test_exponent_floats_without_a_dot_are_numbers():
    d = load_yaml("optim:\n  lr: 2e-3\n  eps: 1e-8\n  betas: [0.9, 0.95]\ntrain:\n  steps: 100\n  data: notes.txt\n")
    assert d["optim"]["lr"] == 0.002 and d["optim"]["eps"] == 1e-8
    assert d["train"]["steps"] == 100 and d["train"]["data"] == "notes.txt"


def test_command_line_overrides_parse_like_the_file():
    d = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "model.engram.layer_ids=[1,2]", "train.data=x.jsonl"])
    assert d == {"optim": {"lr": 3e-4}, "model": {"engram": {"layer_ids": [1, 2]}}, "train": {"data": "x.jsonl"}}
