import os
import random
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engram import MultiHeadEmbedding
from engram.train import checkpoint as ckpt_mod
from engram.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    install_signal_handlers,
    restore_rng_state,
)
from engram.train.optim import LRSchedule, OptimConfig, build_optimizers


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(16, 8)
        self.table = MultiHeadEmbedding([5, 7], 4)
        self.proj = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)

    def forward(self, ids):
        h = self.tok_emb(ids) + self.table(torch.stack([ids % 5, ids % 7], -1)).flatten(-2)
        return self.lm_head(torch.relu(self.proj(h)))


def _state(model, opts=(), step=0, **extra):
    return {
        "model": model.state_dict(),
        "optimizers": [o.state_dict() for o in opts],
        "rng": capture_rng_state(),
        "data": {"step": step},
        "config": {"dim": 8},
        "extra": extra,
    }


def test_save_load_round_trips_tensors_and_json(tmp_path):
    model = Tiny()
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(3, _state(model, step=3, note="hi"))
    assert path.name == "step_00000003" and mgr.latest_step() == 3 and mgr.list() == [3]
    loaded = mgr.load()
    assert loaded["step"] == 3 and loaded["config"] == {"dim": 8} and loaded["extra"] == {"note": "hi"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["data"] == {"step": 3}


def test_tied_weights_can_be_saved(tmp_path):
    model = Tiny()
    model.lm_head.weight = model.tok_emb.weight
    CheckpointManager(tmp_path).save(1, {"model": model.state_dict()})
    loaded = CheckpointManager(tmp_path).load()
    assert torch.equal(loaded["model"]["lm_head.weight"], loaded["model"]["tok_emb.weight"])


@pytest.mark.parametrize("crash_in", ["torch.save", "manifest", "rename"])
def test_a_crash_during_save_leaves_latest_at_the_previous_checkpoint(tmp_path, monkeypatch, crash_in):
    model = Tiny()
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(model))
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.proj.weight.add_(1.0)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if crash_in == "torch.save":
        monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    elif crash_in == "manifest":
        monkeypatch.setattr(ckpt_mod, "sha256_file", boom)
    else:
        real_replace = os.replace

        def replace(src, dst):  # the step directory rename fails; pointer writes would succeed
            if "step_" in os.fspath(dst) and not os.fspath(dst).endswith("latest"):
                boom()
            return real_replace(src, dst)

        monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        mgr.save(2, _state(model))
    monkeypatch.undo()
    assert mgr.latest_step() == 1 and mgr.list() == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    loaded = mgr.load()
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["proj.weight"], good["proj.weight"])


def test_an_interrupted_directory_without_manifest_is_not_listed_or_loadable(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, _state(Tiny()))
    partial = tmp_path / "step_00000002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    assert mgr.list() == [1] and mgr.latest_step() == 1
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        mgr.load(2)


def test_corrupt_truncated_or_missing_files_raise_checkpoint_error_naming_the_file(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, _state(Tiny()))
    model_file = tmp_path / "step_00000001" / "model.safetensors"
    raw = bytearray(model_file.read_bytes())
    raw[-1] ^= 0xFF
    model_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors fails its SHA-256"):
        mgr.load(1)
    state_file = tmp_path / "step_00000002" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"state\.pt has .* bytes.*truncated"):
        mgr.load(tmp_path / "step_00000002")
    (tmp_path / "step_00000003" / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"meta\.json is missing"):
        mgr.load("latest")


def test_load_without_any_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        CheckpointManager(tmp_path).load()
    assert CheckpointManager(tmp_path).latest_step() is None


def test_keep_last_prunes_older_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        mgr.save(step, _state(Tiny()))
    assert mgr.list() == [30, 40] and mgr.latest_step() == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000030", "step_00000040"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    model = Tiny()
    mgr.save(5, _state(model))
    with torch.no_grad():
        model.proj.bias.fill_(3.0)
    mgr.save(5, _state(model))
    assert mgr.list() == [5] and torch.all(mgr.load()["model"]["proj.bias"] == 3.0)


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leave numpy with a cached gaussian
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"model": {}, "rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    restore_rng_state(mgr.load()["rng"])
    got = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def _train(model, opts, sched, gen, steps):
    for _ in range(steps):
        ids = torch.randint(0, 16, (4, 9), generator=gen)
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        sched.step()


@pytest.mark.parametrize("table_optimizer", ["adam", "rowwise"])
def test_resuming_from_a_checkpoint_continues_bit_identically(tmp_path, table_optimizer):
    cfg = OptimConfig(warmup_steps=2, table_optimizer=table_optimizer)
    torch.manual_seed(0)
    model = Tiny()
    opts = build_optimizers(model, cfg)
    sched = LRSchedule(opts, cfg, total_steps=8)
    gen = torch.Generator().manual_seed(0)
    _train(model, opts, sched, gen, 3)
    mgr = CheckpointManager(tmp_path)
    mgr.save(
        3,
        {
            "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in opts],
            "scheduler": sched.state_dict(),
            "data": {"generator": gen.get_state()},
        },
    )
    _train(model, opts, sched, gen, 5)

    state = mgr.load()
    torch.manual_seed(123)  # a different init, fully overwritten by the checkpoint
    resumed = Tiny()
    resumed.load_state_dict(state["model"])
    r_opts = build_optimizers(resumed, cfg)
    for o, s in zip(r_opts, state["optimizers"]):
        o.load_state_dict(s)
    r_sched = LRSchedule(r_opts, cfg, total_steps=8)
    r_sched.load_state_dict(state["scheduler"])
    r_gen = torch.Generator()
    r_gen.set_state(state["data"]["generator"])
    _train(resumed, r_opts, r_sched, r_gen, 5)
    for k, v in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_signal_handlers_turn_sigterm_into_a_flag_and_restore_the_old_handler():
    before = signal.getsignal(signal.SIGTERM)
    with install_signal_handlers() as flag:
        assert not flag.stop_requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 2
        while not flag.stop_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flag.stop_requested and flag.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before
