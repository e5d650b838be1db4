"""Training with host / disk Engram tables: the trainer steps a row-wise optimizer in the table's tier, updates
exactly the rows the batches touched, lowers the loss, and resumes exactly from its checkpoints."""

import dataclasses

import pytest
import torch

from engram.model import load_model
from engram.storage import offloaded_tables
from engram.train.data import random_batch
from engram.train.optim import OptimConfig, param_groups
from engram.train.trainer import TrainConfig, build_model, offloaded_table_factory, prepare_data, train


@pytest.fixture
def offload_run(tiny_run):
    """``tiny_run`` with the table optimizer that host and disk tables can hold (row-wise Adam)."""
    return lambda out, **train_kw: dataclasses.replace(
        tiny_run(out, **train_kw), optim=OptimConfig(table_optimizer="rowwise")
    )


def table_rows(model):
    ((_, table),) = offloaded_tables(model).values()
    return table, table.store.read_range(0, table.num_rows).clone()


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_resumed_offloaded_run_reproduces_the_uninterrupted_loss_trajectory(tmp_path, offload_run, tier):
    kw = dict(table_tier=tier, table_cache_bytes=64 * 8 * 4)
    full = train(offload_run(tmp_path / "full", **kw))
    first = train(offload_run(tmp_path / "resumed", **kw), stop_after=5)
    assert first.interrupted and first.steps_done == 5
    second = train(offload_run(tmp_path / "resumed", **kw))
    assert second.steps_done == 12 and not second.interrupted
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]
    assert second.final["val_loss"] == full.final["val_loss"]
    full_state, second_state = full.model.state_dict(), second.model.state_dict()
    assert any(k.endswith("table.weight") for k in full_state)  # the table rows are compared too
    for k, v in full_state.items():
        assert torch.equal(v, second_state[k]), k
    if tier == "disk":
        assert (tmp_path / "resumed" / "tables" / "layer01.rows").is_file()
    # the saved model opens its tables in their tier and is the trained model
    loaded = load_model(tmp_path / "resumed" / "model")
    ((_, table),) = offloaded_tables(loaded).values()
    assert table.store.kind == tier
    assert torch.equal(table_rows(loaded)[1], table_rows(second.model)[1])


def test_host_table_training_updates_exactly_the_touched_rows_and_lowers_the_loss(tmp_path, offload_run):
    run = offload_run(tmp_path / "run", table_tier="host", steps=20)
    tok, tokens = prepare_data(run.train)
    initial_model = build_model(run.model, tok, offloaded_table_factory(run.train))
    initial_table, initial = table_rows(initial_model)
    result = train(run, data=(tok, tokens))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    # no dense optimizer state for the table: it is no parameter, so no torch optimizer holds it
    assert param_groups(result.model)["tables"] == []
    # the rows the training batches looked up: replay the trainer's data generator
    gen = torch.Generator().manual_seed(run.train.seed)
    touched = set()
    for _ in range(run.train.steps):
        x, _ = random_batch(tokens.train.tokens, run.train.batch_size, run.train.seq_len, gen)
        touched |= set(initial_table.fused_ids(initial_model.hash_tokens(x)[1]).reshape(-1).tolist())
    table, final = table_rows(result.model)
    changed = set((final != initial).any(dim=1).nonzero().squeeze(1).tolist())
    assert changed == touched
    assert 0 < len(touched) < table.num_rows


def test_table_tier_settings_are_validated():
    with pytest.raises(ValueError, match="table_tier"):
        TrainConfig(table_tier="nvme")
    with pytest.raises(ValueError, match="table_dir"):
        TrainConfig(table_tier="host", table_dir="x")
    with pytest.raises(ValueError, match="table_cache_bytes"):
        TrainConfig(table_cache_bytes=1024)


def test_resume_refuses_another_table_tier(tmp_path, offload_run):
    train(offload_run(tmp_path / "run"), stop_after=4)
    with pytest.raises(ValueError, match="table_tier"):
        train(offload_run(tmp_path / "run", table_tier="host"))


def test_full_adam_on_host_tables_is_refused_before_training(tmp_path, tiny_run):
    with pytest.raises(ValueError, match="optim.table_optimizer=rowwise"):
        train(tiny_run(tmp_path / "run", table_tier="host"))
