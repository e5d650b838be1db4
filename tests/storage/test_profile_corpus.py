"""Profiling a corpus's hash ids: the counts are those of the hashed windows, the replayed cache counts hits
exactly, and ``engram profile`` prints the profile with hit rates per cache size and writes the plot."""

import numpy as np
import torch
import yaml

from engram import CompressedTokenizer, EngramConfig, NgramHasher
from engram.model import ModelConfig, save_model
from engram.storage import profile_corpus, simulate_cache
from engram.storage.profile import corpus_row_batches
from engram.train.trainer import (
    RunConfig,
    TrainConfig,
    build_model,
    prepare_data,
    save_text_tokenizer,
)

VOCAB = 50


def hasher():
    cfg = EngramConfig(
        engram_vocab_size=[101, 103], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1, 2], pad_id=0
    )
    return NgramHasher.from_tokenizer(cfg, CompressedTokenizer.identity(VOCAB))


def zipf_tokens(n=5000, seed=0):
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.3, n), VOCAB - 1).astype(np.uint16)


def test_profile_counts_every_position_of_every_window():
    h, tokens = hasher(), zipf_tokens()
    profiles = profile_corpus(h, tokens, dim=4, seq_len=32, batch_size=4)
    windows = len(tokens) // 32
    for layer, prof in profiles.items():
        raw = torch.from_numpy(tokens[: windows * 32].astype(np.int64)).view(windows, 32)
        fused = h.hash_tokens(raw)[layer] + h.offsets[layer]
        _, counts = torch.unique(fused, return_counts=True)
        assert prof.accesses == windows * 32 * 4 and prof.num_rows == h.num_rows[layer]
        assert torch.equal(prof.counts, torch.sort(counts, descending=True).values)
        assert prof.exponent > 0


def test_replayed_cache_that_holds_everything_misses_only_first_batches():
    h, tokens = hasher(), zipf_tokens(3000, seed=1)
    batches = list(corpus_row_batches(h, tokens, 1, seq_len=16, batch_size=8))
    seen, expected_hits, accesses = set(), 0, 0
    for b in batches:
        rows, counts = torch.unique(b, return_counts=True)
        expected_hits += sum(int(c) for r, c in zip(rows.tolist(), counts) if r in seen)
        accesses += b.numel()
        seen |= set(rows.tolist())
    stats = simulate_cache(batches, cache_bytes=h.num_rows[1] * 4 * 4, dim=4)
    assert stats.hits == expected_hits and stats.hits + stats.misses == accesses
    small = simulate_cache(batches, cache_bytes=20 * 4 * 4, dim=4)
    assert 0 < small.hit_rate < stats.hit_rate and small.evictions > 0


def run_config(tmp_path, corpus_dir):
    model = ModelConfig(
        family="engram",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        max_seq_len=32,
        engram=EngramConfig(engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1]),
    )
    return RunConfig(
        model=model,
        train=TrainConfig(
            data=str(corpus_dir), max_bytes=None, vocab_size=300, cache_dir=str(tmp_path / "cache"), progress=False
        ),
    )


def test_cli_profile_from_a_config_and_from_a_saved_model(tmp_path, corpus_dir, capsys):
    from engram.cli import main

    run = run_config(tmp_path, corpus_dir)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run.to_dict()))
    main(["profile", "--config", str(cfg), "--cache-mb", "0.001,0.01", "--seq-len", "32", "--out", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "## Engram layer 1" in out and "Zipf exponent s" in out
    assert "| 0.001 MiB |" in out and "| 0.01 MiB |" in out
    assert (tmp_path / "a" / "rank_frequency_layer1.png").stat().st_size > 0

    tok, _ = prepare_data(run.train)
    save_model(build_model(run.model, tok), tmp_path / "model")
    save_text_tokenizer(tok, tmp_path / "model")
    main(
        [
            "profile",
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(corpus_dir),
            "--cache-mb",
            "0.01",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "b"),
        ]
    )
    from_model = capsys.readouterr().out
    # same tokenizer, same hasher, same corpus: the same profile
    assert from_model.split("| accesses |")[1].split("\n")[0] == out.split("| accesses |")[1].split("\n")[0]
    assert (tmp_path / "b" / "rank_frequency_layer1.png").is_file()
