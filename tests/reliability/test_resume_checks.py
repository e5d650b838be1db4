"""Resume checks what it resumes: changed data or tokenizer and a changed seed are refused, a changed LR is
honoured from the resume step on, and a run extended to more steps follows the longer run's schedule."""

import dataclasses
import json

import pytest

from engram.train.data import build_token_files, load_corpus
from engram.train.optim import OptimConfig
from engram.train.trainer import prepare_data, train

from ..conftest import CODE


def other_corpus(tmp_path):
    d = tmp_path / "other-corpus"
    d.mkdir()
    for i in range(40):
        (d / f"lib_{i:02d}.py").write_text(CODE.replace("Point", f"Vector{i}").replace("self", "me") * 3)
    return d


def test_resume_with_other_data_and_its_tokenizer_is_refused(tmp_path, tiny_run):
    train(tiny_run(tmp_path / "run"), stop_after=4)
    with pytest.raises(ValueError, match="tokenizer differs"):
        train(tiny_run(tmp_path / "run", data=str(other_corpus(tmp_path))))


def test_resume_with_other_data_under_the_same_tokenizer_is_refused(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run")
    tok, tokens = prepare_data(run.train)
    train(run, data=(tok, tokens), stop_after=4)
    other = build_token_files(load_corpus(str(other_corpus(tmp_path)), max_bytes=None), tok, tmp_path / "tokens")
    with pytest.raises(ValueError, match="training / validation data differs"):
        train(run, data=(tok, other))


def test_resume_with_another_seed_is_refused_and_the_config_is_left_as_it_ran(tmp_path, tiny_run):
    train(tiny_run(tmp_path / "run"), stop_after=4)
    before = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ValueError, match="train.seed was 0 when the run started and is 7 now"):
        train(tiny_run(tmp_path / "run", seed=7))
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_a_changed_lr_is_honoured_from_the_resume_step_and_recorded(tmp_path, tiny_run):
    run = tiny_run(tmp_path / "run", log_every=1)
    run = dataclasses.replace(run, optim=OptimConfig(lr=1e-3, warmup_steps=0))
    train(run, stop_after=6)
    faster = dataclasses.replace(run, optim=OptimConfig(lr=2e-3, warmup_steps=0))
    r = train(faster)
    assert r.steps_done == 12
    for h in r.history:
        peak = 1e-3 if h["step"] <= 6 else 2e-3
        assert h["lr"] == pytest.approx(peak * h["lr_factor"]), h
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["lr"] == 2e-3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "resume", "step": 6, "changed": {"optim.lr": [1e-3, 2e-3]}} in records


def test_extending_a_finished_run_continues_the_schedule_of_the_longer_run(tmp_path, tiny_run):
    def run(out, steps):
        return dataclasses.replace(tiny_run(out, steps=steps, log_every=1), optim=OptimConfig(warmup_steps=2))

    short = train(run(tmp_path / "run", 12))
    assert short.history[-1]["lr_factor"] == pytest.approx(0.1)  # the 12-step run ended decayed
    extended = train(run(tmp_path / "run", 20))
    reference = train(run(tmp_path / "uninterrupted", 20))
    assert extended.steps_done == 20 and [h["step"] for h in extended.history] == list(range(1, 21))
    later = {h["step"]: h["lr_factor"] for h in extended.history if h["step"] > 12}
    assert later == {h["step"]: h["lr_factor"] for h in reference.history if h["step"] > 12}
    assert later[13] == pytest.approx(1.0), "step 13 of a 20-step run is before the first decay milestone"
    assert (tmp_path / "run" / "model").is_dir()


def test_asking_for_fewer_steps_than_the_checkpoint_is_refused(tmp_path, tiny_run):
    train(tiny_run(tmp_path / "run"), stop_after=8)
    with pytest.raises(ValueError, match="checkpoint is at step 8 but train.steps is 4"):
        train(tiny_run(tmp_path / "run", steps=4))


def test_a_changed_table_weight_decay_is_honoured_on_resume_for_host_tables(tmp_path, tiny_run):
    """The row optimizer of offloaded tables keeps its hyper-parameters in its param group, so a resume with a
    changed optim.table_weight_decay (which only that optimizer reads) trains the rest of the run with it; if the
    saved value were restored instead, both resumed runs below would end with the same table rows."""
    from engram.storage import offloaded_tables

    def run_in(folder, wd):
        run = tiny_run(tmp_path / folder, table_tier="host")
        return dataclasses.replace(run, optim=OptimConfig(table_optimizer="rowwise", table_weight_decay=wd))

    rows = {}
    for folder, wd in (("same", 0.0), ("larger", 0.5)):
        train(run_in(folder, 0.0), stop_after=6)
        r = train(run_in(folder, wd))
        assert r.steps_done == 12
        ((_, table),) = offloaded_tables(r.model).values()
        rows[folder] = table.store.read_range(0, table.num_rows).clone()
    saved = json.loads((tmp_path / "larger" / "config.json").read_text())
    assert saved["optim"]["table_weight_decay"] == 0.5
    assert not bool((rows["same"] == rows["larger"]).all())
