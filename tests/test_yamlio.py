"""Config files read numbers the way people write them."""

import pytest

from engram.cli import apply_overrides
from engram.yamlio import load_yaml


def test_exponent_floats_without_a_dot_are_numbers():
    d = load_yaml("optim:\n  lr: 2e-3\n  eps: 1e-8\n  betas: [0.9, 0.95]\ntrain:\n  steps: 100\n  data: notes.txt\n")
    assert d["optim"]["lr"] == 0.002 and d["optim"]["eps"] == 1e-8
    assert d["train"]["steps"] == 100 and d["train"]["data"] == "notes.txt"


def test_command_line_overrides_parse_like_the_file():
    d = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "model.engram.layer_ids=[1,2]", "train.data=x.jsonl"])
    assert d == {"optim": {"lr": 3e-4}, "model": {"engram": {"layer_ids": [1, 2]}}, "train": {"data": "x.jsonl"}}


def test_dataclass_from_dict_names_unknown_fields_by_section_and_builds_nested_configs():
    from engram.train.trainer import RunConfig

    run = RunConfig.from_dict(
        {
            "model": {"family": "engram", "engram": {"layer_ids": [1]}, "num_layers": 2},
            "train": {"steps": 3},
            "optim": {"betas": [0.8, 0.9]},
        }
    )
    assert run.model.engram.layer_ids == [1] and run.train.steps == 3 and run.optim.betas == (0.8, 0.9)
    with pytest.raises(ValueError, match=r"unknown model.engram fields \['layers'\]"):
        RunConfig.from_dict({"model": {"family": "engram", "engram": {"layers": [1]}}})
    with pytest.raises(ValueError, match="train must be a mapping of TrainConfig fields, got list"):
        RunConfig.from_dict({"train": [1, 2]})


def test_every_command_reads_the_run_schema_and_the_old_top_level_engram_section_is_refused():
    from engram.experiments.presets import parse_spec
    from engram.train.trainer import RunConfig

    old = {"model": {"family": "moe"}, "engram": {"layer_ids": [1]}}
    for parse in (RunConfig.from_dict, parse_spec):
        with pytest.raises(ValueError, match="top-level 'engram:' section is the old .* model.engram"):
            parse(old)
    backbone, engram, _, _ = parse_spec({"model": {"family": "moe", "num_layers": 2, "engram": {"layer_ids": [1]}}})
    assert backbone.family == "moe" and backbone.engram is None and engram.layer_ids == [1]
    with pytest.raises(ValueError, match="set model.family=moe"):
        parse_spec({"model": {"family": "engram", "engram": {"layer_ids": [1]}}})


def test_config_file_values_of_the_wrong_type_are_refused_by_field():
    from engram.errors import ConfigError
    from engram.train.trainer import RunConfig

    with pytest.raises(ConfigError, match=r"train\.steps expects an integer, got 'many'"):
        RunConfig.from_dict({"train": {"steps": "many"}})
    with pytest.raises(ConfigError, match=r"engram\.layer_ids expects a list of integers"):
        RunConfig.from_dict({"model": {"family": "engram", "engram": {"layer_ids": ["one"]}}})
    with pytest.raises(ConfigError, match=r"train\.resume expects true or false"):
        RunConfig.from_dict({"train": {"resume": "yes"}})
    run = RunConfig.from_dict({"train": {"steps": 30.0, "data": 123}, "optim": {"lr": 1}})
    assert run.train.steps == 30 and isinstance(run.train.steps, int) and run.train.data == "123"
