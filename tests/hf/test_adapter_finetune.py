"""Fine-tuning an Engram adapter: the loop (engram.hf.finetune) and `engram finetune` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from engram.cli import main
from engram.hf import add_engram, load_adapter
from engram.hf.finetune import FinetuneConfig, finetune

from .adapter_models import tiny_model, word_tokenizer
from .test_adapter import small_config
from .test_adapter_storage import tokens

pytestmark = pytest.mark.hf


def test_finetune_lowers_in_domain_loss_and_nothing_arm_only_evaluates():
    data = tokens(6000)
    val = tokens(1200, seed=1)
    cfg = FinetuneConfig(
        steps=40, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, eval_every=20, eval_batches=4, progress=False
    )
    model = tiny_model("llama")
    add_engram(model, word_tokenizer(), small_config())
    r = finetune(model, data, {"val": val}, cfg)
    assert r.after["val"]["loss"] < r.before["val"]["loss"] - 0.1
    assert [e["step"] for e in r.evals] == [0, 20, 40] and len(r.history) == 40
    nothing = finetune(
        tiny_model("llama"), data, {"val": val}, FinetuneConfig(steps=0, eval_batches=4, batch_size=4, seq_len=16)
    )
    assert nothing.after == nothing.before and nothing.trainable_parameters == 0
    assert nothing.before["val"]["loss"] == pytest.approx(r.before["val"]["loss"], abs=0)  # identity at init


def test_finetune_refuses_a_model_with_nothing_trainable():
    model = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="nothing trainable"):
        finetune(model, tokens(), {"val": tokens(600)}, FinetuneConfig(steps=2, batch_size=2, seq_len=8))


def test_engram_finetune_cli_writes_an_adapter_that_loads(tmp_path, capsys):
    import transformers

    base = tmp_path / "base"
    model = tiny_model("gpt2")
    model.save_pretrained(base)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(), eos_token="w1", pad_token="w0"
    ).save_pretrained(base)
    corpus = tmp_path / "corpus.jsonl"
    data = tokens(8000)
    corpus.write_text(
        "".join(
            json.dumps({"text": " ".join(f"w{i}" for i in data[s : s + 200])}) + "\n" for s in range(0, len(data), 200)
        )
    )
    out = tmp_path / "adapter"
    main(
        [
            "finetune",
            "--base",
            str(base),
            "--data",
            str(corpus),
            "--layers",
            "0,2",
            "--out",
            str(out),
            "--steps",
            "30",
            "--batch-size",
            "4",
            "--seq-len",
            "16",
            "--lr",
            "1e-2",
            "--eval-every",
            "15",
            "--eval-batches",
            "4",
            "--rows-per-head",
            "211",
        ]
    )
    printed = capsys.readouterr().out
    assert "domain: val loss" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["after"]["domain"] < results["before"]["domain"]
    assert (out / "loss_curves.png").stat().st_size > 0 and "domain loss" in (out / "report.md").read_text()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(base)
    load_adapter(fresh, out)
    assert any(e.value_proj.weight.abs().sum() > 0 for e in fresh.engram_adapter.engrams.values())
    x = torch.as_tensor(data[:12].astype("int64"))[None]
    assert (fresh(x).logits - model(x).logits).abs().max() > 0  # the trained adapter is in effect
