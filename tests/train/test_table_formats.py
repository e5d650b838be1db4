"""Which row formats train: float32 and bfloat16 host/disk tables train (bf16 rows stay bf16, the run's loss
falls), fp8 tables are refused by the config and by the row optimizer with the reason; a trained model converted
by ``engram quantize`` serves ``engram eval`` and ``engram generate`` like the original."""

import dataclasses
import json

import pytest
import torch

from engram.cli import main
from engram.errors import ConfigError
from engram.storage import OffloadedEmbedding, SparseRowOptimizer, create_row_store, offloaded_tables
from engram.storage.formats import FORMATS
from engram.train.trainer import TrainConfig, train


def test_fp8_training_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="cannot be trained: a row-wise Adam step"):
        TrainConfig(table_tier="host", table_format="fp8")
    with pytest.raises(ConfigError, match="set train.table_tier=host"):
        TrainConfig(table_tier="device", table_format="bfloat16")
    table = OffloadedEmbedding([64], 32, create_row_store("host", 64, 32, fmt="fp8"))
    with pytest.raises(ValueError, match="stores its rows as fp8_e4m3, which cannot be trained"):
        SparseRowOptimizer(table, lr=1e-3)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_resumed_bf16_table_run_ends_with_the_uninterrupted_runs_rows(tmp_path, tiny_run, tier):
    def run(out):
        r = tiny_run(out, table_tier=tier, table_format="bfloat16")
        return dataclasses.replace(r, optim=dataclasses.replace(r.optim, table_optimizer="rowwise"))

    full = train(run(tmp_path / "full"))
    assert train(run(tmp_path / "resumed"), stop_after=5).interrupted
    second = train(run(tmp_path / "resumed"))
    assert [h["loss"] for h in second.history] == [h["loss"] for h in full.history]
    ((_, table),) = offloaded_tables(second.model).values()
    ((_, reference),) = offloaded_tables(full.model).values()
    assert table.store.format is FORMATS["bfloat16"] and table.store.rows.dtype == torch.bfloat16
    assert torch.equal(table.store.rows, reference.store.rows)
    with pytest.raises(ValueError, match="table_format"):
        r = tiny_run(tmp_path / "resumed", table_tier=tier, steps=14)
        train(dataclasses.replace(r, optim=dataclasses.replace(r.optim, table_optimizer="rowwise")))


def test_bf16_host_tables_train_and_the_fp8_copy_serves_eval_and_generate(tiny_run, tmp_path, corpus_dir, capsys):
    run = tiny_run(tmp_path / "run", table_tier="host", table_format="bfloat16")
    run = dataclasses.replace(
        run,
        model=dataclasses.replace(run.model, engram=dataclasses.replace(run.model.engram, n_embed_per_ngram=64)),
        optim=dataclasses.replace(run.optim, table_optimizer="rowwise"),
    )
    result = train(run)
    tables = [m for m in result.model.modules() if isinstance(m, OffloadedEmbedding)]
    assert tables and all(t.store.format is FORMATS["bfloat16"] for t in tables)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0]
    model_dir = tmp_path / "run" / "model"
    assert {e["dtype"] for e in json.loads((model_dir / "tables.json").read_text())["tables"].values()} == {"bfloat16"}
    main(["quantize", "--model", str(model_dir), "--format", "fp8", "--out", str(tmp_path / "fp8")])
    scores = {}
    for name, folder in (("bf16", model_dir), ("fp8", tmp_path / "fp8")):
        capsys.readouterr()
        main(["eval", "--model", str(folder), "--data", str(corpus_dir), "--max-batches", "2", "--batch-size", "2"])
        scores[name] = json.loads(capsys.readouterr().out)["loss"]
    assert abs(scores["fp8"] - scores["bf16"]) < 0.05 * scores["bf16"]
    main(["generate", "--model", str(tmp_path / "fp8"), "--prompt", "def add", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.startswith("def add")
    assert torch.isfinite(torch.tensor(list(scores.values()))).all()
