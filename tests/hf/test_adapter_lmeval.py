"""`engram eval --tasks` on a Hugging Face base model with an Engram adapter (lm-eval through engram.hf.lmeval)."""

from __future__ import annotations

import json

import pytest

from engram.cli import main
from engram.hf import add_engram, save_adapter

from .adapter_models import tiny_model, word_tokenizer
from .test_adapter import randomize, small_config

pytestmark = pytest.mark.hf


def test_eval_tasks_on_base_plus_adapter(tmp_path, capsys):
    import transformers

    base = tmp_path / "base"
    model = tiny_model("llama")
    model.save_pretrained(base)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_tokenizer(), eos_token="w1", pad_token="w0"
    ).save_pretrained(base)
    add_engram(model, word_tokenizer(), small_config())
    randomize(model)
    save_adapter(model, tmp_path / "adapter")

    def bpb(*extra: str) -> float:
        main(["eval", "--base", str(base), *extra, "--tasks", "engram_text", "--limit", "3"])
        out = capsys.readouterr().out
        return json.loads(out[out.index("{") :])["engram_text"]["bits_per_byte"]

    plain = bpb()
    adapted = bpb("--adapter", str(tmp_path / "adapter"))
    assert plain > 0 and adapted > 0 and adapted != plain


def test_eval_refuses_an_adapter_without_its_base(tmp_path):
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path), "--adapter", str(tmp_path), "--tasks", "engram_text"])
