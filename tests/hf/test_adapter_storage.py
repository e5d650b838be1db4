"""Adapter tables in the host and disk tiers, trained row-wise in place (engram.storage) through engram.hf."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram.hf import add_engram, get_adapter, load_adapter, save_adapter
from engram.hf.finetune import FinetuneConfig, finetune
from engram.storage import OffloadedEmbedding, table_factory

from .adapter_models import VOCAB, tiny_model, word_tokenizer
from .test_adapter import small_config

pytestmark = pytest.mark.hf


def tokens(n: int = 4000, seed: int = 0) -> np.ndarray:
    """A corpus with strong bigram structure: each id is followed by (3 * id) mod V most of the time."""
    rng = np.random.default_rng(seed)
    out = [2]
    for _ in range(n - 1):
        out.append((3 * out[-1]) % VOCAB if rng.random() < 0.9 else int(rng.integers(2, VOCAB)))
    return np.asarray(out, dtype=np.uint32)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_offloaded_adapter_tables_train_in_their_tier_and_round_trip(tmp_path, tier):
    model = tiny_model("qwen3")
    factory = table_factory(tier, path_dir=tmp_path / "rows" if tier == "disk" else None)
    adapter = add_engram(model, word_tokenizer(), small_config(), table_factory=factory)
    tables = [e.table for e in adapter.engrams.values()]
    assert all(isinstance(t, OffloadedEmbedding) and t.store.kind == tier for t in tables)
    rows_before = [t.store.read_range(0, t.num_rows).clone() for t in tables]
    base_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("engram_adapter.")}
    cfg = FinetuneConfig(
        steps=12, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=0, eval_every=12, eval_batches=2, progress=False
    )
    data = tokens()
    finetune(model, data, {"val": data[:600]}, cfg)
    assert any(not torch.equal(t.store.read_range(0, t.num_rows), r) for t, r in zip(tables, rows_before))
    for k, v in model.state_dict().items():
        if not k.startswith("engram_adapter."):
            assert torch.equal(v, base_before[k]), k

    x = torch.as_tensor(data[:20].astype(np.int64))[None]
    expected = model(x).logits
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model("qwen3")
    load_adapter(fresh, tmp_path / "adapter", word_tokenizer(), table_factory=table_factory("host"))
    assert all(e.table.store.kind == "host" for e in get_adapter(fresh).engrams.values())
    torch.testing.assert_close(fresh(x).logits, expected, atol=0, rtol=0)


def test_row_wise_adam_trains_device_adapter_tables():
    """OptimConfig.table_optimizer = "rowwise" (engram.train.optim) on the adapter's on-device tables."""
    from engram.train.optim import RowWiseAdam, build_optimizers

    model = tiny_model("mistral")
    adapter = add_engram(model, word_tokenizer(), small_config())
    cfg = FinetuneConfig(steps=2, table_optimizer="rowwise")
    optimizers = build_optimizers(model, cfg.optim())
    tables = [o for o in optimizers if isinstance(o, RowWiseAdam)]
    assert len(tables) == 1
    assert {id(p) for g in tables[0].param_groups for p in g["params"]} == {
        id(e.table.weight) for e in adapter.engrams.values()
    }
    before = [e.table.weight.detach().clone() for e in adapter.engrams.values()]
    data = tokens()
    finetune(
        model,
        data,
        {"val": data[:600]},
        FinetuneConfig(
            steps=6,
            batch_size=2,
            seq_len=16,
            lr=1e-2,
            warmup_steps=0,
            eval_batches=1,
            progress=False,
            table_optimizer="rowwise",
        ),
    )
    assert any(not torch.equal(e.table.weight, b) for e, b in zip(adapter.engrams.values(), before))
