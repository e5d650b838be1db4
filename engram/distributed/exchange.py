"""The all-to-all row exchange of a row-sharded table (paper section 2, "Table sharding"; section 5).

Rank r owns the contiguous rows ``[bounds[r], bounds[r + 1])`` of the fused table. For one batch of fused row ids
each rank does::

    U, inv    = unique(ids)                      duplicates never travel; U is sorted, so it is grouped by owner
    send[o]   = |{u in U : owner(u) = o}|        how many rows this rank asks of owner o
    recv      = all_to_all(send)                 how many rows each rank asks of this one
    asked     = all_to_all(U; send -> recv)      the row ids asked of this rank, grouped by asking rank
    rows      = all_to_all(W_local[asked - start]; recv -> send)      forward: owners reply with their rows
    grad_W   += index_add(asked, all_to_all(dL/drows; send -> recv))  backward: the same route reversed

``rows[inv]`` are the requested rows in the order of ``ids``. All four transfers are ``all_to_all_single``
with uneven splits, which both ``gloo`` (CPU) and ``nccl`` (GPU) implement in torch 2.13. The two small
transfers (counts, ids) form the :class:`RowExchange` plan; a plan can be built before the forward pass
(ids depend only on the tokens) and reused by its backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def shard_bounds(num_rows: int, world_size: int) -> list[int]:
    """Row boundaries of ``world_size`` contiguous shards of ``num_rows`` rows: rank r owns
    ``[b[r], b[r + 1])``; shard sizes differ by at most one row (the first ``num_rows % world_size`` are longer)."""
    if num_rows < 0 or world_size <= 0:
        raise ValueError(f"need num_rows >= 0 and world_size > 0, got {num_rows}, {world_size}")
    return [(r * num_rows) // world_size for r in range(world_size + 1)]


def owners(row_ids: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """The rank that owns each fused row id under ``bounds`` (see :func:`shard_bounds`)."""
    inner = torch.tensor(bounds[1:-1], dtype=row_ids.dtype, device=row_ids.device)
    return torch.bucketize(row_ids, inner, right=True)


class RowExchange:
    """The routing plan of one batch of row ids: who asks whom for which rows (module docstring).

    Building it costs two small all-to-alls (the per-owner counts and the deduplicated ids) and one host sync
    (the counts become the split sizes). Then :meth:`send_rows` (:meth:`fetch` for a local weight tensor) moves
    rows owner -> requester and :meth:`return_row_grads` (:meth:`return_grads`, summed into a dense local
    gradient) moves row gradients requester -> owner. Every rank of ``group`` must build its plan, and make
    these transfers, in the same order: they are collectives.
    """

    def __init__(self, row_ids: torch.Tensor, bounds: list[int], group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        if len(bounds) != world + 1:
            raise ValueError(f"bounds describe {len(bounds) - 1} shards, the process group has {world} ranks")
        self.unique, self.inverse = torch.unique(row_ids.reshape(-1), sorted=True, return_inverse=True)
        send = torch.bincount(owners(self.unique, bounds), minlength=world)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        self.send_counts: list[int] = send.tolist()  # rows this rank asks of each owner
        self.recv_counts: list[int] = recv.tolist()  # rows each rank asks of this one
        asked = self.unique.new_empty(sum(self.recv_counts))
        dist.all_to_all_single(asked, self.unique, self.recv_counts, self.send_counts, group=group)
        self.served = asked - bounds[self.rank]  # local rows this rank serves, grouped by asking rank

    @property
    def num_unique(self) -> int:
        return self.unique.numel()

    def fetch(self, local_weight: torch.Tensor, async_op: bool = False):
        """Rows ``[U, dim]`` of the unique ids, each from its owner's ``local_weight``.

        With ``async_op`` returns ``(rows, work)``; the rows are valid after ``work.wait()``.
        """
        return self.send_rows(local_weight.detach().index_select(0, self.served), async_op)

    def send_rows(self, replies: torch.Tensor, async_op: bool = False):
        """The forward transfer given the rows this rank serves, ``replies [len(served), dim]`` (its local rows
        ``served``, however it read them: a parameter, a host or disk store): returns the rows ``[U, dim]`` of
        the unique ids (with ``async_op``, ``(rows, work)``)."""
        rows = replies.new_empty(self.num_unique, replies.shape[1])
        work = dist.all_to_all_single(
            rows, replies.contiguous(), self.send_counts, self.recv_counts, group=self.group, async_op=async_op
        )
        return (rows, work) if async_op else rows

    def return_grads(self, grad_rows: torch.Tensor, num_local_rows: int) -> torch.Tensor:
        """Send ``grad_rows [U, dim]`` (one row per unique id) back to the owners; returns this rank's dense
        local gradient ``[num_local_rows, dim]``, where rows asked by several ranks sum their gradients."""
        arrived = self.return_row_grads(grad_rows)
        return grad_rows.new_zeros(num_local_rows, grad_rows.shape[1]).index_add_(0, self.served, arrived)

    def return_row_grads(self, grad_rows: torch.Tensor) -> torch.Tensor:
        """The backward transfer: send ``grad_rows [U, dim]`` back to the owners; returns the gradients of the
        rows this rank served, ``[len(served), dim]`` in the order of ``served`` (not yet summed per row)."""
        arrived = grad_rows.new_empty(self.served.numel(), grad_rows.shape[1])
        dist.all_to_all_single(arrived, grad_rows.contiguous(), self.recv_counts, self.send_counts, group=self.group)
        return arrived

    def bytes_moved(self, head_dim: int, value_bytes: int, id_bytes: int = 8) -> dict[str, int]:
        """Bytes this rank sends to *other* ranks for this plan (its own shard is a local copy):
        ``ids`` (requests), ``rows`` (forward replies it serves), ``grads`` (backward, to the owners)."""
        own = self.rank
        asked_remote = sum(c for r, c in enumerate(self.send_counts) if r != own)
        served_remote = sum(c for r, c in enumerate(self.recv_counts) if r != own)
        return {
            "ids": asked_remote * id_bytes,
            "rows": served_remote * head_dim * value_bytes,
            "grads": asked_remote * head_dim * value_bytes,
        }
