"""Save / load a model: ``model.safetensors`` + ``config.json`` + ``tokenizer.safetensors``.

Engram tables held in a host or disk tier (``engram.storage``) are written as their own files under ``tables/``
with a ``tables.json`` manifest, not through ``model.safetensors``; see :mod:`engram.model.tables`.

The compressed-tokenizer lookup and the tokenizer's vocabulary fingerprint travel with the weights, because the
Engram hash multipliers depend on V': loading with a different tokenizer would silently rehash every n-gram, so
it is refused.

``addresses.json`` records everything else that decides which table row an n-gram reads (the hashing fields of the
config and the compression table); a folder whose ``config.json``, ``tokenizer.safetensors`` or ``tokenizer.json``
was changed after saving so that the addresses would move is refused with the fields that changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ModelLoadError
from ..files import atomic_write
from ..tokenizer import CompressedTokenizer, vocab_fingerprint
from .config import ModelConfig
from .model import EngramLM
from .tables import TABLES_MANIFEST, TableFiles, save_table_files

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.safetensors"
ADDRESSES, TEXT_TOKENIZER = "addresses.json", "tokenizer.json"
logger = logging.getLogger(__name__)


def save_model(model: EngramLM, directory: str | os.PathLike) -> Path:
    """Write the model to ``directory`` (created if needed); each file is replaced atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    table_keys = save_table_files(model, d)  # offloaded tables: their own files (a disk table stays in place)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in table_keys}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    atomic_write(d / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(d / CONFIG, json.dumps(model.cfg.to_dict(), indent=2))
    if model.tokenizer is not None:
        save_tokenizer_table(model.tokenizer, d)
    _write_addresses(d, model.cfg, model.tokenizer)
    return d


def save_tokenizer_table(tok: CompressedTokenizer, directory: str | os.PathLike) -> Path:
    """Write ``tokenizer.safetensors``: the compression lookup with the vocabulary fingerprint as metadata."""
    path = Path(directory) / TOKENIZER
    atomic_write(
        path,
        lambda p: save_file(
            {"lookup": torch.from_numpy(tok.lookup.copy())}, p, metadata={"fingerprint": tok.fingerprint}
        ),
    )
    return path


def load_tokenizer_table(directory: str | os.PathLike) -> CompressedTokenizer | None:
    path = Path(directory) / TOKENIZER
    if not path.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            fingerprint = (f.metadata() or {}).get("fingerprint")
            lookup = f.get_tensor("lookup")
    except (SafetensorError, OSError, KeyError) as e:
        raise ModelLoadError(f"{path} is corrupt or truncated ({e}); re-save the model") from e
    if fingerprint is None:
        raise ModelLoadError(f"{path} has no tokenizer fingerprint; re-save the model")
    return CompressedTokenizer.from_lookup(lookup.numpy(), fingerprint)


def load_model(
    directory: str | os.PathLike,
    tokenizer: CompressedTokenizer | None = None,
    map_location: str | torch.device = "cpu",
    table_files=None,
) -> EngramLM:
    """Load a model saved by :func:`save_model`.

    ``tokenizer``, when given, must be the one the model was trained with (same vocabulary fingerprint and
    compression table); otherwise the stored table is used. Tables saved as their own files open in the tier
    they were saved in; ``table_files`` (an :class:`engram.model.tables.TableFiles`, as
    :func:`load_offloaded` passes) opens them elsewhere.
    """
    d = Path(directory)
    check_model_folder(d)
    try:
        cfg = ModelConfig.from_dict(json.loads((d / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{d / CONFIG} is not a valid model config: {e}") from e
    stored = load_tokenizer_table(d)
    if tokenizer is not None and stored is not None:
        try:
            stored.check_matches(tokenizer)
        except ValueError as e:
            raise ModelLoadError(f"refusing to load {d}: {e}") from e
    tok = stored if stored is not None else tokenizer
    if cfg.family == "engram" and tok is None:
        raise ModelLoadError(f"{d} is an engram model but has no {TOKENIZER} and no tokenizer was given")
    _check_addresses(d, cfg, tok)
    try:
        state = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{d / WEIGHTS} is corrupt or truncated ({e}); re-save or re-download it") from e
    if table_files is None:
        table_files = TableFiles.open(d)
    model = EngramLM(cfg, tok, table_factory=table_files)
    expected = model.state_dict()
    for key in table_files.state_keys if table_files is not None else ():
        expected.pop(key, None)
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            detail.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if wrong:
            detail.append(
                "shape mismatch "
                + ", ".join(
                    f"{k}: config {tuple(expected[k].shape)} vs file {tuple(state[k].shape)}" for k in wrong[:5]
                )
            )
        raise ModelLoadError(f"{d / CONFIG} does not match the weights in {d / WEIGHTS}: " + "; ".join(detail))
    model.load_state_dict(state, strict=not cfg.tie_embeddings and table_files is None)
    return model.to(map_location)


def check_model_folder(directory: str | os.PathLike) -> None:
    """Refuse a path that is not a saved model, pointing at the right folder where we can tell."""
    d = Path(directory)
    if not d.exists():
        raise ModelLoadError(f"no model folder at {d}; pass the model/ folder of a finished run (runs/NAME/model)")
    if not d.is_dir():
        raise ModelLoadError(f"{d} is a file; pass the folder that holds {WEIGHTS} and {CONFIG}")
    if not (d / WEIGHTS).is_file() and (d / "model" / WEIGHTS).is_file():
        raise ModelLoadError(f"{d} is a run folder; its saved model is {d / 'model'}: load that folder instead")
    if not (d / WEIGHTS).is_file() and (d / "checkpoints").is_dir():
        raise ModelLoadError(
            f"{d} is a run folder without a saved model yet (training did not finish); rerun "
            f"`engram train` with the same config to finish it, which writes {d / 'model'}"
        )
    for name in (WEIGHTS, CONFIG):
        if not (d / name).is_file():
            raise ModelLoadError(f"{d} holds no {name}: not a saved engram model (save_model writes it)")


# ---------------------------------------------------------------------------------------------------- addresses
# A table row is chosen by the hash of compressed ids: the hashing fields of the config and the compression table
# decide every address. Weights are only meaningful under the addresses they were trained with, so save_model
# records them (addresses.json) and load_model refuses a folder whose config or tokenizer would move them.

_ENGRAM_ADDRESS_FIELDS = (
    "engram_vocab_size",
    "max_ngram_size",
    "n_head_per_ngram",
    "layer_ids",
    "pad_id",
    "seed",
    "compress_tokens",
)
_ADDRESS_FORMAT = 1
_warned_unrecorded: set[str] = set()


def address_record(cfg: ModelConfig, tokenizer: CompressedTokenizer | None) -> dict[str, Any]:
    """The fields that decide hash addresses, flat: ``{"engram.seed": 0, "tokenizer.lookup_sha256": ..., ...}``."""
    rec: dict[str, Any] = {"family": cfg.family, "vocab_size": cfg.vocab_size}
    if cfg.engram is not None:
        rec.update({f"engram.{k}": getattr(cfg.engram, k) for k in _ENGRAM_ADDRESS_FIELDS})
    if cfg.overencoding is not None:
        rec.update({f"overencoding.{k}": v for k, v in dataclasses.asdict(cfg.overencoding).items()})
    if tokenizer is not None:
        lookup = tokenizer.lookup.astype("<i8", copy=False)
        rec.update(
            {
                "tokenizer.fingerprint": tokenizer.fingerprint,
                "tokenizer.compressed_vocab_size": tokenizer.compressed_vocab_size,
                "tokenizer.lookup_sha256": hashlib.sha256(lookup.tobytes()).hexdigest(),
            }
        )
    return rec


def _record_sha256(rec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True).encode("utf-8")).hexdigest()


def _write_addresses(d: Path, cfg: ModelConfig, tokenizer: CompressedTokenizer | None) -> None:
    rec = address_record(cfg, tokenizer)
    text = json.dumps({"format": _ADDRESS_FORMAT, "sha256": _record_sha256(rec), "addresses": rec}, indent=2)
    atomic_write(d / ADDRESSES, text)


def _check_addresses(d: Path, cfg: ModelConfig, tokenizer: CompressedTokenizer | None) -> None:
    """Refuse ``d`` when its config, compression table or tokenizer.json no longer give the saved addresses."""
    if tokenizer is not None:
        _check_text_tokenizer(d, tokenizer)
    path = d / ADDRESSES
    if not path.is_file():
        if str(d.resolve()) not in _warned_unrecorded:
            _warned_unrecorded.add(str(d.resolve()))
            logger.warning(
                "%s has no %s (saved by an older engram): its hashing config and tokenizer cannot be "
                "checked; re-save it with engram.model.save_model to record them",
                d,
                ADDRESSES,
            )
        return
    try:
        saved = json.loads(path.read_text())
        rec = saved["addresses"]
        intact = saved["sha256"] == _record_sha256(rec)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is corrupt ({e}); re-save the model") from e
    if not intact:
        raise ModelLoadError(
            f"{path} was edited after saving (its checksum does not match); restore it from the saved model"
        )
    now = address_record(cfg, tokenizer)
    changed = [k for k in sorted(set(rec) | set(now)) if rec.get(k) != now.get(k)]
    if not changed:
        return
    config_fields = [k for k in changed if not k.startswith("tokenizer.")]
    parts = []
    if config_fields:
        parts.append(
            f"{d / CONFIG} changes "
            + ", ".join(f"{k} (saved {rec.get(k)!r}, now {now.get(k)!r})" for k in config_fields)
        )
    if len(config_fields) < len(changed):
        parts.append(
            f"{d / TOKENIZER} holds a different compression table than the model was saved with "
            f"({', '.join(k for k in changed if k.startswith('tokenizer.'))})"
        )
    raise ModelLoadError(
        f"refusing to load {d}: " + "; ".join(parts) + ". Every Engram table row would be read at "
        "another address; restore the saved values (or retrain with the new ones)"
    )


def _check_text_tokenizer(d: Path, tokenizer: CompressedTokenizer) -> None:
    """The tokenizer.json beside the weights must have the vocabulary the compression table was built from."""
    path = d / TEXT_TOKENIZER
    if not path.is_file():
        return
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ModelLoadError(f"{path} is not a valid Hugging Face tokenizer.json ({e}); restore the saved one") from e
    if vocab_fingerprint(vocab) != tokenizer.fingerprint:
        raise ModelLoadError(
            f"refusing to load {d}: {path} is not the tokenizer the model was trained with (its vocabulary "
            f"fingerprint differs from the one in {TOKENIZER}, so every token id and hash address would be wrong); "
            f"restore the original tokenizer.json"
        )


def load_offloaded(
    directory: str | os.PathLike,
    tier: str | None = None,
    *,
    cache_bytes: int = 0,
    table_dir: str | os.PathLike | None = None,
    readonly: bool = False,
    tokenizer: CompressedTokenizer | None = None,
    map_location: str | torch.device = "cpu",
) -> EngramLM:
    """Load a model saved with offloaded tables, opening them in ``tier`` (default: as saved) with a hot-row
    cache of ``cache_bytes`` per table; ``map_location`` is the compute device (the tables stay in their tier)."""
    tables = TableFiles.open(directory, tier, cache_bytes=cache_bytes, table_dir=table_dir, readonly=readonly)
    if tables is None:
        raise ModelLoadError(
            f"{directory} has no {TABLES_MANIFEST}: its tables are in model.safetensors; load it "
            f"with engram.model.load_model (and engram.storage.offload_tables to move them)"
        )
    return load_model(directory, tokenizer, map_location, table_files=tables)
