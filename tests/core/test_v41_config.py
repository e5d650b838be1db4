"""DeepSeek-V4.1 Engram configs: the published keys give the published table rows and module shapes; a config whose
sizes or tokenizer disagree is refused."""

import pytest
import torch

from engram import CompressedTokenizer, EngramConfig
from engram.hashing import NgramHasher
from engram.module import Engram

# text_config of DeepSeek-V4.1 (landscape.md section 5)
V41 = {
    "engram_layer_ids": [1, 14],
    "engram_num_embeddings": [384_006_168, 384_016_682],
    "engram_max_ngram_size": 4,
    "engram_vocab_size": 16_000_000,
    "engram_n_heads": 8,
    "engram_head_dim": 256,
    "engram_pad_token_id": 2,
    "engram_compressed_vocab_size": 99_092,
    "hc_mult": 4,
    "hidden_size": 5120,
}


@pytest.fixture(scope="module")
def deepseek_ctok():
    from engram.train.data import load_tokenizer

    return CompressedTokenizer(load_tokenizer("deepseek").hf)


def test_v41_keys_give_the_published_rows_and_vprime(deepseek_ctok):
    cfg = EngramConfig.from_hf_config({"text_config": V41}, tokenizer=deepseek_ctok)
    assert cfg.layer_ids == [1, 14] and cfg.max_ngram_size == 4 and cfg.engram_vocab_size == [16_000_000] * 3
    assert (cfg.n_head_per_ngram, cfg.head_dim, cfg.pad_id) == (8, 256, 2)
    assert not cfg.short_conv and not cfg.projection_bias
    hasher = NgramHasher.from_tokenizer(cfg, deepseek_ctok)
    assert hasher.compressed_vocab_size == 99_092
    assert [hasher.num_rows[layer] for layer in (1, 14)] == [384_006_168, 384_016_682]


def test_v41_module_on_meta_has_the_checkpoint_shapes():
    cfg = EngramConfig.from_hf_config(V41)
    hasher = NgramHasher(cfg, 99_092, 1)
    m = Engram(cfg, 14, hidden_size=V41["hidden_size"], hc_mult=V41["hc_mult"], hasher=hasher, device="meta")
    shapes = {name: tuple(p.shape) for name, p in m.named_parameters()}
    d, d_mem = 5120, 3 * 8 * 256
    expected = {"table.weight": (384_016_682, 256), "value_proj.weight": (d, d_mem)}
    for i in range(4):  # 4 keys + 1 shared value, no bias; gate RMSNorm weights per branch; no ShortConv
        expected |= {
            f"key_projs.{i}.weight": (d, d_mem),
            f"key_norms.{i}.weight": (d,),
            f"query_norms.{i}.weight": (d,),
        }
    assert shapes == expected
    assert m.short_conv is None


@pytest.mark.parametrize(
    "key,value",
    [
        ("engram_vocab_size", 15_000_000),
        ("engram_n_heads", 7),
        ("engram_max_ngram_size", 3),
        ("engram_layer_ids", [1, 14, 20]),
        ("engram_num_embeddings", [384_006_168, 384_016_681]),
    ],
)
def test_inconsistent_v41_config_is_refused(key, value):
    bad = dict(V41, **{key: value})
    with pytest.raises(ValueError, match="engram_num_embeddings"):
        EngramConfig.from_hf_config(bad)


def test_tokenizer_with_another_vprime_is_refused():
    small = CompressedTokenizer.from_lookup(torch.arange(300).numpy() % 200, "small")
    with pytest.raises(ValueError, match="V' = 200.*99092"):
        EngramConfig.from_hf_config(V41, tokenizer=small)


def test_missing_keys_are_named():
    with pytest.raises(ValueError, match="engram_head_dim"):
        EngramConfig.from_hf_config({k: v for k, v in V41.items() if k != "engram_head_dim"})
