"""ShardedEmbedding: one Engram layer's fused multi-head table, row-sharded across the ranks of a process group.

An :class:`~engram.table.EngramTable` (``head_sizes``, ``head_dim``, ``fused_ids``,
``forward(ids [..., H]) -> [..., H, head_dim]``, ``prefetch(ids)``), so the Engram module does not know where
its rows live. Each rank holds only its rows ``[start, end)`` as the local parameter
``weight`` ``[end - start, head_dim]``; lookups go through a :class:`~engram.distributed.exchange.RowExchange`.

Gradients. The backward sends each requested row's gradient back to its owner, which sums what all ranks sent
into ``weight.grad``. With data parallelism every rank's loss is the mean over its own rows of the global batch,
and the replicated backbone's gradients are averaged over ranks (DDP, FSDP); ``average_grads=True`` scales the
table gradients by ``1 / world_size`` the same way, so that the table receives d(global mean loss)/dW exactly as
a single process running the whole global batch would. The owner then updates its rows with the ordinary table
optimizer (the parameter is in the ``tables`` group of :func:`engram.train.optim.build_optimizers`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .._compat import tensor_version
from ..module import MultiHeadEmbedding
from ..storage.tiers import init_rows
from ..table import EngramTable
from .exchange import RowExchange, shard_bounds


class _ExchangedRows(torch.autograd.Function):
    """rows [U, dim] = the unique ids' rows from their owners; backward returns their gradients the same way."""

    @staticmethod
    def forward(
        ctx, local_weight: torch.Tensor, plan: RowExchange, grad_scale: float, arrived: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        # ``arrived`` (rows a prefetch already moved) comes in a tuple so that autograd does not see it as an input
        ctx.plan, ctx.grad_scale, ctx.num_local_rows = plan, grad_scale, local_weight.shape[0]
        return arrived[0] if arrived else plan.fetch(local_weight)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        if ctx.grad_scale != 1.0:
            grad_rows = grad_rows * ctx.grad_scale
        return ctx.plan.return_grads(grad_rows, ctx.num_local_rows), None, None, None


class _Prefetch:
    """A plan built and a row transfer started ahead of the forward, for the ids it was started with."""

    def __init__(self, ids: torch.Tensor, plan: RowExchange, rows: torch.Tensor, work):
        self.ids, self.version = ids, tensor_version(ids)  # None for inference tensors: they have no counter
        self.plan, self.rows, self.work = plan, rows, work

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
            not on the number of ranks, and each rank draws only its own rows. To start from a given dense
            table instead, use :meth:`from_dense`.
        average_grads: scale table gradients by ``1 / world_size`` (data parallelism with per-rank mean losses).
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
    ):
        if not dist.is_initialized():
            raise RuntimeError(
                "ShardedEmbedding needs an initialised process group: call "
                "torch.distributed.init_process_group (torchrun sets the environment for it)"
            )
        super().__init__(head_sizes, head_dim, init_std)
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.bounds = shard_bounds(self.num_rows, self.world_size)
        self.start, self.end = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.grad_scale = 1.0 / self.world_size if average_grads else 1.0
        if torch.device(device or "cpu").type == "meta":
            rows = torch.empty(self.end - self.start, self.head_dim, device="meta", dtype=dtype)
        else:
            rows = init_rows(self.start, self.end, self.head_dim, init_std, seed).to(device=device, dtype=dtype)
        self.weight = nn.Parameter(rows)
        self._pending: list[_Prefetch] = []

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
        return f"{super().extra_repr()}, rows [{self.start}, {self.end}), rank {self.rank} of {self.world_size}"

    def prefetch(self, ids: torch.Tensor) -> None:
        """Route ``ids`` now and start moving their rows; the forward with the same ids tensor takes them.

        Hash ids depend only on the tokens, so the model calls this before its first block: the id exchange
        happens then, and the row transfer runs while the blocks before this Engram layer compute.
        """
        self.check_ids(ids)
        plan = RowExchange(self.fused_ids(ids), self.bounds, self.group)
        rows, work = plan.fetch(self.weight, async_op=True)
        self._pending.append(_Prefetch(ids, plan, rows, work))

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
            plan, arrived = RowExchange(self.fused_ids(ids), self.bounds, self.group), ()
        else:
            plan, arrived = fetched.plan, (fetched.result(),)
        rows = _ExchangedRows.apply(self.weight, plan, self.grad_scale, arrived)
        return rows[plan.inverse].view(*ids.shape, self.head_dim)


def sharded_table_factory(
    group: dist.ProcessGroup | None = None, seed: int = 0, average_grads: bool = True
) -> Callable[[int, list[int], int, float], ShardedEmbedding]:
    """A ``table_factory`` for :class:`~engram.model.EngramLM` that builds every Engram table already sharded:
    rank r allocates and initialises only its rows, so no rank ever holds a whole table. Layer ``l``'s rows are
    drawn from seed ``seed + l``, as :func:`engram.storage.table_factory` draws them for offloaded tables."""

    def make(layer_id: int, head_sizes: list[int], head_dim: int, init_std: float) -> ShardedEmbedding:
        return ShardedEmbedding(
            head_sizes, head_dim, group=group, init_std=init_std, seed=seed + layer_id, average_grads=average_grads
        )

    return make
