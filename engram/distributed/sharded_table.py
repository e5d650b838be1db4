"""ShardedEmbedding: one Engram layer's fused multi-head table, row-sharded across the ranks of a process group.

An :class:`~engram.table.EngramTable` (``head_sizes``, ``head_dim``, ``fused_ids``,
``forward(ids [..., H]) -> [..., H, head_dim]``, ``prefetch(ids)``), so the Engram module does not know where
its rows live. Each rank holds only its rows ``[start, end)``; lookups go through a
:class:`~engram.distributed.exchange.RowExchange`.

Where a rank's rows live (``tier``):

* ``"device"``: the local parameter ``weight`` ``[end - start, head_dim]``, updated by the ordinary table
  optimizer (the parameter is in the ``tables`` group of :func:`engram.train.optim.build_optimizers`).
* ``"host"`` / ``"disk"``: ``local``, an :class:`~engram.storage.OffloadedEmbedding` over a
  :class:`~engram.storage.RowStore` of ``end - start`` rows in host memory or in this rank's own row file; the
  same table class a single-process host / disk run uses, so it is trained by the same
  :class:`~engram.storage.SparseRowOptimizer` (row-wise Adam in the tier, found by
  :func:`engram.train.optim.build_table_optimizer`). N ranks hold an N-times-larger table in RAM or on disk.
  These rows are not in the module's ``state_dict`` (:func:`_rows_out_of_state_dict`); read them with
  :meth:`ShardedEmbedding.local_rows`.

The owner reads the rows it serves (``plan.served``) from its tier, the exchange sends them to the ranks that
asked, and the backward sends each requested row's gradient back to its owner: a device shard sums what all
ranks sent into ``weight.grad``; an offloaded shard's ``local`` captures it as row gradients of the rows it
served, exactly as it captures the gradients of its own lookups in a single process.

Gradients. With data parallelism every rank's loss is the mean over its own rows of the global batch, and the
replicated backbone's gradients are averaged over ranks (DDP, FSDP); ``average_grads=True`` scales the table
gradients by ``1 / world_size`` the same way, so that the table receives d(global mean loss)/dW exactly as a
single process running the whole global batch would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .._compat import tensor_version
from ..errors import CheckpointError, EngramError
from ..files import FileLock, lock_path_for
from ..module import MultiHeadEmbedding
from ..storage.embedding import OffloadedEmbedding
from ..storage.tables import table_file_name
from ..storage.tiers import (
    TIERS,
    DeviceRowStore,
    DiskRowStore,
    RowStore,
    copy_in_chunks,
    create_row_store,
    init_block_rows,
    init_rows,
    write_row_file,
)
from ..table import EngramTable
from .exchange import RowExchange, shard_bounds


def rank_folder_name(rank: int, world_size: int) -> str:
    """``rank00001-of-00002``: the folder of one rank's row files (training tables and checkpoints)."""
    return f"rank{rank:05d}-of-{world_size:05d}"


def agree(
    error: Exception | None, group: dist.ProcessGroup | None, what: str, kind: type[Exception] = EngramError
) -> None:
    """Collective: raise on every rank of ``group`` if any rank has an ``error`` (its own error where it has one,
    else a ``kind`` error quoting the first failing rank's), so that no rank goes on into a collective the
    others never reach. For the steps whose failure can differ between ranks (their own files)."""
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, message = failed[0]
        raise kind(f"rank {rank} could not {what} ({message}); see that rank's output")


class _ExchangedRows(torch.autograd.Function):
    """rows [U, dim] = the unique ids' rows from their owners, given the rows ``served`` [S, dim] this rank reads
    for the others; backward returns the gradients of the served rows the same way."""

    @staticmethod
    def forward(
        ctx, served: torch.Tensor, plan: RowExchange, grad_scale: float, arrived: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        # ``arrived`` (rows a prefetch already moved) comes in a tuple so that autograd does not see it as an input
        ctx.plan, ctx.grad_scale = plan, grad_scale
        return arrived[0] if arrived else plan.send_rows(served.detach())

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        if ctx.grad_scale != 1.0:
            grad_rows = grad_rows * ctx.grad_scale
        return ctx.plan.return_row_grads(grad_rows), None, None, None


class _Prefetch:
    """A plan built and a row transfer started ahead of the forward, for the ids it was started with."""

    def __init__(self, ids: torch.Tensor, plan: RowExchange, served: torch.Tensor, rows: torch.Tensor, work):
        self.ids, self.version = ids, tensor_version(ids)  # None for inference tensors: they have no counter
        self.plan, self.served, self.rows, self.work = plan, served, rows, work

    def matches(self, ids: torch.Tensor) -> bool:
        return ids is self.ids and (self.version is None or tensor_version(ids) == self.version)

    def result(self) -> torch.Tensor:
        self.work.wait()
        return self.rows


class ShardedEmbedding(EngramTable):
    """Rows ``[start, end)`` of a fused ``[sum(head_sizes), head_dim]`` table; see the module docstring.

    Args:
        head_sizes: rows per hash head (this layer's primes).
        head_dim: width of one row.
        group: the process group the rows are spread over (default: the world). Use a group of its own, so
            that the table's all-to-alls never interleave with the data-parallel collectives of the backbone.
        init_std, seed: rows start as N(0, init_std^2) draws from ``seed``, block by block
            (:func:`engram.storage.tiers.init_rows`): a row's initial value depends on its index and the seed only,
            not on the number of ranks or the tier, and each rank draws only its own rows. To start from a given
            dense table instead, use :meth:`from_dense`.
        average_grads: scale table gradients by ``1 / world_size`` (data parallelism with per-rank mean losses).
        tier: where this rank's rows live: ``"device"`` (a parameter), ``"host"`` or ``"disk"`` (module docstring).
        path: the disk tier's row file of this rank (one file per rank; see :func:`sharded_table_factory`).
        cache_bytes: host / disk tiers: a hot-row cache of this size for the rows this rank serves.
        overwrite: disk tier: replace an existing file at ``path`` (a run recreating its tables).
        reopen: disk tier: open the existing file at ``path`` as it is (a resumed run, whose journal takes it back
            to the checkpoint; :mod:`engram.distributed.shard_journal`).
    """

    def __init__(
        self,
        head_sizes: list[int],
        head_dim: int,
        *,
        group: dist.ProcessGroup | None = None,
        init_std: float = 0.02,
        seed: int = 0,
        average_grads: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tier: str = "device",
        path: str | os.PathLike | None = None,
        cache_bytes: int = 0,
        overwrite: bool = False,
        reopen: bool = False,
    ):
        if not dist.is_initialized():
            raise RuntimeError(
                "ShardedEmbedding needs an initialised process group: call "
                "torch.distributed.init_process_group (torchrun sets the environment for it)"
            )
        if tier not in TIERS:
            raise ValueError(f"unknown tier {tier!r}; expected one of {TIERS}")
        if (tier == "disk") != (path is not None):
            raise ValueError("path= (this rank's row file) is needed for, and only for, the disk tier")
        super().__init__(head_sizes, head_dim, init_std)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bounds = shard_bounds(self.num_rows, self.world_size)
        self.start, self.end = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.grad_scale = 1.0 / self.world_size if average_grads else 1.0
        self._pending: list[_Prefetch] = []
        self.local: OffloadedEmbedding | None = None
        if tier == "device":
            if torch.device(device or "cpu").type == "meta":
                rows = torch.empty(self.end - self.start, self.head_dim, device="meta", dtype=dtype)
            else:
                rows = init_rows(self.start, self.end, self.head_dim, init_std, seed).to(device=device, dtype=dtype)
            self.weight = nn.Parameter(rows)
            return
        if self.num_rows < self.world_size:  # every rank sees the same sizes: every rank raises
            raise ValueError(
                f"a table of {self.num_rows} rows cannot give each of {self.world_size} ranks a {tier} shard "
                f"(a row store needs at least one row); run on at most {self.num_rows} ranks or keep "
                f"train.table_tier=device"
            )
        if reopen and tier == "disk":
            store = _reopened_shard(Path(path), self.end - self.start, head_dim, dtype)
        else:
            store = _initial_shard(tier, self.start, self.end, head_dim, init_std, seed, dtype, path, overwrite)
        self.local = OffloadedEmbedding(
            [self.end - self.start], head_dim, store, init_std=init_std, device=device, cache_bytes=cache_bytes
        )
        self.register_state_dict_post_hook(_rows_out_of_state_dict)

    @property
    def tier(self) -> str:
        return "device" if self.local is None else self.local.store.kind

    def local_rows(self) -> RowStore:
        """This rank's rows ``[end - start, head_dim]`` as a :class:`RowStore` (for checkpoints and gathers): the
        offloaded shard's store, or a device store viewing the parameter's data."""
        return DeviceRowStore(self.weight.detach()) if self.local is None else self.local.store

    @classmethod
    def from_dense(
        cls, table: MultiHeadEmbedding, *, group: dist.ProcessGroup | None = None, average_grads: bool = True
    ) -> ShardedEmbedding:
        """This rank's slice of a dense table (a :class:`MultiHeadEmbedding`; every rank passes the same one)."""
        if not isinstance(table, MultiHeadEmbedding) or table.weight.device.type == "meta":
            raise TypeError(
                f"from_dense needs a MultiHeadEmbedding holding its rows, got {type(table).__name__}; "
                f"offloaded tables are not sharded (convert with .to_multihead() first)"
            )
        weight = table.weight
        shard = cls(
            table.head_sizes,
            table.head_dim,
            group=group,
            init_std=table.init_std,
            average_grads=average_grads,
            device="meta",
            dtype=weight.dtype,
        )
        shard.weight = nn.Parameter(weight.detach()[shard.start : shard.end].clone())
        shard.offsets, shard.sizes = shard.offsets.to(weight.device), shard.sizes.to(weight.device)
        return shard

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rows [{self.start}, {self.end}), rank {self.rank} of {self.world_size}, "
            f"tier={self.tier}"
        )

    def _served_rows(self, plan: RowExchange) -> torch.Tensor:
        """The local rows this rank serves in ``plan`` ``[S, head_dim]``, differentiable: through the parameter
        (device) or as rows the offloaded shard captures gradients for (host / disk)."""
        if self.local is None:
            return self.weight.index_select(0, plan.served)
        return self.local(plan.served[:, None]).view(-1, self.head_dim)

    def prefetch(self, ids: torch.Tensor) -> None:
        """Route ``ids`` now and start moving their rows; the forward with the same ids tensor takes them.

        Hash ids depend only on the tokens, so the model calls this before its first block: the id exchange
        happens then, and the row transfer runs while the blocks before this Engram layer compute.
        """
        self.check_ids(ids)
        plan = RowExchange(self.fused_ids(ids), self.bounds, self.group)
        served = self._served_rows(plan)
        rows, work = plan.send_rows(served.detach(), async_op=True)
        self._pending.append(_Prefetch(ids, plan, served, rows, work))

    def _take_prefetch(self, ids: torch.Tensor) -> _Prefetch | None:
        pending, self._pending = self._pending, []
        for p in pending:  # every started transfer is waited for, used or not: they are collectives
            p.work.wait()
        for p in pending:
            if p.matches(ids):
                return p
        return None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        fetched = self._take_prefetch(ids)
        if fetched is None:
            self.check_ids(ids)
            plan = RowExchange(self.fused_ids(ids), self.bounds, self.group)
            served, arrived = self._served_rows(plan), ()
        else:
            plan, served, arrived = fetched.plan, fetched.served, (fetched.result(),)
        rows = _ExchangedRows.apply(served, plan, self.grad_scale, arrived)
        return rows[plan.inverse].view(*ids.shape, self.head_dim)


def _rows_out_of_state_dict(table: ShardedEmbedding, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """A host / disk shard's rows stay out of the state dict: torch's distributed state-dict helpers name every
    entry by a module attribute, which a row store is not, and a disk shard's entry would map the whole file.
    Checkpoints and gathers read the rows through :meth:`ShardedEmbedding.local_rows` instead."""
    state_dict.pop(prefix + "local.weight", None)


def _reopened_shard(path: Path, rows: int, dim: int, dtype: torch.dtype | None) -> DiskRowStore:
    if not path.is_file():
        raise CheckpointError(
            f"the table shard file {path} is missing; a resumed run trains each rank's disk shard in place (its "
            f"checkpoints hold only the rows changed since): resume where every rank sees its files, or start "
            f"over with train.resume=false"
        )
    return DiskRowStore(path, num_rows=rows, dim=dim, dtype=dtype or torch.float32)


def _initial_shard(
    tier: str,
    start: int,
    end: int,
    dim: int,
    init_std: float,
    seed: int,
    dtype: torch.dtype | None,
    path: str | os.PathLike | None,
    overwrite: bool,
) -> RowStore:
    """Rows ``[start, end)`` of the table at their initial values, created in ``tier`` chunk by chunk (a disk
    shard with plain file writes, never held whole)."""
    dtype = dtype or torch.float32
    rows = end - start

    def initial(a: int, b: int) -> torch.Tensor:
        return init_rows(start + a, start + b, dim, init_std, seed).to(dtype)

    if tier == "host":
        store = create_row_store("host", rows, dim, dtype=dtype, init_std=0.0)
        copy_in_chunks(initial, store.write_range, rows, init_block_rows(dim))
        store.version = 0
        return store
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path_for(path), f"table file {path}")  # before touching a file another run may own
    write_row_file(path, rows, dim, dtype, initial, chunk_rows=init_block_rows(dim), desc="init disk shard")
    store = DiskRowStore(path)
    lock.release()
    return store


def sharded_table_factory(
    group: dist.ProcessGroup | None = None,
    seed: int = 0,
    average_grads: bool = True,
    *,
    tier: str = "device",
    path_dir: str | os.PathLike | None = None,
    cache_bytes: int = 0,
    overwrite: bool = False,
    reopen: bool = False,
) -> Callable[[int, list[int], int, float], ShardedEmbedding]:
    """A ``table_factory`` for :class:`~engram.model.EngramLM` that builds every Engram table already sharded:
    rank r allocates and initialises only its rows, so no rank ever holds a whole table. Layer ``l``'s rows are
    drawn from seed ``seed + l``, as :func:`engram.storage.table_factory` draws them for offloaded tables.

    ``tier`` places every rank's rows (module docstring). The disk tier writes rank r's rows of layer ``l`` to
    ``path_dir/rank{r}-of-{W}/layerNN.rows`` (:func:`rank_folder_name`, zero-padded), one folder per rank, so
    ranks of one job may share ``path_dir`` (one file system) or each use its own disk; ``reopen`` opens those
    files as they are (a resume). Building a table is a collective: a rank that cannot create or open its file
    makes every rank raise."""
    if (tier == "disk") != (path_dir is not None):
        raise ValueError("path_dir= (the folder of the ranks' row files) is needed for, and only for, the disk tier")

    def make(layer_id: int, head_sizes: list[int], head_dim: int, init_std: float) -> ShardedEmbedding:
        path = None
        if path_dir is not None:
            folder = Path(path_dir) / rank_folder_name(dist.get_rank(group), dist.get_world_size(group))
            path = folder / table_file_name(layer_id, "disk")
        table, error = None, None
        try:
            table = ShardedEmbedding(
                head_sizes,
                head_dim,
                group=group,
                init_std=init_std,
                seed=seed + layer_id,
                average_grads=average_grads,
                tier=tier,
                path=path,
                cache_bytes=cache_bytes,
                overwrite=overwrite,
                reopen=reopen,
            )
        except (OSError, EngramError) as e:  # this rank's own file (exists, locked, disk full): may differ by rank
            error = e
        if tier != "device":
            agree(error, group, f"create its {tier} shard of the layer {layer_id} table")
        elif error is not None:
            raise error
        return table

    return make
