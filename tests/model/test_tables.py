"""A model whose Engram tables live in host or disk storage is the same model: identical logits and generations
to the device-table model with the same weights; the tables are created in their tier, saved as their own files
(a disk table stays in place and loads memory-mapped) and a bad table file is refused."""

import os

import pytest
import torch
from safetensors import safe_open

from engram import CompressedTokenizer, EngramConfig, MultiHeadEmbedding
from engram.model import (
    EngramLM,
    ModelConfig,
    ModelLoadError,
    SamplingConfig,
    build_offloaded,
    generate,
    load_model,
    load_offloaded,
    save_model,
)
from engram.storage import DiskRowStore, HostRowStore, OffloadedEmbedding, offloaded_tables, set_prefetch, table_factory

VOCAB = 97


def small_cfg(layer_ids=(1, 2)):
    return ModelConfig(
        family="engram",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=3,
        num_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        intermediate_size=64,
        max_seq_len=64,
        engram=EngramConfig(
            engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=list(layer_ids), pad_id=0
        ),
    )


TOK = CompressedTokenizer.identity(VOCAB)


@pytest.fixture(scope="module")
def device_model():
    torch.manual_seed(0)
    return EngramLM(small_cfg(), TOK).eval()


def prompts(seed=0, batch=3, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def same_weights(tier, tmp_path, device_model, **kw):
    model = build_offloaded(small_cfg(), TOK, tier, path_dir=tmp_path / "tables" if tier == "disk" else None, **kw)
    model.load_state_dict(device_model.state_dict())
    return model.eval()


@pytest.mark.parametrize("tier", ["host", "disk", "device"])
def test_offloaded_tables_give_the_device_models_logits_and_generations(tmp_path, device_model, tier):
    ragged = [prompts(5)[0, :4].tolist(), prompts(6)[0].tolist()]  # left padding and incremental hashing
    greedy = SamplingConfig(max_new_tokens=8, temperature=0)
    sampled = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    expected = {"greedy": generate(device_model, ragged, greedy), "sampled": generate(device_model, ragged, sampled)}
    for i, (cache_bytes, prefetch) in enumerate([(0, True), (0, False), (40 * 8 * 4, True)]):
        model = same_weights(tier, tmp_path / str(i), device_model, cache_bytes=cache_bytes)
        set_prefetch(model, prefetch)
        assert {t.store.kind for _, t in offloaded_tables(model).values()} == {tier}
        with torch.no_grad():
            for seed in range(3):  # several batches, so that a cache fills and evicts
                ids = prompts(seed)
                assert torch.equal(model(ids).logits, device_model(ids).logits), (cache_bytes, prefetch)
        mode = "sampled" if prefetch and not cache_bytes else "greedy"
        assert generate(model, ragged, greedy if mode == "greedy" else sampled) == expected[mode], (
            cache_bytes,
            prefetch,
        )


def test_factory_creates_the_tables_in_their_tier_and_nowhere_else(tmp_path):
    model = build_offloaded(small_cfg(), TOK, "disk", path_dir=tmp_path)
    tables = offloaded_tables(model)
    assert sorted(layer for layer, _ in tables.values()) == [1, 2]
    assert not any(isinstance(m, MultiHeadEmbedding) for m in model.modules())
    for layer, table in tables.values():
        assert isinstance(table.store, DiskRowStore) and table.store.path == tmp_path / f"layer{layer:02d}.rows"
        # the rows are no parameter: a dense optimizer or a .to(device) never sees them
        assert not any(p.shape == (table.num_rows, table.head_dim) for p in model.parameters())
    # tier-independent initialisation: a host table of the same layer and seed holds the same rows
    host = build_offloaded(small_cfg(), TOK, "host")
    for (key, (_, disk_table)), (_, host_table) in zip(tables.items(), offloaded_tables(host).values()):
        assert torch.equal(
            disk_table.store.read_range(0, disk_table.num_rows), host_table.store.read_range(0, host_table.num_rows)
        ), key


def test_factory_arguments_are_checked():
    with pytest.raises(ValueError, match="path_dir"):
        table_factory("disk")
    with pytest.raises(ValueError, match="path_dir"):
        table_factory("host", path_dir="x")
    with pytest.raises(ValueError, match="unknown tier"):
        table_factory("nvme")


def test_saved_disk_table_stays_in_place_and_loads_memory_mapped(tmp_path, device_model):
    folder = tmp_path / "model"
    model = build_offloaded(small_cfg(), TOK, "disk", path_dir=folder / "tables")
    model.load_state_dict(device_model.state_dict())
    files = {layer: t.store.path for layer, t in offloaded_tables(model).values()}
    inodes = {layer: os.stat(p).st_ino for layer, p in files.items()}
    save_model(model, folder)
    assert {layer: os.stat(p).st_ino for layer, p in files.items()} == inodes  # not rewritten, not copied
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert not any(k.endswith("table.weight") for k in f.keys())
    loaded = load_model(folder)
    for layer, table in offloaded_tables(loaded).values():
        assert isinstance(table.store, DiskRowStore) and table.store.path.resolve() == files[layer].resolve()
    ids = prompts(1)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, device_model(ids).logits)


@pytest.mark.parametrize("saved,opened", [("host", "disk"), ("disk", "host"), ("host", None), ("disk", None)])
def test_saved_tables_load_into_any_tier(tmp_path, device_model, saved, opened):
    model = same_weights(saved, tmp_path, device_model)
    save_model(model, tmp_path / "model")
    if saved == "disk":  # a copy next to the weights, the working file left alone
        assert (tmp_path / "model" / "tables" / "layer01.rows").is_file()
    loaded = load_offloaded(tmp_path / "model", opened, table_dir=tmp_path / "opened", cache_bytes=1024)
    kinds = {t.store.kind for _, t in offloaded_tables(loaded).values()}
    assert kinds == {opened or saved}
    ids = prompts(2)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, device_model(ids).logits)


def test_device_table_models_still_save_their_tables_in_the_weights_file(tmp_path, device_model):
    save_model(device_model, tmp_path / "m")
    assert not (tmp_path / "m" / "tables.json").exists()
    with pytest.raises(ModelLoadError, match="no tables.json"):
        load_offloaded(tmp_path / "m")
    assert torch.equal(
        load_model(tmp_path / "m").blocks[1].engram.table.weight, device_model.blocks[1].engram.table.weight
    )


def test_truncated_table_file_is_refused(tmp_path, device_model):
    save_model(same_weights("disk", tmp_path, device_model), tmp_path / "m")
    path = tmp_path / "m" / "tables" / "layer02.rows"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 8)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(tmp_path / "m")


def test_table_file_of_another_shape_is_refused(tmp_path, device_model):
    save_model(same_weights("disk", tmp_path, device_model), tmp_path / "m")
    path = tmp_path / "m" / "tables" / "layer01.rows"
    other = DiskRowStore.load(path)
    DiskRowStore.create(path, other.num_rows - 1, other.dim, overwrite=True)  # a well-formed file, one row short
    with pytest.raises(ModelLoadError, match="need"):
        load_model(tmp_path / "m")


def test_host_table_file_of_another_shape_is_refused(tmp_path, device_model):
    save_model(same_weights("host", tmp_path, device_model), tmp_path / "m")
    HostRowStore.create(10, 8).save(tmp_path / "m" / "tables" / "layer01.safetensors")
    with pytest.raises(ModelLoadError, match="need"):
        load_model(tmp_path / "m")


def test_a_layer_missing_from_the_manifest_is_refused(tmp_path, device_model):
    one_layer = build_offloaded(small_cfg(layer_ids=[1]), TOK, "host")
    save_model(one_layer, tmp_path / "m")
    small_cfg().save_json(tmp_path / "m" / "config.json")  # a config with one more Engram layer
    (tmp_path / "m" / "addresses.json").unlink()  # saved before addresses were recorded: the manifest must catch it
    with pytest.raises(ModelLoadError, match="no table for Engram layer 2"):
        load_model(tmp_path / "m")


def test_offloaded_table_is_an_offloaded_embedding_inside_the_engram_module(device_model):
    model = build_offloaded(small_cfg(), TOK, "host")
    assert isinstance(model.blocks[1].engram.table, OffloadedEmbedding)
    assert model.blocks[0].engram is None
