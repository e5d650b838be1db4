"""Engram tables in a tier, by Engram layer: a ``table_factory`` for the model, and the tables of a model.

``EngramLM(cfg, tok, table_factory=table_factory("host"))`` creates each Engram layer's table directly in its
tier through :meth:`OffloadedEmbedding.create`: a host or disk table is never allocated on the accelerator, and a
disk table is written chunk by chunk to ``path_dir/layerNN.rows``. The Engram module gets the table through
``Engram(table=...)`` and does not know where its rows live. Saving and loading such a model's tables as their
own files is :mod:`engram.model.tables`' business.

Initialisation. A factory-built table of layer ``l`` is ``normal(0, init_std)`` drawn from its own seed
``seed + l`` (see :func:`~engram.storage.tiers.init_rows`), the same rows in every tier. It does not draw from
torch's global generator, so the other weights of a model built with a factory differ from those of a model
built without one under the same ``torch.manual_seed``; to compare tiers on the same weights, copy a state
dict across (``load_state_dict`` writes the table rows into the store) or use :func:`offload_tables`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..module import Engram
from ..table import TableFactory
from .embedding import OffloadedEmbedding
from .tiers import TIERS, DiskRowStore


def table_file_name(layer_id: int, tier: str) -> str:
    """``layerNN.rows`` for a disk table, ``layerNN.safetensors`` for a host or device table."""
    return f"layer{layer_id:02d}." + ("rows" if tier == "disk" else "safetensors")


def table_factory(
    tier: str = "host",
    *,
    path_dir: str | os.PathLike | None = None,
    cache_bytes: int = 0,
    dtype: torch.dtype = torch.float32,
    fmt: str | None = None,
    seed: int = 0,
    pin: bool | None = None,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    reopen: bool = False,
) -> TableFactory:
    """A ``table_factory`` for :class:`~engram.model.EngramLM` that creates every Engram table in ``tier``.

    ``path_dir`` (disk tier only) receives ``layerNN.rows``; ``cache_bytes`` sizes each table's
    :class:`~engram.storage.HotRowCache`; ``device`` is where a device-tier table is allocated; rows are gathered as
    ``dtype`` and stored in the row format ``fmt`` (default: as ``dtype``). Layer ``l``'s rows are drawn from seed
    ``seed + l``. ``reopen`` (disk tier) opens the existing ``layerNN.rows`` files as they are instead of creating
    them: a resumed run whose journal (:mod:`engram.storage.journal`) restores them in place.
    """
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
    if (tier == "disk") != (path_dir is not None):
        raise ValueError("path_dir= (the folder of the table files) is needed for, and only for, the disk tier")
    if device is not None and tier != "device":
        raise ValueError(f"device= is where a device-tier table is allocated; a {tier} table lives on the CPU")
    if path_dir is not None:
        Path(path_dir).mkdir(parents=True, exist_ok=True)

    def make(layer_id: int, head_sizes: list[int], head_dim: int, init_std: float) -> OffloadedEmbedding:
        path = None if path_dir is None else Path(path_dir) / table_file_name(layer_id, "disk")
        if reopen and path is not None:
            if not path.is_file():
                raise CheckpointError(
                    f"the table file {path} is missing; a resumed run trains its disk tables in place (its "
                    f"checkpoints hold only the rows changed since): start over with train.resume=false"
                )
            store = DiskRowStore(
                path,
                num_rows=sum(int(s) for s in head_sizes),
                dim=head_dim,
                fmt=dtype if fmt is None else fmt,
                dtype=dtype,
            )
            return OffloadedEmbedding(
                head_sizes, head_dim, store, init_std=init_std, device=device, cache_bytes=cache_bytes
            )
        return OffloadedEmbedding.create(
            head_sizes,
            head_dim,
            tier=tier,
            dtype=dtype,
            fmt=fmt,
            init_std=init_std,
            seed=seed + layer_id,
            device=device,
            path=path,
            pin=pin,
            cache_bytes=cache_bytes,
            overwrite=overwrite,
            progress=progress,
        )

    return make


def offloaded_tables(model: nn.Module) -> dict[str, tuple[int, OffloadedEmbedding]]:
    """``{state_dict key of the table: (layer_id, table)}`` for every Engram layer whose table is offloaded."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Engram) and isinstance(module.table, OffloadedEmbedding):
            found[f"{name}.table.weight" if name else "table.weight"] = (module.layer_id, module.table)
    return found


def set_prefetch(model: nn.Module, enabled: bool) -> None:
    """Turn asynchronous prefetch on or off for every offloaded table of ``model``."""
    for _, table in offloaded_tables(model).values():
        table.prefetch_enabled = enabled
