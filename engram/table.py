"""EngramTable: the one interface of an Engram layer's table, wherever its rows live.

One Engram layer reads, per position, one row from each of its H = (N - 1) K hash heads (paper section 2.2).
All heads share one fused table of ``num_rows = sum(head_sizes)`` rows of width ``head_dim``; head h owns rows
``[offsets[h], offsets[h] + head_sizes[h])``, so a per-head id z_h reads fused row ``offsets[h] + z_h``::

    fused_ids(ids [..., H])  = ids + offsets                  (shape and dtype checks only: no device read)
    forward(ids [..., H])    -> rows [..., H, head_dim]       (on the compute device, differentiable)
    prefetch(ids [..., H])   :  start moving those rows now   (hash ids depend only on the tokens, section 5)

Implementations: :class:`~engram.module.MultiHeadEmbedding` (device parameter),
:class:`~engram.storage.OffloadedEmbedding` (host / disk row store, with an optional hot-row cache) and
:class:`~engram.distributed.ShardedEmbedding` (rows split over ranks). The Engram module only talks to this
interface, so it never branches on where its rows live.

Why a small base class and not a ``typing.Protocol``: every table needs the same head bookkeeping (head sizes ->
offsets, kept on the compute device) and the same ``fused_ids`` and range check; a base class holds them once,
where a Protocol would leave each table to repeat them. Every table is an ``nn.Module`` anyway (the Engram
module registers it as a submodule), and ``isinstance(table, EngramTable)`` is the one test of "is a table".

Id ranges are checked by :meth:`EngramTable.check_ids`, which reads a device value back to the host; tables call
it where ids enter them (``forward``, ``prefetch``) and only while :func:`engram.validation_enabled` is on.
"""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from ._compat import ConversionHookModule
from .validation import validation_enabled

#: the error for hash ids outside their head's rows
OUT_OF_RANGE = (
    "hash ids out of range for this table (negative or >= the head's prime size); they were produced by a "
    "hasher with a different config, seed or vocabulary"
)
# (layer_id, head_sizes, head_dim, init_std) -> the Engram table of that layer (see engram.model.EngramLM)
TableFactory = Callable[[int, list[int], int, float], "EngramTable"]


class EngramTable(ConversionHookModule):
    """Base class of every Engram table (see the module docstring).

    Args:
        head_sizes: rows per hash head (the layer's primes, :attr:`engram.NgramHasher.table_sizes`).
        head_dim: width of one row.
        init_std: standard deviation of the rows' ``normal(0, init_std)`` initialisation.

    Attributes: ``head_sizes``, ``head_dim``, ``num_rows``, ``init_std``, and the non-persistent buffers
    ``offsets`` (first fused row of each head) and ``sizes`` (rows of each head) on the compute device.
    """

    def __init__(self, head_sizes: list[int], head_dim: int, init_std: float = 0.02):
        super().__init__()
        sizes = [int(s) for s in head_sizes]
        if not sizes or any(s <= 0 for s in sizes) or int(head_dim) <= 0:
            raise ValueError(f"head sizes and head_dim must be positive, got {list(head_sizes)}, {head_dim}")
        self.head_sizes = sizes
        self.head_dim = int(head_dim)
        self.num_rows = sum(sizes)
        self.init_std = init_std
        # CPU copies: ids hashed on the host are offset without a device round trip, and the buffers are rebuilt
        # from them after any conversion (to_empty leaves buffers uninitialised)
        self._offsets_cpu = torch.tensor([0, *itertools.accumulate(sizes)][:-1], dtype=torch.int64, device="cpu")
        self._sizes_cpu = torch.tensor(sizes, dtype=torch.int64, device="cpu")
        self.register_buffer("offsets", self._offsets_cpu.clone(), persistent=False)
        self.register_buffer("sizes", self._sizes_cpu.clone(), persistent=False)

    def after_conversion(self) -> None:
        self.offsets = self._offsets_cpu.to(self.offsets.device)
        self.sizes = self._sizes_cpu.to(self.sizes.device)

    def fused_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-head ids ``[..., H]`` -> rows of the fused table, on the ids' device. Checks shape and dtype only;
        the value range is :meth:`check_ids`'s."""
        self.check_layout(ids)
        offsets = self._offsets_cpu if ids.device.type == "cpu" else self.offsets.to(ids.device)
        return ids + offsets

    def check_layout(self, ids: torch.Tensor) -> None:
        """Refuse ids that are not int64 or not ``[..., H]`` (free: reads no value)."""
        if ids.dtype != torch.int64:
            raise TypeError(f"hash ids must be int64, got {ids.dtype}")
        if ids.dim() == 0 or ids.shape[-1] != len(self.head_sizes):
            raise ValueError(
                f"hash ids must be [..., {len(self.head_sizes)}] (one id per head; this table has "
                f"{len(self.head_sizes)} heads), "
                f"got {tuple(ids.shape)}"
            )

    def check_ids(self, ids: torch.Tensor) -> None:
        """Check dtype and shape, and refuse ids outside their head's ``[0, head_size)`` while validation is on
        (that part reads a device value back to the host)."""
        self.check_layout(ids)
        if not validation_enabled() or ids.numel() == 0 or ids.device.type == "meta":
            return
        sizes = self._sizes_cpu if ids.device.type == "cpu" else self.sizes.to(ids.device)
        if bool(((ids < 0) | (ids >= sizes)).any()):
            raise ValueError(OUT_OF_RANGE)

    def prefetch(self, ids: torch.Tensor) -> None:
        """Start bringing the rows of ``ids`` to the compute device for the forward with the same ids. Tables
        whose rows already live there have nothing to do."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [..., H]`` per-head hash ids -> rows ``[..., H, head_dim]`` on the compute device."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(ids)")

    def extra_repr(self) -> str:
        return f"heads={len(self.head_sizes)}, rows={self.num_rows}, head_dim={self.head_dim}"
