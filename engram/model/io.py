"""Save / load a model: ``model.safetensors`` + ``config.json`` + ``tokenizer.safetensors``.

Engram tables held in a host or disk tier (``engram.storage``) are written as their own files under ``tables/``
with a ``tables.json`` manifest, not through ``model.safetensors``; see :mod:`engram.storage.tables`.

The compressed-tokenizer lookup and the tokenizer's vocabulary fingerprint travel with the weights, because the
Engram hash multipliers depend on V': loading with a different tokenizer would silently rehash every n-gram, so
it is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..tokenizer import CompressedTokenizer
from .config import ModelConfig
from .model import EngramLM

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.safetensors"


class ModelLoadError(ValueError):
    """A saved model that cannot be loaded as asked (missing/corrupt file, config or tokenizer mismatch)."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model: EngramLM, directory: str | os.PathLike) -> Path:
    """Write the model to ``directory`` (created if needed); each file is replaced atomically."""
    from ..storage.tables import save_table_files

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    table_keys = save_table_files(model, d)   # offloaded tables: their own files (a disk table stays in place)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in table_keys}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    _atomic_write(d / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    _atomic_write(d / CONFIG, lambda p: Path(p).write_text(json.dumps(model.cfg.to_dict(), indent=2)))
    if model.tokenizer is not None:
        tok = model.tokenizer
        _atomic_write(d / TOKENIZER, lambda p: save_file(
            {"lookup": torch.from_numpy(tok.lookup.copy())}, p, metadata={"fingerprint": tok.fingerprint}))
    return d


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


def load_model(directory: str | os.PathLike, tokenizer: CompressedTokenizer | None = None,
               map_location: str | torch.device = "cpu", table_files=None) -> EngramLM:
    """Load a model saved by :func:`save_model`.

    ``tokenizer``, when given, must be the one the model was trained with (same vocabulary fingerprint and
    compression table); otherwise the stored table is used. Tables saved as their own files open in the tier
    they were saved in; ``table_files`` (an :class:`engram.storage.tables.TableFiles`, as
    :func:`engram.storage.load_offloaded` passes) opens them elsewhere.
    """
    from ..storage.tables import TableFiles

    d = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (d / name).is_file():
            raise ModelLoadError(f"{d} holds no {name}: not a saved engram model (save_model writes it)")
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
            detail.append("shape mismatch " + ", ".join(
                f"{k}: config {tuple(expected[k].shape)} vs file {tuple(state[k].shape)}" for k in wrong[:5]))
        raise ModelLoadError(f"{d / CONFIG} does not match the weights in {d / WEIGHTS}: " + "; ".join(detail))
    model.load_state_dict(state, strict=not cfg.tie_embeddings and table_files is None)
    return model.to(map_location)
