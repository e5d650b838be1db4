"""A model's Engram tables as their own files beside a saved model, and models built with tables in a tier.

Building. :func:`build_offloaded` is ``EngramLM(cfg, tok, table_factory=engram.storage.table_factory(tier))``:
each Engram layer's table is created directly in its tier (a host or disk table is never allocated on the
accelerator; a disk table is written chunk by chunk to ``path_dir/layerNN.rows``). See
:func:`engram.storage.table_factory` for how the rows are initialised.

Saving. :func:`engram.model.save_model` writes every table held in a :class:`~engram.storage.RowStore` as its own
file, never through the safetensors file of the whole state dict::

    model.safetensors        every other tensor
    tables.json              {"format": 1, "tables": {"<layer>": {"file", "tier", "state_key", "num_rows",
                                                                   "dim", "dtype", "head_sizes"}}}
                             ("dtype" names the row format: float32, bfloat16, ..., fp8_e4m3)
    tables/layerNN.rows      a disk table: the row file itself (left in place when the table already lives
                             there, else copied chunk by chunk)
    tables/layerNN.safetensors  a host or device table

Loading. :func:`engram.model.load_model` sees ``tables.json`` and opens each table in the tier it was saved in
(a disk table memory-mapped in place); :func:`engram.model.load_offloaded` picks another tier or a cache size. A
table file that is truncated, not a table, or of another shape than the layer needs is refused before any row
is served.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..files import atomic_write
from ..storage import OffloadedEmbedding, offloaded_tables, table_factory
from ..storage.tables import table_file_name
from ..storage.tiers import TIERS, DiskRowStore, load_row_store
from ..tokenizer import CompressedTokenizer
from .config import ModelConfig
from .model import EngramLM

TABLES_MANIFEST = "tables.json"
TABLES_DIR = "tables"
TABLES_FORMAT = 1


def build_offloaded(
    cfg: ModelConfig,
    tokenizer: CompressedTokenizer,
    tier: str = "host",
    *,
    path_dir: str | os.PathLike | None = None,
    cache_bytes: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> EngramLM:
    """``EngramLM(cfg, tokenizer)`` with every Engram table created directly in ``tier``
    (:func:`engram.storage.table_factory`)."""
    return EngramLM(
        cfg,
        tokenizer,
        table_factory=table_factory(
            tier,
            path_dir=path_dir,
            cache_bytes=cache_bytes,
            dtype=dtype,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
        ),
    )


# ---------------------------------------------------------------------------------------------------- saving
def save_table_files(model: nn.Module, directory: str | os.PathLike) -> set[str]:
    """Write every offloaded table of ``model`` under ``directory/tables`` with a ``tables.json`` manifest (see
    the module docstring); returns the state-dict keys it wrote, which the weights file must leave out.

    A model without offloaded tables removes a stale manifest and returns an empty set.
    """
    d = Path(directory)
    tables = offloaded_tables(model)
    manifest_path = d / TABLES_MANIFEST
    if not tables:
        if manifest_path.exists():
            manifest_path.unlink()
        return set()
    (d / TABLES_DIR).mkdir(parents=True, exist_ok=True)
    entries = {}
    for key, (layer_id, table) in tables.items():
        store = table.store
        table.wait_for_prefetches()  # no gather may be reading while the file is copied
        rel = f"{TABLES_DIR}/{table_file_name(layer_id, store.kind)}"
        target = d / rel
        if isinstance(store, DiskRowStore) and target.exists() and target.resolve() == store.path.resolve():
            store.flush()  # the table already lives in the model folder: keep it in place
        else:
            atomic_write(target, store.save)
        entries[layer_id] = manifest_entry(rel, store.kind, key, table.head_sizes, store.dim, store.format.name)
    write_manifest(d, entries)
    return set(tables)


def manifest_entry(file: str, tier: str, state_key: str, head_sizes: list[int], dim: int, fmt: str) -> dict:
    """One table's entry in ``tables.json`` (module docstring)."""
    return {
        "file": file,
        "tier": tier,
        "state_key": state_key,
        "num_rows": sum(head_sizes),
        "dim": dim,
        "dtype": fmt,
        "head_sizes": list(head_sizes),
    }


def write_manifest(directory: str | os.PathLike, entries: dict[int, dict]) -> None:
    """Write ``tables.json`` for ``{layer_id: manifest_entry(...)}``."""
    text = json.dumps({"format": TABLES_FORMAT, "tables": {str(k): v for k, v in entries.items()}}, indent=1)
    atomic_write(Path(directory) / TABLES_MANIFEST, text)


# ---------------------------------------------------------------------------------------------------- loading
class TableFiles:
    """The table files of a saved model, as a ``table_factory`` that opens them (see the module docstring).

    Args:
        directory: the saved model folder.
        tier: where to open the tables (default: the tier each was saved in). A disk file opens in place for
            ``"disk"`` and is copied for ``"host"`` / ``"device"``; a safetensors table opening as ``"disk"`` is
            copied to a new row file in ``table_dir``.
        cache_bytes: hot-row cache per table.
        table_dir: folder for the row files made when safetensors tables are opened as disk tables.
        readonly: map disk tables read-only (serving); training needs them writable.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        tier: str | None = None,
        *,
        cache_bytes: int = 0,
        table_dir: str | os.PathLike | None = None,
        readonly: bool = False,
        pin: bool | None = None,
    ):
        self.directory = Path(directory)
        if tier is not None and tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
        path = self.directory / TABLES_MANIFEST
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") != TABLES_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r}, this engram reads format {TABLES_FORMAT}")
            self.entries = {int(layer): entry for layer, entry in manifest["tables"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{path} is not a readable table manifest ({e}); re-save the model") from e
        self.tier, self.cache_bytes, self.readonly, self.pin = tier, int(cache_bytes), readonly, pin
        self.table_dir = None if table_dir is None else Path(table_dir)

    @classmethod
    def open(cls, directory: str | os.PathLike, tier: str | None = None, **kwargs) -> TableFiles | None:
        """The table files of ``directory``, or None when its tables are inside ``model.safetensors``."""
        if not (Path(directory) / TABLES_MANIFEST).is_file():
            return None
        return cls(directory, tier, **kwargs)

    @property
    def state_keys(self) -> set[str]:
        """State-dict keys held in table files instead of ``model.safetensors``."""
        return {e["state_key"] for e in self.entries.values()}

    def __call__(self, layer_id: int, head_sizes: list[int], head_dim: int, init_std: float) -> OffloadedEmbedding:
        entry = self.entries.get(layer_id)
        if entry is None:
            raise ModelLoadError(
                f"{self.directory / TABLES_MANIFEST} has no table for Engram layer {layer_id} "
                f"(it holds layers {sorted(self.entries)}); the config and the tables disagree"
            )
        path = self.directory / entry["file"]
        tier = self.tier or entry["tier"]
        want = (sum(head_sizes), head_dim)
        if list(entry["head_sizes"]) != list(head_sizes) or (entry["num_rows"], entry["dim"]) != want:
            raise ModelLoadError(
                f"{path} holds a table for heads {entry['head_sizes']} x {entry['dim']}, layer "
                f"{layer_id} of this config needs {list(head_sizes)} x {head_dim}"
            )
        disk_path = None
        if tier == "disk" and entry["tier"] != "disk":
            if self.table_dir is None:
                raise ValueError(
                    f"opening the {entry['tier']} table {path} as a disk table copies it to a new row "
                    f"file: pass table_dir="
                )
            self.table_dir.mkdir(parents=True, exist_ok=True)
            disk_path = self.table_dir / table_file_name(layer_id, "disk")
        try:
            store = load_row_store(
                path, tier, pin=self.pin if tier == "host" else None, disk_path=disk_path, readonly=self.readonly
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot open the table of Engram layer {layer_id}: {e}") from e
        if (store.num_rows, store.dim) != want or store.format.name != entry["dtype"]:
            raise ModelLoadError(
                f"{path} holds a [{store.num_rows}, {store.dim}] {store.format.name} table, "
                f"the manifest and layer {layer_id} need [{want[0]}, {want[1]}] {entry['dtype']}"
            )
        return OffloadedEmbedding(head_sizes, head_dim, store, init_std=init_std, cache_bytes=self.cache_bytes)
