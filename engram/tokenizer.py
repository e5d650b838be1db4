"""Tokenizer compression: the surjection P: V -> V' of the paper (section 2.2).

Raw token ids whose decoded text normalises to the same string share one compressed id, so that n-grams such as
"Apple" / " apple" / "APPLE" hit the same memory rows. The normalisation follows the reference exactly:
NFKC, NFD, strip accents, lowercase, collapse ``[ \\t\\r\\n]+`` to one space, then strip unless the result is
exactly one space (the reference's protect / strip / restore; unlike the reference's sentinel trick, a literal
U+E000 in a token is kept rather than turned into a space -- no DeepSeek token contains one). Tokens whose text is
a partial UTF-8 sequence (decode contains U+FFFD) keep their raw token string as key and are never merged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, normalizers

from .validation import validation_enabled

TokenizerLike = Union[Tokenizer, "os.PathLike[str]", str, Any]


def _build_normalizer() -> normalizers.Normalizer:
    # Everything before the lone-space protection. The protection itself is done in Python (below) rather than
    # with a private-use sentinel character: a sentinel would turn a token whose text *contains* that character
    # (e.g. "\ue000") into " " and wrongly merge it into the whitespace class.
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        ]
    )


_NORMALIZER = _build_normalizer()
_STRIP = normalizers.Strip()  # strips Unicode White_Space (Rust char::is_whitespace), as the reference does


def normalize_token_text(text: str) -> str:
    """The compression key of a decoded token (before the U+FFFD and empty-string rules)."""
    collapsed = _NORMALIZER.normalize_str(text)
    if collapsed == " ":  # a string that is exactly one space is protected from the strip
        return collapsed
    return _STRIP.normalize_str(collapsed)


class _Backend:
    """Uniform view over a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.is_fast_lib = isinstance(tok, Tokenizer)

    def vocab_size(self) -> int:
        # get_vocab_size / len count tokens, not ids: with holes in the id space the largest id can exceed it
        n = self.tok.get_vocab_size(with_added_tokens=True) if self.is_fast_lib else len(self.tok)
        ids = self.vocab().values()
        return max(n, max(ids) + 1) if ids else n

    def vocab(self) -> dict[str, int]:
        if self.is_fast_lib:
            return self.tok.get_vocab(with_added_tokens=True)
        return dict(self.tok.get_vocab())

    def decode_each(self, n: int) -> list[str]:
        ids = [[i] for i in range(n)]
        if self.is_fast_lib:
            return self.tok.decode_batch(ids, skip_special_tokens=False)
        # no clean-up: it would rewrite e.g. "x ," to "x," and give a different table than the same tokenizer
        # passed as a tokenizers.Tokenizer
        return [self.tok.decode(i, skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]

    def raw_token(self, i: int) -> str:
        if self.is_fast_lib:
            tok = self.tok.id_to_token(i)
        else:
            tok = self.tok.convert_ids_to_tokens(i)
        return "" if tok is None else tok


def _load_tokenizer(source: TokenizerLike) -> Any:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {str(source)!r}: pass a tokenizers.Tokenizer, a transformers tokenizer, "
                f"a path to tokenizer.json, or a folder that contains tokenizer.json"
            )
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {e}") from e
    if isinstance(source, Tokenizer):
        return source
    if hasattr(source, "convert_ids_to_tokens") and hasattr(source, "decode") and hasattr(source, "get_vocab"):
        return source
    raise TypeError(
        f"cannot build a CompressedTokenizer from {type(source).__name__}: expected a tokenizers.Tokenizer, "
        f"a transformers tokenizer, or a path to tokenizer.json / a tokenizer folder"
    )


def vocab_fingerprint(vocab: dict[str, int]) -> str:
    """SHA-256 over the (token, id) pairs of a vocabulary, order-independent."""
    h = hashlib.sha256()
    for tok, idx in sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])):
        h.update(str(idx).encode())
        h.update(b"\x00")
        h.update(tok.encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
    return h.hexdigest()


class CompressedTokenizer:
    """Maps raw token ids to compressed ids.

    Build it from a Hugging Face tokenizer (``tokenizers.Tokenizer``, a ``transformers`` tokenizer, or a path
    to ``tokenizer.json`` / a tokenizer folder)::

        ctok = CompressedTokenizer("path/to/tokenizer.json")
        ctok.compressed_vocab_size      # V'
        ctok(torch.tensor([[5, 17, 9]]))  # compressed ids, same shape, same device

    Attributes:
        lookup: ``np.ndarray[int64]`` of length ``vocab_size``, raw id -> compressed id.
        vocab_size: raw vocabulary size V (added tokens included).
        compressed_vocab_size: V'.
        fingerprint: SHA-256 of the raw vocabulary; models store it and refuse a different tokenizer.
    """

    def __init__(self, tokenizer: TokenizerLike):
        backend = _Backend(_load_tokenizer(tokenizer))
        n = backend.vocab_size()
        if n <= 0:
            raise ValueError("the tokenizer has an empty vocabulary")
        texts = backend.decode_each(n)
        key_to_new: dict[str, int] = {}
        lookup = np.empty(n, dtype=np.int64)
        for raw_id, text in enumerate(texts):
            if "\ufffd" in text:
                key = backend.raw_token(raw_id)
            else:
                key = normalize_token_text(text) or text
            lookup[raw_id] = key_to_new.setdefault(key, len(key_to_new))
        self._init(lookup, vocab_fingerprint(backend.vocab()))
        self.keys: list[str] = list(key_to_new)  # compressed id -> its key text

    def _init(self, lookup: np.ndarray, fingerprint: str) -> None:
        self.lookup = np.ascontiguousarray(lookup, dtype=np.int64)
        self.vocab_size = int(self.lookup.shape[0])
        self.compressed_vocab_size = int(self.lookup.max()) + 1 if self.vocab_size else 0
        self.fingerprint = fingerprint
        self._torch_lookup: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------ alternative constructors
    @classmethod
    def from_lookup(cls, lookup: np.ndarray | list[int], fingerprint: str) -> "CompressedTokenizer":
        """Rebuild from a stored lookup table (as saved in a checkpoint)."""
        arr = np.asarray(lookup, dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"a compression lookup must be a non-empty 1-D array, got shape {arr.shape}")
        if arr.min() < 0:
            raise ValueError("a compression lookup cannot contain negative ids")
        if not np.array_equal(np.unique(arr), np.arange(int(arr.max()) + 1)):
            raise ValueError("a compression lookup must be a surjection onto 0..V'-1 (some compressed id is unused)")
        self = cls.__new__(cls)
        self._init(arr, fingerprint)
        self.keys = []
        return self

    @classmethod
    def identity(cls, vocab_size: int, fingerprint: str = "identity") -> "CompressedTokenizer":
        """No compression (V' = V): the 'w/o tokenizer compression' ablation."""
        return cls.from_lookup(np.arange(vocab_size, dtype=np.int64), fingerprint)

    # ------------------------------------------------------------------ mapping
    @property
    def reduction(self) -> float:
        """Fraction of the vocabulary removed by compression, 1 - V'/V."""
        return 1.0 - self.compressed_vocab_size / self.vocab_size

    def _check_range(self, hi: int) -> None:
        if hi >= self.vocab_size:
            raise ValueError(
                f"token id {hi} is out of range for a tokenizer with vocab size {self.vocab_size}; "
                f"the ids come from a different (larger) tokenizer than the one this model was built with"
            )

    def _lookup_on(self, device: torch.device) -> torch.Tensor:
        table = self._torch_lookup.get(device)
        if table is None:
            table = torch.from_numpy(self.lookup).to(device)
            self._torch_lookup[device] = table
        return table

    def compress_valid(self, ids: torch.Tensor) -> torch.Tensor:
        """:meth:`compress` for an int64 tensor of ids known to lie in ``[0, vocab_size)`` (a model's own sampled
        tokens): one ``take`` instead of the five ops that let negative ids pass through. An id >= vocab_size
        still raises (``take`` checks its indices); a negative one would wrap around, so only callers that
        cannot see one use this (:meth:`engram.model.EngramLM.forward_checked` on a decode step, whose token
        embedding refuses negative ids anyway)."""
        return torch.take(self._lookup_on(ids.device), ids)

    def compress(self, ids: torch.Tensor | np.ndarray, *, check: bool = True) -> torch.Tensor | np.ndarray:
        """Raw ids -> compressed ids (same shape and device). Negative ids pass through unchanged.

        ``check=False`` skips the range check, for callers that have checked the ids already. On a tensor the check
        reads the largest id back to the host, so it also follows :func:`engram.validation_enabled`.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
            if ids.numel() == 0:
                return ids.to(torch.int64)
            if check and validation_enabled():
                self._check_range(int(ids.max()))
            ids64 = ids.to(torch.int64)
            return torch.where(ids64 >= 0, self._lookup_on(ids.device)[ids64.clamp_min(0)], ids64)
        arr = np.asarray(ids)
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        if arr.size == 0:
            return arr.astype(np.int64)
        if check:
            self._check_range(int(arr.max()))
        arr = arr.astype(np.int64)
        return np.where(arr >= 0, self.lookup[np.maximum(arr, 0)], arr)

    __call__ = compress

    def state_dict(self) -> dict[str, Any]:
        return {"lookup": torch.from_numpy(self.lookup.copy()), "fingerprint": self.fingerprint}

    def check_matches(self, other: "CompressedTokenizer") -> None:
        """Raise ``ValueError`` if ``other`` is not the same compression (tokenizer fingerprint and table)."""
        if other.fingerprint != self.fingerprint:
            raise ValueError(
                f"tokenizer mismatch: this model was built with a tokenizer whose vocabulary fingerprint is "
                f"{self.fingerprint[:16]}..., the given one has {other.fingerprint[:16]}...; load the tokenizer "
                f"the model was trained with"
            )
        if not np.array_equal(other.lookup, self.lookup):
            raise ValueError("tokenizer compression table differs although the vocabulary matches; rebuild it")

    def merge_classes(self, top: int = 5) -> list[tuple[str, int]]:
        """The ``top`` largest merge classes as (key, number of raw ids), largest first."""
        counts = np.bincount(self.lookup, minlength=self.compressed_vocab_size)
        order = np.argsort(-counts, kind="stable")[:top]
        return [(self.keys[i] if self.keys else str(i), int(counts[i])) for i in order]

    def summary(self) -> str:
        return json.dumps(
            {
                "vocab_size": self.vocab_size,
                "compressed_vocab_size": self.compressed_vocab_size,
                "reduction": round(self.reduction, 4),
            }
        )

    def __repr__(self) -> str:
        return (
            f"CompressedTokenizer(vocab_size={self.vocab_size}, compressed_vocab_size={self.compressed_vocab_size},"
            f" reduction={self.reduction:.2%})"
        )
