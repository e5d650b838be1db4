"""Hugging Face ``datasets`` as a training corpus: a ``save_to_disk`` folder, or a local parquet / CSV file.

The text column is never copied into Python lists: ``datasets`` keeps it in memory-mapped Arrow files and
:class:`TextColumn` reads it in batches, so :func:`~engram.train.data.build_token_files` streams the documents into
the token files (one pass for the fingerprint, one for the tokens) with memory bounded by one batch.

Splits: a saved ``DatasetDict`` with a ``train`` and a ``validation`` (or ``test``) split uses them as they are.
Anything else is split per row by the same SHA-256 rule as the other corpora (:func:`~engram.train.data.
is_validation` of ``row:INDEX``), so the split is the same on every machine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_BATCH_ROWS = 256
_FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv"}
_VAL_SPLITS = ("validation", "test")


def is_hf_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a parquet / CSV file."""
    if path.is_dir():
        return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    return path.suffix.lower() in _FILE_BUILDERS


class TextColumn(Sequence[str]):
    """One string column of a ``datasets.Dataset`` as a read-only sequence of documents (read batch by batch)."""

    def __init__(self, dataset: Any, field: str):
        self.dataset, self.field = dataset, field

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(self.dataset[index][self.field])
        return self.dataset[index][self.field]

    def __iter__(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=_BATCH_ROWS):
            yield from batch[self.field]


def _open(path: Path) -> tuple[Any, Any | None]:
    """(train dataset, validation dataset or None) of ``path``."""
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"{path} is a Hugging Face dataset: reading it needs pip install 'engram[hf]'") from e
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"{path} holds the splits {sorted(loaded)} but no 'train' split to train on")
            val = next((loaded[s] for s in _VAL_SPLITS if s in loaded), None)
            return loaded["train"], val
        return loaded, None
    builder = _FILE_BUILDERS[path.suffix.lower()]
    return datasets.load_dataset(builder, data_files=str(path), split="train"), None


def _rows(dataset: Any, field: str, max_bytes: int | None, source: Path) -> np.ndarray:
    """Indices (int64, 8 bytes a row) of the non-empty documents, in order, up to ``max_bytes`` UTF-8 bytes (whole
    documents; a first document that is already larger is kept)."""
    if field not in dataset.column_names:
        raise ValueError(
            f"{source} has no column {field!r} (columns: {dataset.column_names}); set train.text_field "
            f"to the column that holds the text"
        )
    keep, total = [], 0
    for start in range(0, len(dataset), _BATCH_ROWS):
        rows = []
        for offset, text in enumerate(dataset[start : start + _BATCH_ROWS][field]):
            if text is None or text == "":
                continue
            if not isinstance(text, str):
                raise TypeError(
                    f"{source}: column {field!r} must hold strings, row {start + offset} holds a {type(text).__name__}"
                )
            total += len(text.encode("utf-8"))
            if max_bytes is not None and total > max_bytes and (keep or rows):
                return np.concatenate([*keep, np.asarray(rows, dtype=np.int64)])
            rows.append(start + offset)
        keep.append(np.asarray(rows, dtype=np.int64))
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


def load_hf_corpus(
    path: Path,
    *,
    text_field: str,
    max_bytes: int | None,
    val_fraction: float,
    is_validation: Callable[[str, float], bool],
) -> tuple[str, TextColumn, TextColumn]:
    """``(name, train texts, validation texts)`` of the dataset at ``path`` (see the module docstring), which
    :func:`engram.train.data.load_corpus` makes a ``Corpus`` of; ``is_validation`` is its split rule."""
    train, val = _open(path)
    train_rows = _rows(train, text_field, max_bytes, path)
    if not len(train_rows):
        raise ValueError(f"{path}: column {text_field!r} has no non-empty text")
    if val is not None:
        val_rows = _rows(val, text_field, None if max_bytes is None else max(1, int(max_bytes * val_fraction)), path)
        return path.name, TextColumn(train.select(train_rows), text_field), TextColumn(val.select(val_rows), text_field)
    held = np.fromiter((is_validation(f"row:{i}", val_fraction) for i in train_rows), dtype=bool, count=len(train_rows))
    if val_fraction > 0 and len(train_rows) >= 2 and held.sum() in (0, len(train_rows)):
        held[-1 if not held.any() else 0] = not held.any()  # both sides non-empty, as for the other corpora
    return (
        path.name,
        TextColumn(train.select(train_rows[~held]), text_field),
        TextColumn(train.select(train_rows[held]), text_field),
    )
