"""Apply parallelism to an :class:`~engram.model.EngramLM` from outside: the model code never changes.

``parallelize(model, data_parallel="fsdp")`` does two things, in this order:

1. :func:`shard_engram_tables`: every Engram table becomes a :class:`ShardedEmbedding` holding this rank's rows
   (model parallelism for the memory, paper section 2), with all table all-to-alls on a process group of their
   own.
2. :func:`apply_data_parallel`: the rest of the model (the backbone, and the Engram projections, norms and conv)
   is data-parallel, either FSDP2 (``fully_shard`` per block, then the root) or DDP. The sharded table rows are
   excluded from both: they are not replicas.

The helpers a training step needs under data parallelism live here too: :func:`clip_grad_norm_` (one global
norm over replicated, FSDP-sharded and row-sharded gradients), :func:`sync_expert_counts` (MoE load summed over
ranks before the bias update) and :func:`global_mean`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .._compat import ddp_ignore
from ..module import Engram, MultiHeadEmbedding
from .sharded_table import ShardedEmbedding

DATA_PARALLEL = ("fsdp", "ddp")


def sharded_tables(model: nn.Module) -> dict[str, ShardedEmbedding]:
    """``{module name: table}`` for every :class:`ShardedEmbedding` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ShardedEmbedding)}


def shard_engram_tables(
    model: nn.Module, group: dist.ProcessGroup | None = None, average_grads: bool = True
) -> nn.Module:
    """Replace each Engram layer's dense table by this rank's :class:`ShardedEmbedding` slice of it, in place.

    Every rank must pass an identical model (same seed): rank r keeps rows ``[start_r, end_r)`` of each table
    and frees the rest, so the sharded model computes exactly what the dense one did.
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, Engram) or isinstance(module.table, ShardedEmbedding):
            continue
        table = module.table
        if not isinstance(table, MultiHeadEmbedding):
            raise TypeError(
                f"{name}.table is a {type(table).__name__}; only dense MultiHeadEmbedding tables can be "
                f"sharded (an offloaded table already lives outside the device)"
            )
        module.table = ShardedEmbedding.from_dense(table, group=group, average_grads=average_grads)
    return model


def apply_data_parallel(
    model: nn.Module, mode: str = "fsdp", group: dist.ProcessGroup | None = None, device: torch.device | None = None
) -> nn.Module:
    """Make everything but the sharded tables data-parallel; returns the module to call for training.

    ``"fsdp"``: FSDP2 ``fully_shard`` on each block and on the root, in place (the model object itself is
    returned). ``"ddp"``: ``DistributedDataParallel`` around the model (call the returned wrapper, keep
    ``model`` for everything else). Gradients are averaged over ranks in both.
    """
    if mode not in DATA_PARALLEL:
        raise ValueError(f"data_parallel must be one of {DATA_PARALLEL}, got {mode!r}")
    device = device or next(model.parameters()).device
    tables = sharded_tables(model)
    table_params = {p for t in tables.values() for p in t.parameters()}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_ignore(model, [f"{name}.{p}" for name, t in tables.items() for p, _ in t.named_parameters()])
        # no buffer broadcast: the only training-time buffers (MoE biases) stay equal via sync_expert_counts
        return DDP(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            process_group=group,
            forward_sync_buffers=False,
        )
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    if group is None:
        group = dist.group.WORLD
    mesh = DeviceMesh.from_group(group, device.type)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, ignored_params={p for p in block.parameters() if p in table_params})
    fully_shard(model, mesh=mesh, ignored_params=table_params)
    return model


def parallelize(
    model: nn.Module,
    data_parallel: str = "fsdp",
    group: dist.ProcessGroup | None = None,
    table_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Shard the Engram tables over ``table_group`` (default: a new group of all ranks), then make the rest
    data-parallel over ``group``. Returns the module to call in training (see :func:`apply_data_parallel`)."""
    if table_group is None:
        table_group = dist.new_group(backend=dist.get_backend(group))
    shard_engram_tables(model, table_group)
    return apply_data_parallel(model, data_parallel, group)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place, so its model is already the module)."""
    return getattr(module, "module", module)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale all gradients so that their joint L2 norm over the *whole* distributed model is at most ``max_norm``
    (``<= 0``: measure only); returns the norm before clipping, the same on every rank.

    Replicated gradients (DDP) count once; FSDP2 shards (DTensor) and table row shards are disjoint pieces of
    one gradient, so their squares are summed over ranks. The row gradients a host / disk shard captured (no
    parameters: :meth:`~engram.storage.OffloadedEmbedding.row_grad_tensors`) are row shards too, and are scaled
    with the rest, so its :class:`~engram.storage.SparseRowOptimizer` steps with the clipped gradient. Equals
    ``torch.nn.utils.clip_grad_norm_`` of the unsharded model up to summation order.
    """
    from torch.distributed.tensor import DTensor

    tables = sharded_tables(model).values()
    row_grads = [leaf for t in tables if t.local is not None for leaf in t.local.row_grad_tensors()]
    table_params = {p for t in tables for p in t.parameters()} | set(row_grads)
    params = [p for p in model.parameters() if p.grad is not None] + row_grads
    device = params[0].grad.device if params else torch.device("cpu")
    local = torch.zeros((), dtype=torch.float64, device=device)  # sum of squares of this rank's pieces
    replicated = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        g = p.grad
        if isinstance(g, DTensor):
            local += g.to_local().double().square().sum()
        elif p in table_params:
            local += g.double().square().sum()
        else:
            replicated += g.double().square().sum()
    dist.all_reduce(local, group=group)
    total = (local + replicated).sqrt().float()
    limit = float(max_norm) if max_norm > 0 else math.inf
    coef = torch.clamp(limit / (total + 1e-6), max=1.0)
    if coef < 1.0:
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.dtype))
    return total


@torch.no_grad()
def sync_expert_counts(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Sum every MoE layer's ``expert_counts`` over ranks, so that ``update_bias`` sees the global batch's load
    (and every rank takes the same bias step)."""
    from ..model.ffn import MoE

    for m in model.modules():
        if isinstance(m, MoE):
            dist.all_reduce(m.expert_counts, group=group)


def global_mean(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> float:
    """Mean of a per-rank scalar over ranks (the global-batch loss when every rank holds as many tokens)."""
    v = value.detach().double().reshape(1).clone()
    dist.all_reduce(v, group=group)
    return float(v) / dist.get_world_size(group)
