"""Context extension (engram.train.extend): an extension run starts from the pre-trained weights, resumes like any
run, keeps the short-context loss, and refuses weights of another model."""

import dataclasses

import pytest
import torch

from engram.errors import ConfigError
from engram.model import load_model
from engram.train.evaluate import evaluate
from engram.train.extend import extension_run, load_initial_weights
from engram.train.trainer import build_model, prepare_data, train


@pytest.fixture
def pretrained(tmp_path, tiny_run):
    """A finished 12-step tiny Engram run at a 32-token context."""
    run = tiny_run(tmp_path / "pre")
    train(run)
    return run


def extend(pretrained, out, **kw):
    args = dict(seq_len=64, steps=8, out_dir=str(out), factor=4.0)
    args.update(kw)
    return extension_run(pretrained, **args)


def test_extension_run_config_switches_yarn_on_at_the_longer_context(pretrained, tmp_path):
    ext = extend(pretrained, tmp_path / "ext", factor=None)
    assert ext.model.max_seq_len == 64 and ext.train.seq_len == 64
    s = ext.model.rope_scaling
    assert (s.factor, s.original_max_seq_len, s.beta_fast, s.beta_slow) == (2.0, 32, 32.0, 1.0)
    assert s.mscale == s.mscale_all_dim == 0.707
    assert ext.train.init_from == str(tmp_path / "pre" / "model")
    with pytest.raises(ConfigError, match="must exceed"):
        extend(pretrained, tmp_path / "x", seq_len=32)


def test_extension_starts_from_the_pretrained_weights(pretrained, tmp_path):
    ext = extend(pretrained, tmp_path / "ext")
    tok, _ = prepare_data(ext.train)
    model = build_model(ext.model, tok)
    load_initial_weights(model, ext.train.init_from, tok.fingerprint)
    pre = load_model(tmp_path / "pre" / "model")
    assert model.cfg.max_seq_len == 64 and pre.cfg.max_seq_len == 32
    for k, v in pre.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_extension_resumes_exactly_like_any_run(pretrained, tmp_path):
    full = train(extend(pretrained, tmp_path / "full"))
    first = train(extend(pretrained, tmp_path / "resumed"), stop_after=3)
    assert first.interrupted and first.steps_done == 3
    second = train(extend(pretrained, tmp_path / "resumed"))
    assert second.steps_done == 8
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, second.model.state_dict()[k]), k
    back = load_model(tmp_path / "resumed" / "model")
    assert back.cfg.max_seq_len == 64 and back.cfg.rope_scaling.factor == 4.0


def test_extension_from_a_checkpoint_step_folder(pretrained, tmp_path):
    step = tmp_path / "pre" / "checkpoints" / "step_00000012"
    assert step.is_dir()
    a = train(extend(pretrained, tmp_path / "from-model"))
    b = train(extend(pretrained, tmp_path / "from-ckpt", init_from=str(step)))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


def test_extension_keeps_the_short_context_loss(pretrained, tmp_path):
    """Stated tolerance: after 8 extension steps at 64 tokens the 32-token validation loss is within 0.05 nats of
    the pre-trained model's (measured: it falls, since the tiny model is still learning)."""
    tok, tokens = prepare_data(pretrained.train)
    pre = load_model(tmp_path / "pre" / "model")
    ext = train(extend(pretrained, tmp_path / "ext")).model
    before = evaluate(pre, tokens.val, batch_size=4, seq_len=32, max_batches=8)["loss"]
    after = evaluate(ext, tokens.val, batch_size=4, seq_len=32, max_batches=8)["loss"]
    assert after <= before + 0.05, (before, after)


def test_init_from_refuses_another_model_or_a_missing_source(pretrained, tmp_path):
    ext = extend(pretrained, tmp_path / "ext")
    wider = dataclasses.replace(ext, model=ext.model.replace(num_heads=4))
    with pytest.raises(ConfigError, match="num_heads: 2 -> 4"):
        train(wider)
    missing = dataclasses.replace(ext, train=dataclasses.replace(ext.train, init_from=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="neither a model folder"):
        train(missing)
    with pytest.raises(ConfigError, match="device tables"):
        dataclasses.replace(ext.train, table_tier="host")


def test_cli_extend_trains_the_extension_and_resumes(pretrained, tmp_path, capsys):
    from engram.cli import main

    args = ["extend", "--run", str(tmp_path / "pre"), "--seq-len", "64", "--steps", "4", "--out", str(tmp_path / "e")]
    main(args + ["--set", "train.eval_every=2"])
    out = capsys.readouterr().out
    assert "done: step 4 at 64 tokens (YaRN s=2)" in out
    main(args + ["--set", "train.eval_every=2"])  # finished: the rerun resumes at step 4 and does nothing
    assert "done: step 4" in capsys.readouterr().out
    assert load_model(tmp_path / "e" / "model").cfg.rope_scaling.mscale_all_dim == 0.707
