"""Distributed training of Engram models, applied to a model from outside (torchtitan style).

* :mod:`~engram.distributed.exchange`: :class:`RowExchange`, the all-to-all routing of row ids, rows and row
  gradients between the owners of a row-sharded table (paper section 2, "Table sharding").
* :mod:`~engram.distributed.sharded_table`: :class:`ShardedEmbedding`, a drop-in for
  :class:`~engram.module.MultiHeadEmbedding` that holds one contiguous slice of the fused table per rank, on the
  device, in host memory or in the rank's own row file.
* :mod:`~engram.distributed.parallelize`: :func:`parallelize` (tables sharded, backbone FSDP2 or DDP) and the
  data-parallel helpers of a training step (global gradient clipping, MoE load sync).
* :mod:`~engram.distributed.checkpoint`: :class:`ShardedCheckpointManager`, checkpoints that store each rank's
  rows with their range and load onto any number of ranks; :func:`gather_full_state_dict`.
* :mod:`~engram.distributed.shard_journal`: :class:`ShardedTableJournals`, the row journals of each rank's
  host / disk shards, and resumes on another number of ranks.
* :mod:`~engram.distributed.train`: :func:`train_distributed`, what ``engram train`` runs under ``torchrun``.

See ``docs/distributed.md``.
"""

from .exchange import RowExchange, owners, shard_bounds
from .parallelize import (
    DATA_PARALLEL,
    apply_data_parallel,
    clip_grad_norm_,
    global_mean,
    parallelize,
    shard_engram_tables,
    sharded_tables,
    sync_expert_counts,
    unwrap,
)
from .shard_journal import ShardedTableJournals
from .sharded_table import ShardedEmbedding, sharded_table_factory

__all__ = [
    "DATA_PARALLEL",
    "RowExchange",
    "ShardedEmbedding",
    "ShardedTableJournals",
    "apply_data_parallel",
    "clip_grad_norm_",
    "global_mean",
    "owners",
    "parallelize",
    "shard_bounds",
    "shard_engram_tables",
    "sharded_table_factory",
    "sharded_tables",
    "sync_expert_counts",
    "unwrap",
]
