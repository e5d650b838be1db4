"""A comparison never loses its trained runs to the report: long sample texts are traced in windows, and a
report step that fails leaves the runs and the other report parts, and says what failed."""

import importlib
import json

import pytest

from engram import EngramConfig
from engram.model import ModelConfig
from engram.reports import ReportError, compare
from engram.train.optim import OptimConfig
from engram.train.trainer import TrainConfig


def tiny_pair(tmp_path, corpus_dir):
    base = ModelConfig(family="moe", hidden_size=32, num_layers=2, num_heads=2, n_routed_experts=8,
                       num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=64, max_seq_len=32,
                       first_k_dense=1)
    engram = EngramConfig(engram_vocab_size=[10, 10], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    train = TrainConfig(steps=3, batch_size=2, seq_len=32, eval_every=3, eval_batches=1, log_every=1, ckpt_every=3,
                        data=str(corpus_dir), max_bytes=None, vocab_size=300, cache_dir=str(tmp_path / "cache"),
                        progress=False)
    return base, engram, train, OptimConfig(warmup_steps=0)


def test_a_sample_text_longer_than_max_seq_len_is_drawn_in_windows(tmp_path, corpus_dir):
    base, engram, train, optim = tiny_pair(tmp_path, corpus_dir)
    long_text = "def add(a, b):\n    return a + b\n" * 20   # far more than 32 tokens
    s = compare(base, 0.5, train, optim, engram, tmp_path / "report", sample_text=long_text,
                prompts=["def add("])
    assert s["report_failures"] == {}
    assert (tmp_path / "report" / "gate_heatmap.png").stat().st_size > 0
    assert "![gate heatmap](gate_heatmap.png)" in (tmp_path / "report" / "report.md").read_text()


def test_a_failing_report_step_keeps_the_runs_and_the_other_parts(tmp_path, corpus_dir, monkeypatch):
    base, engram, train, optim = tiny_pair(tmp_path, corpus_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts (simulated)")

    monkeypatch.setattr(importlib.import_module("engram.reports.compare"), "plot_loss_curves", broken)
    out = tmp_path / "report"
    with pytest.raises(ReportError, match=r"without: loss curves \(RuntimeError: no fonts \(simulated\)\)") as e:
        compare(base, 0.5, train, optim, engram, out, prompts=["def add("])
    assert e.value.failures == {"loss curves": "RuntimeError: no fonts (simulated)"}
    for name in ("moe", "engram"):
        assert (out / "runs" / name / "model" / "model.safetensors").is_file()
    assert (out / "gate_heatmap.png").is_file() and not (out / "loss_curves.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["engram"] and summary["report_failures"] == e.value.failures
    report = (out / "report.md").read_text()
    assert "loss_curves.png" not in report and "- loss curves: RuntimeError: no fonts (simulated)" in report
    monkeypatch.undo()
    again = compare(base, 0.5, train, optim, engram, out, prompts=["def add("])   # the finished runs are reused
    assert again["report_failures"] == {} and (out / "loss_curves.png").is_file()
