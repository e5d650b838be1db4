"""lm-eval on the shipped offline tasks: its bits per byte and accuracy equal the ones computed here directly from
the engram model, for an exported folder and an engram model folder alike; and the CLI path end to end (train on
a saved HF dataset -> engram export -> engram eval --tasks)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from engram.model import save_model
from engram.train.trainer import save_text_tokenizer

from .conftest import TEXTS, tiny_model

pytestmark = pytest.mark.hf
pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _rows(name):
    from engram.hf.lmeval import TASKS_DIR

    return [json.loads(line) for line in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines()]


def _logprob(model, ids, n_cont):
    """Sum of log p of the last ``n_cont`` tokens of ``ids`` given the ones before."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = F.log_softmax(model(x[:, :-1]).logits.float(), -1)[0]
    target = x[0, 1:]
    return float(logp[-n_cont:].gather(-1, target[-n_cont:, None]).sum())


def direct_scores(model, tok):
    """bits per byte of engram_text (each text after an EOS prefix, as lm-eval's rolling loglikelihood scores it)
    and accuracy of engram_choice (argmax over the choices' summed log-probabilities)."""
    nats = n_bytes = 0.0
    for row in _rows("engram_text"):
        ids = [tok.eos_id, *tok.encode([row["text"]])[0]]
        nats -= _logprob(model, ids, len(ids) - 1)
        n_bytes += len(row["text"].encode())
    correct = 0
    for row in _rows("engram_choice"):
        context = f"Question: {row['question']}\nAnswer:"
        n_ctx = len(tok.encode([context])[0])
        scores = []
        for choice in row["choices"]:
            whole = tok.encode([f"{context} {choice}"])[0]
            scores.append(_logprob(model, whole, len(whole) - n_ctx))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["answer"])
    return nats / (math.log(2) * n_bytes), correct / len(_rows("engram_choice"))


@pytest.mark.parametrize("exported", [True, False])
def test_lm_eval_scores_equal_the_direct_computation(tmp_path, text_tokenizer, exported):
    from engram.hf import export
    from engram.hf.lmeval import evaluate_folder

    model = tiny_model(text_tokenizer)
    folder = tmp_path / "model"
    save_model(model, folder)
    save_text_tokenizer(text_tokenizer, folder)
    if exported:
        folder = export(model, tmp_path / "hf", text_tokenizer)
    r = evaluate_folder(folder, ["engram_text", "engram_choice"])
    bpb, acc = direct_scores(model, text_tokenizer)
    assert r["engram_text"]["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)
    assert r["engram_choice"]["acc"] == pytest.approx(acc)


def test_train_on_a_dataset_export_and_eval_from_the_cli(tmp_path, capsys):
    import datasets

    from engram.cli import main

    docs = [f"{t} # {i}" for i, t in enumerate(TEXTS * 2)]
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    main(
        [
            "train",
            "--set",
            f"train.out_dir={tmp_path / 'run'}",
            f"train.data={tmp_path / 'ds'}",
            "train.text_field=body",
            "train.steps=3",
            "train.batch_size=2",
            "train.seq_len=16",
            "train.eval_every=3",
            "train.eval_batches=1",
            "train.ckpt_every=3",
            "train.vocab_size=300",
            f"train.cache_dir={tmp_path / 'c'}",
            "train.progress=false",
            "train.max_bytes=null",
            "model.family=engram",
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.n_routed_experts=4",
            "model.moe_intermediate_size=16",
            "model.max_seq_len=64",
            ("model.engram={engram_vocab_size: [97, 101], n_embed_per_ngram: 16, n_head_per_ngram: 2, layer_ids: [1]}"),
        ]
    )
    main(["export", "--model", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "hf")])
    capsys.readouterr()
    main(["eval", "--model", str(tmp_path / "hf"), "--tasks", "engram_text,engram_choice", "--limit", "4"])
    r = json.loads(capsys.readouterr().out)
    assert 0 < r["engram_text"]["bits_per_byte"] < 20 and 0 <= r["engram_choice"]["acc"] <= 1
