"""``engram eval --long-context`` on an exported transformers folder: the HF runner (the model's own ``generate``
and logits) gives the same greedy answers and tail losses as the engram runner on the model it was exported from,
and the CLI takes the exported folder."""

import json

import pytest

from engram.cli import main
from engram.hf import export
from engram.hf.long_context import load_runner
from engram.train.data import Corpus
from engram.train.long_context import EngramRunner, TaskGenerator, evaluate_long_context

from .conftest import TEXTS, tiny_model

pytestmark = pytest.mark.hf

CORPUS = Corpus("hf-test", train=TEXTS[:150] + TEXTS[200:], val=["\n".join(TEXTS[150:200])])


def test_exported_model_answers_like_the_engram_model(tmp_path, text_tokenizer):
    model = tiny_model(text_tokenizer, max_seq_len=256)
    folder = export(model, tmp_path / "hf", text_tokenizer)
    hf_lm, hf_tok = load_runner(str(folder))
    assert hf_lm.max_seq_len == model.cfg.max_seq_len
    ours = EngramRunner(model, text_tokenizer)
    samples = TaskGenerator(text_tokenizer, CORPUS).samples("niah_single", 256, 3)
    prompts = text_tokenizer.encode([s.prompt for s in samples])
    assert hf_tok.encode([s.prompt for s in samples]) == prompts
    assert hf_lm.greedy(prompts, 6) == ours.greedy(prompts, 6)
    settings = dict(tasks=["niah_single"], lengths=[256], samples=3, progress=False)
    a = evaluate_long_context(ours, text_tokenizer, CORPUS, **settings)
    b = evaluate_long_context(hf_lm, hf_tok, CORPUS, **settings)
    assert [s["prediction"] for s in a["samples"]] == [s["prediction"] for s in b["samples"]]
    assert a["tail_loss"]["256"]["docs"] == 1
    assert b["tail_loss"]["256"]["loss"] == pytest.approx(a["tail_loss"]["256"]["loss"], rel=1e-4)


def test_cli_evaluates_an_exported_folder(tmp_path, text_tokenizer, capsys):
    folder = export(tiny_model(text_tokenizer, max_seq_len=256), tmp_path / "hf", text_tokenizer)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "lc.json"
    args = ["eval", "--model", str(folder), "--long-context", "niah_single", "--lengths", "256", "--samples", "2"]
    main([*args, "--data", str(data), "--out", str(out), "--no-progress"])
    r = json.loads(out.read_text())
    assert set(r["accuracy"]["niah_single"]) == {"256"} and len(r["samples"]) == 2
    assert r["settings"]["max_seq_len"] == 256


def test_cli_evaluates_a_hugging_face_base_model(tmp_path, text_tokenizer):
    import transformers

    base = tmp_path / "llama"
    config = transformers.LlamaConfig(
        vocab_size=text_tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        eos_token_id=text_tokenizer.eos_id,
        pad_token_id=text_tokenizer.pad_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    eos, pad = (text_tokenizer.hf.id_to_token(i) for i in (text_tokenizer.eos_id, text_tokenizer.pad_id))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=text_tokenizer.hf, eos_token=eos, pad_token=pad
    ).save_pretrained(base)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "lc.json"
    args = ["eval", "--base", str(base), "--long-context", "niah_single,niah_multikey", "--lengths", "192,256"]
    main([*args, "--samples", "2", "--data", str(data), "--out", str(out), "--no-progress"])
    r = json.loads(out.read_text())
    assert r["settings"]["max_seq_len"] == 256
    assert {t: set(v) for t, v in r["accuracy"].items()} == {
        "niah_single": {"192", "256"},
        "niah_multikey": {"192", "256"},
    }
