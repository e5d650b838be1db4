"""Hugging Face datasets as train.data: a save_to_disk folder and a parquet file give the same documents and token
files as their texts, stream (no copy of the column in Python memory), and train."""

import tracemalloc

import numpy as np
import pytest

from engram.train.data import build_token_files, load_corpus
from engram.train.hf_datasets import TextColumn

from .conftest import TEXTS

pytestmark = pytest.mark.hf
datasets = pytest.importorskip("datasets")


def _docs(n=60):
    return [f"{TEXTS[i % len(TEXTS)]}# document {i}\n" for i in range(n)]


def test_saved_dataset_dict_uses_its_splits_and_text_field(tmp_path):
    train, val = _docs(50), _docs(8)
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": train, "n": list(range(50))}),
            "validation": datasets.Dataset.from_dict({"content": val}),
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(tmp_path / "ds", text_field="content")
    assert isinstance(corpus.train, TextColumn)
    assert list(corpus.train) == train and list(corpus.val) == val


def test_parquet_file_is_split_by_row_and_tokenised_like_its_texts(tmp_path, text_tokenizer):
    docs = _docs(80) + [""]  # an empty row is skipped
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    corpus = load_corpus(tmp_path / "d.parquet", val_fraction=0.2)
    got = list(corpus.train) + list(corpus.val)
    assert sorted(got) == sorted(docs[:-1]) and 0 < len(corpus.val) < len(got)
    files = build_token_files(corpus, text_tokenizer, tmp_path / "tokens", progress=False)
    eos = text_tokenizer.eos_id
    want = [t for doc in text_tokenizer.encode(list(corpus.train)) for t in [*doc, eos]]
    assert np.array_equal(np.asarray(files.train.tokens), np.asarray(want, dtype=np.uint32))
    assert files.train.n_bytes == sum(len(d.encode()) for d in corpus.train)


def test_max_bytes_keeps_whole_rows(tmp_path):
    docs = _docs(40)
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    cap = sum(len(d.encode()) for d in docs[:10])
    corpus = load_corpus(tmp_path / "d.parquet", max_bytes=cap, val_fraction=0.0)
    assert list(corpus.train) == docs[:10]


def test_wrong_text_field_names_the_columns(tmp_path):
    datasets.Dataset.from_dict({"body": _docs(4)}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body'\]\).*train.text_field"):
        load_corpus(tmp_path / "ds")


def _peak_python_bytes(path, tokenizer, cache) -> tuple[int, int]:
    """(peak traced Python memory of load_corpus + build_token_files, bytes of text tokenised)."""
    load_corpus(path)  # imports and the Arrow cache, outside the measurement
    tracemalloc.start()
    start = tracemalloc.get_traced_memory()[0]
    files = build_token_files(load_corpus(path, val_fraction=0.01), tokenizer, cache, progress=False)
    peak = tracemalloc.get_traced_memory()[1] - start
    tracemalloc.stop()
    return peak, files.train.n_bytes + files.val.n_bytes


def test_memory_does_not_grow_with_the_dataset(tmp_path, text_tokenizer):
    peaks, sizes = [], []
    for n in (1000, 4000):  # ~1 MB and ~4 MB of text
        docs = [f"{i} " + "lorem ipsum dolor sit amet " * 36 for i in range(n)]
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / f"{n}.parquet"))
        peak, n_bytes = _peak_python_bytes(tmp_path / f"{n}.parquet", text_tokenizer, tmp_path / f"tokens{n}")
        assert n_bytes == sum(len(d.encode()) for d in docs)
        peaks.append(peak)
        sizes.append(n_bytes)
    # a copy of the column in Python would add at least the extra text; streaming adds only row indices
    assert peaks[1] - peaks[0] < (sizes[1] - sizes[0]) / 4, f"peaks {peaks} B for {sizes} B of text"
