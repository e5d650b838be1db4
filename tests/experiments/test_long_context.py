"""The long-context comparison (engram.experiments.long_context): the equal-loss rule, the task mix, and the tiny
preset end to end (the smoke test of the whole pipeline: data, pre-training, YaRN extension, both readings)."""

import json

import pytest

from engram.errors import ConfigError
from engram.experiments.long_context import (
    PRESETS,
    equal_loss_step,
    mean_accuracy,
    run_comparison,
    task_documents_needed,
)


def test_equal_loss_step_is_the_first_engram_evaluation_at_or_below_the_moe_final_loss():
    evals = [{"step": 100, "val_loss": 3.0}, {"step": 200, "val_loss": 2.49}, {"step": 300, "val_loss": 2.4}]
    assert equal_loss_step(2.5, evals) == 200
    assert equal_loss_step(2.49, evals) == 200  # "at or below"
    assert equal_loss_step(2.0, evals) is None  # never reached


def test_task_documents_make_the_asked_share_of_training_tokens():
    # 60% task tokens next to 400k corpus tokens = 600k task tokens = 3000 documents of 200 tokens on average
    assert task_documents_needed(400_000, 0.6, (100, 300)) == 3000


def test_presets_refuse_lengths_that_do_not_fit_their_stage():
    import dataclasses

    with pytest.raises(ConfigError, match="extended context"):
        dataclasses.replace(PRESETS["tiny"], eval_lengths=(256, 1024))
    with pytest.raises(ConfigError, match="must exceed"):
        dataclasses.replace(PRESETS["tiny"], extend_seq_len=256)


def test_tiny_preset_runs_the_whole_comparison(tmp_path):
    s = run_comparison("tiny", tmp_path, jobs=1)
    p = PRESETS["tiny"]
    assert set(s["models"]) >= {"moe", "engram"}
    assert s["params"]["moe"]["total"] == pytest.approx(s["params"]["engram"]["total"], rel=0.02)  # matched pair
    for name, m in s["models"].items():
        assert m["short_loss_change"] == pytest.approx(m["short_loss_after_extension"] - m["pretrain_val_loss"])
    for name in s["models"]:
        r = s["long_context"][name]
        assert r["settings"]["lengths"] == list(p.eval_lengths)
        assert r["settings"]["max_seq_len"] == p.extend_seq_len  # evaluated at the extended context
        assert 0.0 <= mean_accuracy(r, p.eval_lengths) <= 1.0
    assert s["long_context"]["moe-pretrained"]["settings"]["lengths"] == [L for L in p.eval_lengths if L <= p.seq_len]
    assert "equal_steps" in s["readings"]
    report = (tmp_path / "report.md").read_text()
    assert "## equal steps" in report and "## equal loss" in report
    assert (tmp_path / "accuracy_equal_steps.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["equal_loss_step"] == s["equal_loss_step"]
    ext = json.loads((tmp_path / "runs" / "moe-extended" / "config.json").read_text())
    assert ext["model"]["rope_scaling"]["factor"] == p.factor
    assert ext["train"]["init_from"].endswith("moe-pretrain/model")
