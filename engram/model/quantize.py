"""A copy of a saved model with its Engram tables in another row format (``engram quantize``).

Only the tables change: every other weight, the config, the tokenizer files and ``addresses.json`` are copied as
they are, so the copy hashes every n-gram to the same row and loads like any model (:func:`engram.model.load_model`
reads the row format from ``tables.json`` and each table file's header). The copy's tables are written as their
own files (:mod:`engram.model.tables`), in the tier each was in: a table that lived in ``model.safetensors`` (a
device table) becomes ``tables/layerNN.safetensors`` opened on the device, a host or disk table stays a host or
disk table.

The copy is written to a temporary folder beside ``out`` and renamed into place when complete, so an interrupted
run leaves no half-written model; an existing ``out`` is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import ModelLoadError
from ..files import atomic_write, fsync_dir
from ..module import Engram
from ..storage.formats import RowFormat, row_format
from ..storage.tables import table_file_name
from ..storage.tiers import DeviceRowStore, convert_table_file, to_tier
from .config import ModelConfig
from .io import CONFIG, WEIGHTS, check_model_folder, load_tokenizer_table
from .model import EngramLM
from .tables import TABLES_DIR, TABLES_MANIFEST, TableFiles, manifest_entry, write_manifest


def quantize_model(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str | RowFormat,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write ``model_dir`` to ``out`` with every Engram table stored in row format ``fmt`` (``"fp8"``,
    ``"bfloat16"``, ``"float32"``, ...); see the module docstring. Returns ``out``."""
    src, out, fmt = Path(model_dir), Path(out), row_format(fmt, "--format")
    check_model_folder(src)
    if out.exists() and out.resolve() == src.resolve():
        raise ModelLoadError(f"--out {out} is the model being converted; write the copy to another folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    tables = _tables_of(src)
    if not tables:
        raise ModelLoadError(f"{src} has no Engram tables to convert (its config has no engram layers)")
    for layer_id, (_, head_sizes, dim, _) in tables.items():
        try:
            fmt.check_dim(dim)
        except ValueError as e:
            raise ModelLoadError(f"cannot store the table of Engram layer {layer_id} ({dim} values per row): {e}")
    tmp = out.parent / f".{out.name}.quantize-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / TABLES_DIR).mkdir(parents=True)
    try:
        _write_copy(src, tmp, tables, fmt, progress)
        _replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _tables_of(src: Path) -> dict[int, tuple[str, list[int], int, dict | None]]:
    """``{layer_id: (state_key, head_sizes, head_dim, manifest entry or None)}`` of the saved model's tables;
    the entry is None for a table held in ``model.safetensors``."""
    try:
        cfg = ModelConfig.from_dict(json.loads((src / CONFIG).read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{src / CONFIG} is not a valid model config: {e}") from e
    manifest = TableFiles.open(src)
    with torch.device("meta"):  # the module tree, without allocating a weight
        model = EngramLM(cfg, load_tokenizer_table(src))
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Engram):
            key = f"{name}.table.weight"
            entry = None if manifest is None else manifest.entries.get(module.layer_id)
            found[module.layer_id] = (key, module.table.head_sizes, module.table.head_dim, entry)
    return found


def _write_copy(src: Path, dst: Path, tables: dict, fmt: RowFormat, progress: bool | None) -> None:
    table_keys = {key for key, *_ in tables.values()}
    try:
        with safe_open(str(src / WEIGHTS), framework="pt") as f:
            metadata = f.metadata()
            rest = {k: f.get_tensor(k) for k in f.keys() if k not in table_keys}
            entries = {}
            for layer_id, (key, head_sizes, dim, entry) in tables.items():
                if entry is None:  # a device table inside model.safetensors
                    if key not in f.keys():
                        raise ModelLoadError(f"{src / WEIGHTS} holds no {key} (the table of Engram layer {layer_id})")
                    tier, rel = "device", f"{TABLES_DIR}/{table_file_name(layer_id, 'device')}"
                    store = to_tier(DeviceRowStore(f.get_tensor(key)), "host", fmt=fmt, pin=False, progress=progress)
                    atomic_write(dst / rel, store.save)
                else:
                    tier, rel = entry["tier"], entry["file"]
                    atomic_write(dst / rel, lambda p: convert_table_file(src / rel, p, fmt, progress=progress))
                entries[layer_id] = manifest_entry(rel, tier, key, head_sizes, dim, fmt.name)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{src / WEIGHTS} is corrupt or truncated ({e}); re-save the model") from e
    atomic_write(dst / WEIGHTS, lambda p: save_file(rest, p, metadata=metadata))
    write_manifest(dst, entries)
    for path in src.iterdir():  # config, tokenizer files, addresses.json: as they are
        if path.name not in (WEIGHTS, TABLES_MANIFEST, TABLES_DIR) and path.is_file():
            atomic_write(dst / path.name, path.read_bytes())


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished copy ``tmp`` to ``out``, replacing an existing ``out`` only once the copy is complete."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
