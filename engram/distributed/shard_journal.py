"""Row journals of a sharded model's host / disk shards, and resumes on another number of ranks.

Each rank's row shard of a host or disk table is checkpointed exactly like a single-process table: a
:class:`~engram.storage.journal.TableJournals` over the shard's :class:`~engram.storage.OffloadedEmbedding` and
its :class:`~engram.storage.SparseRowOptimizer` state, in the rank's own folder, so a checkpoint costs the rows
the rank's shard changed since the previous one::

    disk:  <table_dir>/rank{r}-of-{W}/layerNN.rows, layerNN.rows.rowstate, layerNN.rows.journal/
    host:  <out_dir>/tables/rank{r}-of-{W}/layerNN.shadow0.rows, layerNN.shadow1.rows, layerNN.journal/

The journal records of every rank go into the checkpoint (:class:`ShardedCheckpointManager`, one small file per
rank). A resume on the same W ranks reopens each rank's files and undoes them to the checkpoint
(:meth:`TableJournals.restore`). A resume on W' != W cannot reopen them: the rows are split differently. It

1. takes the W saved-layout files back to the checkpoint with their journals, saved rank r by new rank
   r mod W' (every file by exactly one process); a failure on any rank stops every rank;
2. copies each new rank's rows ``[start, end)`` and their row-optimizer state out of those files, chunk by chunk
   (:class:`ReslicedRows`), into its new shard, created fresh in ``rank{r}-of-{W'}`` with a fresh journal.

No process holds more than its own shard and one chunk. The saved-layout files must be visible to the new ranks
(one file system); they are left at the checkpoint's state, so a crash before the first checkpoint of the new
layout resumes from them again.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CheckpointError, EngramError
from ..module import Engram
from ..storage.journal import RowJournal, TableJournals, disk_journal_dir, shadow_files
from ..storage.optim import SparseRowOptimizer, row_state_path
from ..storage.tables import table_file_name
from ..storage.tiers import DiskRowStore, RowStore, chunk_rows_for, copy_in_chunks
from .exchange import shard_bounds
from .sharded_table import ShardedEmbedding, agree, rank_folder_name


class ReslicedRows:
    """Rows ``[start, end)`` of a table kept as per-rank row files (rank r's file holds ``[bounds[r],
    bounds[r + 1])``), read on demand: ``rows[a:b]`` reads rows ``start + a .. start + b`` from the files that hold
    them, mapped read-only."""

    def __init__(self, paths: list[Path], bounds: list[int], start: int, end: int, dim: int):
        self.paths, self.bounds, self.start, self.end = paths, bounds, start, end
        self.shape = (end - start, dim)
        self._stores: dict[int, DiskRowStore] = {}

    def _store(self, r: int) -> DiskRowStore:
        if r not in self._stores:
            rows = self.bounds[r + 1] - self.bounds[r]
            try:
                self._stores[r] = DiskRowStore(self.paths[r], readonly=True, num_rows=rows, dim=self.shape[1])
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot read the table shard {self.paths[r]}: {e}") from e
        return self._stores[r]

    def __getitem__(self, index: slice) -> torch.Tensor:
        a, b, stride = index.indices(self.shape[0])
        if stride != 1:
            raise IndexError("ReslicedRows reads contiguous row ranges only")
        lo, hi = self.start + a, self.start + max(a, b)
        pieces = []
        for r in range(len(self.bounds) - 1):
            first, last = max(lo, self.bounds[r]), min(hi, self.bounds[r + 1])
            if first < last:
                pieces.append(self._store(r).read_range(first - self.bounds[r], last - self.bounds[r]))
        return torch.cat(pieces) if pieces else torch.empty(0, self.shape[1])

    def copy_into(self, store: RowStore) -> None:
        """Write these rows into ``store`` (``[end - start, dim]``) chunk by chunk and flush it. The mapped pages
        of every chunk are dropped once it is copied (a disk destination's after it reached the file), so the
        process keeps one chunk of the files resident, not the table."""
        release = getattr(mmap, "MADV_DONTNEED", None)

        def write(a: int, values: torch.Tensor) -> None:
            store.write_range(a, values.to(store.dtype))
            if isinstance(store, DiskRowStore):
                store.flush()
                store.advise(release, a, a + values.shape[0])
            lo, hi = self.start + a, self.start + a + values.shape[0]
            for r, source in self._stores.items():
                first, last = max(lo, self.bounds[r]), min(hi, self.bounds[r + 1])
                if first < last:
                    source.advise(release, first - self.bounds[r], last - self.bounds[r])

        copy_in_chunks(lambda a, b: self[a:b], write, store.num_rows, chunk_rows_for(store.row_bytes))
        store.flush()


def offloaded_shards(model: nn.Module) -> dict[str, tuple[int, ShardedEmbedding]]:
    """``{state-dict key of the table: (layer_id, shard)}`` for every host / disk :class:`ShardedEmbedding`."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Engram) and isinstance(module.table, ShardedEmbedding) and module.table.local is not None:
            found[f"{name}.table.weight" if name else "table.weight"] = (module.layer_id, module.table)
    return found


class ShardedTableJournals:
    """The journals of this rank's host / disk shards, with the interface the trainer uses for
    :class:`~engram.storage.journal.TableJournals` (``checkpoint``, ``rows_left_out``, ``restore``, ``prune``,
    ``close``); see the module docstring.

    Args:
        model, table_opt: the sharded model and the row optimizer of its shards.
        tier: the shards' tier (``"host"`` or ``"disk"``).
        disk_dir: the disk tier's table folder (``train.table_dir``); host_dir: where host shards keep their
            shadows (``out_dir/tables``). Each rank works in its ``rank{r}-of-{W}`` subfolder.
        fresh: the shards were created, not reopened: a resume then re-slices another layout's files.
        group: the process group the tables are sharded over.
    """

    def __init__(
        self,
        model: nn.Module,
        table_opt: SparseRowOptimizer,
        *,
        tier: str,
        disk_dir: Path | None,
        host_dir: Path,
        fresh: bool,
        group: dist.ProcessGroup | None = None,
    ):
        self.group, self.tier, self.fresh = group, tier, fresh
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.disk_dir, self.host_dir = disk_dir, Path(host_dir)
        self.table_opt = table_opt
        self.shards = offloaded_shards(model)
        tables = {key: (layer_id, shard.local) for key, (layer_id, shard) in self.shards.items()}
        own = self.host_dir / rank_folder_name(self.rank, self.world_size)
        self.local = TableJournals(model, table_opt, own, fresh=fresh, tables=tables)

    def __bool__(self) -> bool:
        return bool(self.local)

    @contextlib.contextmanager
    def rows_left_out(self) -> Iterator[None]:
        with self.local.rows_left_out():
            yield

    def checkpoint(self, step: int) -> dict:
        return self.local.checkpoint(step)

    def prune(self, kept_steps: list[int]) -> None:
        self.local.prune(kept_steps)

    def close(self) -> None:
        self.local.close()

    def restore(self, step: int, saved: dict | None) -> None:
        """Bring this rank's shards to checkpoint ``step``: ``saved`` is the checkpoint's ``table_journal``
        (``{"world_size": W, "ranks": [records of rank r]}``, :meth:`ShardedCheckpointManager.load`). Collective."""
        if not saved or "ranks" not in saved:
            raise CheckpointError(
                f"the checkpoint of step {step} holds no table journal records for the sharded host / disk tables; "
                f"it was written with other table storage: resume with the tier the run started with"
            )
        world = int(saved["world_size"])
        if not self.fresh and world != self.world_size:
            raise CheckpointError(
                f"the tables were reopened for a resume on {self.world_size} ranks, but the checkpoint of step "
                f"{step} was saved by {world}; a resume on another number of ranks re-slices fresh shards"
            )
        error = None
        try:
            if not self.fresh:
                self.local.restore(step, saved["ranks"][self.rank])
            else:
                for r in range(self.rank, world, self.world_size):
                    self._restore_saved_rank(step, r, world, saved["ranks"][r])
        except (EngramError, OSError, ValueError) as e:  # this rank's own files: may differ between ranks
            error = e
        agree(error, self.group, f"take the table files of the {world}-rank layout back to step {step}")
        if self.fresh:
            try:
                self._reslice(world)
            except (EngramError, OSError, ValueError) as e:
                error = e
            agree(error, self.group, f"re-slice the {world}-rank table files of step {step}")

    # ------------------------------------------------------------------ resharding
    def _saved_files(self, layer_id: int, rank: int, world: int) -> tuple[list[Path], Path]:
        """The files of rank ``rank`` of a ``world``-rank layout (rows, row-optimizer state) and their journal."""
        if self.tier == "disk":
            rows = self.disk_dir / rank_folder_name(rank, world) / table_file_name(layer_id, "disk")
            return [rows, row_state_path(rows)], disk_journal_dir(rows)
        return shadow_files(self.host_dir / rank_folder_name(rank, world), f"layer{layer_id:02d}", 2)

    def _restore_saved_rank(self, step: int, rank: int, world: int, records: dict) -> None:
        for key, (layer_id, shard) in self.shards.items():
            bounds = shard_bounds(shard.num_rows, world)
            paths, folder = self._saved_files(layer_id, rank, world)
            rows, dims = bounds[rank + 1] - bounds[rank], (shard.head_dim, 2)
            missing = [str(p) for p in paths if not p.is_file()]
            if missing:
                raise CheckpointError(
                    f"the {world}-rank table files {missing} are missing; a resume on {self.world_size} ranks "
                    f"re-slices them (every rank must see the files of the run that saved the checkpoint)"
                )
            stores = [DiskRowStore(p, num_rows=rows, dim=d) for p, d in zip(paths, dims)]
            journal = RowJournal(folder, stores, fresh=False)
            try:
                journal.restore(step, records[key])
            finally:
                journal.close()

    def _reslice(self, world: int) -> None:
        """Copy this rank's rows and row-optimizer state from the restored ``world``-rank files."""
        states = {id(t): s for t, s in zip(self.table_opt.tables, self.table_opt.row_state)}
        for key, (layer_id, shard) in self.shards.items():
            bounds = shard_bounds(shard.num_rows, world)
            files = [self._saved_files(layer_id, r, world)[0] for r in range(world)]
            shard.local.wait_for_prefetches()
            for i, (store, dim) in enumerate([(shard.local.store, shard.head_dim), (states[id(shard.local)], 2)]):
                ReslicedRows([f[i] for f in files], bounds, shard.start, shard.end, dim).copy_into(store)
