"""One row-wise Adam rule on every tier: the same short run with the table on the device (an ``nn.Parameter``
stepped by RowWiseAdam), in host memory or on disk (stepped by SparseRowOptimizer in the tier) ends with the same
table rows and backbone weights, up to float rounding; a table optimizer a tier cannot honour is refused.

The runs are short because Adam amplifies rounding: the tiers sum a row's gradient in different orders, which
moves rows by ~1e-7 after 3 steps and by ~1e-5 after 5 (measured), while the rows themselves move by ~0.1."""

import copy

import pytest
import torch

from engram import CompressedTokenizer, EngramConfig
from engram.model import EngramLM, ModelConfig
from engram.storage import offload_tables, offloaded_tables
from engram.train.optim import OptimConfig, build_optimizers, build_table_optimizer, clip_grad_norm

VOCAB = 61


def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        family="engram",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=64,
        max_seq_len=32,
        engram=EngramConfig(engram_vocab_size=[89, 97], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1]),
    )
    return EngramLM(cfg, CompressedTokenizer.identity(VOCAB))


def run_steps(model, cfg, steps=3):
    """The trainer's step: forward, backward, one global clip, the backbone optimizers, then the table optimizer."""
    optimizers = build_optimizers(model, cfg)
    table_opt = build_table_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, 16), generator=gen)
        loss = model(x, torch.roll(x, -1, 1)).loss
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm([*model.parameters(), *(table_opt.grad_tensors() if table_opt else [])], cfg.grad_clip)
        for o in optimizers:
            o.step()
        if table_opt is not None:
            table_opt.step()
            table_opt.zero_grad()
    return model


def table_rows(model):
    state = model.state_dict()
    return {k: v.clone() for k, v in state.items() if k.endswith("table.weight")}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_device_host_and_disk_tables_end_a_run_with_the_same_rows(tmp_path, weight_decay):
    cfg = OptimConfig(
        lr=3e-3,
        warmup_steps=0,
        schedule="constant",
        muon=False,
        table_optimizer="rowwise",
        table_weight_decay=weight_decay,
        grad_clip=0.05,
    )  # a clip that binds: the norms must agree
    base = tiny_model()
    initial = table_rows(base)
    models = {"device": copy.deepcopy(base), "host": copy.deepcopy(base), "disk": copy.deepcopy(base)}
    offload_tables(models["host"], "host")
    offload_tables(models["disk"], "disk", path_dir=tmp_path)
    assert {t.store.kind for _, t in offloaded_tables(models["disk"]).values()} == {"disk"}
    rows = {tier: table_rows(run_steps(m, cfg)) for tier, m in models.items()}
    for key, device_rows in rows["device"].items():
        assert (device_rows - initial[key]).abs().max() > 1e-2  # the rows moved far more than the tolerance
        for tier in ("host", "disk"):
            torch.testing.assert_close(rows[tier][key], device_rows, rtol=1e-5, atol=1e-6, msg=f"{tier} {key}")
    backbone = {k: v for k, v in models["device"].state_dict().items() if not k.endswith("table.weight")}
    for k, v in models["disk"].state_dict().items():
        if k in backbone:
            torch.testing.assert_close(v, backbone[k], rtol=1e-5, atol=1e-6, msg=k)


def test_full_adam_on_an_offloaded_table_is_refused_with_the_fix():
    model = tiny_model()
    offload_tables(model, "host")
    with pytest.raises(ValueError, match="table_optimizer=rowwise"):
        build_table_optimizer(model, OptimConfig(table_optimizer="adam"))
    assert build_table_optimizer(tiny_model(), OptimConfig(table_optimizer="adam")) is None  # device: Adam is fine
