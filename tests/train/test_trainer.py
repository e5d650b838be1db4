"""End to end on CPU: train -> checkpoint -> interrupt -> resume (exactly) -> eval -> generate, and bad input."""

import dataclasses
import json
import os
import signal

import pytest
import torch

from engram.model import SamplingConfig, generate, load_model
from engram.train.data import load_tokenizer
from engram.train.trainer import TrainConfig, prepare_data, train


def test_resumed_run_reproduces_the_uninterrupted_loss_trajectory(tmp_path, tiny_run):
    full = train(tiny_run(tmp_path / "full"))
    first = train(tiny_run(tmp_path / "resumed"), stop_after=5)
    assert first.interrupted and first.steps_done == 5
    assert not (tmp_path / "resumed" / "model").exists()
    second = train(tiny_run(tmp_path / "resumed"))
    assert second.steps_done == 12 and not second.interrupted
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]
    assert second.final["val_loss"] == full.final["val_loss"]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    steps = [
        json.loads(l)["step"]
        for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
        if json.loads(l)["kind"] == "train"
    ]
    assert steps == sorted(set(steps)), "metrics after the resume point must not be duplicated"


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path, tiny_run):
    def interrupt(_rec):
        os.kill(os.getpid(), signal.SIGINT)

    r = train(tiny_run(tmp_path / "run"), on_eval=interrupt)
    assert r.interrupted and r.steps_done == 6
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    resumed = train(tiny_run(tmp_path / "run"))
    assert resumed.steps_done == 12


def test_trained_model_saves_evaluates_and_generates(tmp_path, tiny_run):
    r = train(tiny_run(tmp_path / "run", steps=20))
    losses = [h["loss"] for h in r.history]
    assert losses[-1] < losses[0]
    assert r.final["val_bpb"] > 0 and r.final["gates"] and r.final["expert_load"]
    model_dir = tmp_path / "run" / "model"
    model = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    out = generate(model, tok.encode(["def add_3("]), SamplingConfig(max_new_tokens=8, temperature=0))
    assert len(out[0]) == 8
    assert model.cfg.engram.pad_id == tok.pad_id


def test_resume_refuses_a_different_model_config(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    train(run, stop_after=4)
    other = dataclasses.replace(run, model=run.model.replace(hidden_size=48))
    with pytest.raises(ValueError, match="different model config"):
        train(other)


def test_bad_data_gets_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_data(TrainConfig(data=str(tmp_path / "nope"), cache_dir=str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="(?i)no .*text|empty"):
        prepare_data(TrainConfig(data=str(empty), cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prepare_data(
            TrainConfig(data=None, max_bytes=50_000, tokenizer="no-such-tokenizer-xyz", cache_dir=str(tmp_path))
        )


def test_cli_train_eval_generate_alloc(tmp_path, corpus_dir, capsys, tiny_run):
    from engram.cli import main

    run = tiny_run(tmp_path / "run")
    cfg = tmp_path / "run.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(run.to_dict()))
    main(["train", "--config", str(cfg), "--set", "train.steps=6", "optim.lr=2e-3"])
    assert "done: step 6" in capsys.readouterr().out
    main(
        [
            "eval",
            "--model",
            str(tmp_path / "run" / "model"),
            "--data",
            str(corpus_dir),
            "--seq-len",
            "32",
            "--max-batches",
            "2",
        ]
    )
    assert json.loads(capsys.readouterr().out)["loss"] > 0
    main(
        [
            "generate",
            "--model",
            str(tmp_path / "run" / "model"),
            "--prompt",
            "def ",
            "--max-new-tokens",
            "4",
            "--seed",
            "0",
        ]
    )
    assert capsys.readouterr().out.startswith("def ")
    main(["alloc", "--set", "model.family=moe", "model.n_routed_experts=16", "--rhos", "1,0.5"])
    table = capsys.readouterr().out
    assert "| 0.50 | engram |" in table and "| 1.00 | moe |" in table
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--set", "train.stepz=3"])
    assert exit_info.value.code == 1 and "train.stepz" in capsys.readouterr().err
