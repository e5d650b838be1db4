"""``engram train`` under ``torchrun``: the trainer's one loop with the :class:`DataParallel` plan.

    torchrun --nproc_per_node 8 $(which engram) train --config run.yaml
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 $(which engram) train ...

:func:`engram.train.trainer.train` runs the same steps, evaluations, checkpoints and metrics; the plan changes:

* ``train.batch_size`` is the *global* batch. Every rank draws the same start offsets for all of it and keeps
  its own ``batch_size / world_size`` rows (:func:`~engram.train.data.random_batch` with ``rank``), so the
  data a step sees does not depend on the number of ranks, and a run resumed on another number of ranks
  continues on the same batches.
* The Engram tables are built sharded (:func:`sharded_table_factory`, each rank initialises only its rows, in
  ``train.table_tier``: device, host or its own disk files) and the backbone is data-parallel
  (``train.data_parallel``: FSDP2 or DDP); see :mod:`.parallelize`.
* Gradient clipping uses the global norm, MoE expert loads are summed over ranks before the bias update, the
  logged loss is the global-batch mean, and an interrupt on any rank stops every rank at the same step.
* Checkpoints are :class:`ShardedCheckpointManager` directories (resumable on any number of ranks); host and
  disk shards are checkpointed by each rank's row journals (:mod:`.shard_journal`).
* Evaluation runs the same validation batches on every rank (the sharded tables need every rank in each
  lookup), so every rank gets the numbers a single process would.
* Rank 0 owns the run folder (its lock, config, metrics) and at the end gathers the model and writes the usual
  ``model/`` folder (``engram eval`` / ``generate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..files import FileLock, LockedError
from ..model.model import EngramLM, TableFactory
from ..model.tables import TABLES_DIR
from ..storage import DiskRowStore, OffloadedEmbedding, SparseRowOptimizer
from ..storage.tables import table_file_name
from ..storage.tiers import row_file_writer
from ..train.data import TextTokenizer, TokenizedCorpus, random_batch
from ..train.trainer import (
    RunConfig,
    SingleProcess,
    TrainConfig,
    TrainResult,
    build_model,
    disk_table_dir,
    prepare_data,
    table_journal_dir,
    train,
)
from .checkpoint import ShardedCheckpointManager, gather_full_state_dict, send_rows_to_rank0, shard_tier
from .parallelize import apply_data_parallel, clip_grad_norm_, global_mean, sharded_tables, sync_expert_counts
from .shard_journal import ShardedTableJournals, offloaded_shards
from .sharded_table import agree, sharded_table_factory


def launched_distributed() -> bool:
    """True when a launcher (``torchrun``) started this process as one rank of a job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """True outside a distributed job and on its rank 0: the process that prints and writes shared files."""
    return os.environ.get("RANK", "0") == "0"


def init_distributed(device_spec: str = "auto") -> torch.device:
    """Join the job's process group (from torchrun's environment) unless already in one; returns this rank's
    device: ``cuda:LOCAL_RANK`` with ``nccl`` where CUDA is available (or asked for), else the CPU with ``gloo``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_spec == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_spec)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if not launched_distributed():
            raise RuntimeError(
                "no process group: launch with torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR, ...) "
                "or call torch.distributed.init_process_group first"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=timedelta(minutes=30), device_id=device if device.type == "cuda" else None
        )
    return device


class DataParallel(SingleProcess):
    """The plan of one rank of a torchrun job (module docstring). Joins the process group on construction
    (unless one exists) and leaves it on :meth:`close` if it joined it."""

    def __init__(self, tcfg: TrainConfig):
        self.owns_group = not dist.is_initialized()
        self.device = init_distributed(tcfg.device)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if tcfg.batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size ({tcfg.batch_size}) is the global batch and must divide evenly "
                f"over {self.world_size} ranks"
            )
        self.data_parallel = tcfg.data_parallel
        self.table_group: dist.ProcessGroup | None = None

    def label(self, family: str) -> str:
        return f"{family} x{self.world_size}"

    def lock_run_folder(self, out: Path) -> FileLock | None:
        """Rank 0 takes the lock; every rank learns whether it got it (no rank is left waiting on a refusal)."""
        lock, error = None, None
        if self.rank == 0:
            try:
                lock = super().lock_run_folder(out)
            except LockedError as e:
                error = e
        ok = torch.tensor([0.0 if error is not None else 1.0])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is not None:
            raise error
        if not ok.item():
            raise LockedError(f"rank 0 could not take the lock of run folder {out}; see its error")
        return lock

    def prepare_data(self, tcfg: TrainConfig) -> tuple[TextTokenizer, TokenizedCorpus]:
        """Rank 0 first (it fills the tokenizer / token caches), then the others read them."""
        tcfg = dataclasses.replace(tcfg, progress=tcfg.progress and self.rank == 0)
        if self.rank != 0:
            dist.barrier()
        result = prepare_data(tcfg)
        if self.rank == 0:
            dist.barrier()
        return result

    def reopens_tables(self, ckpt: ShardedCheckpointManager, resume_at: int | None) -> bool:
        """A resume reopens the ranks' host / disk shard files when the checkpoint was saved on as many ranks;
        on another number of ranks the shards are created fresh and re-sliced from the saved layout's files
        (:mod:`.shard_journal`). Every rank reads the same meta.json: the same answer."""
        if resume_at is None:
            return False
        saved = ckpt.meta(resume_at).get("sharded_tables") or {}
        return saved.get("world_size") == self.world_size

    def table_factory(self, tcfg: TrainConfig, reopen: bool = False) -> TableFactory | None:
        """Tables sharded over the ranks, each rank's rows in ``train.table_tier``; disk shards in
        ``<table_dir>/rank{r}-of-{W}/layerNN.rows`` (``reopen``: opened as they are, for a resume)."""
        self.table_group = dist.new_group(backend=dist.get_backend())  # table all-to-alls never queue behind DP
        return sharded_table_factory(
            self.table_group,
            seed=tcfg.seed,
            tier=tcfg.table_tier,
            path_dir=disk_table_dir(tcfg),
            cache_bytes=tcfg.table_cache_bytes,
            overwrite=True,
            reopen=reopen,
        )

    def table_journals(
        self, model: EngramLM, table_opt: SparseRowOptimizer, tcfg: TrainConfig, fresh: bool
    ) -> ShardedTableJournals:
        """Each rank's journals of its own shards, in its ``rank{r}-of-{W}`` folders."""
        return ShardedTableJournals(
            model,
            table_opt,
            tier=tcfg.table_tier,
            disk_dir=disk_table_dir(tcfg),
            host_dir=table_journal_dir(tcfg),
            fresh=fresh,
            group=self.table_group,
        )

    def wrap(self, model: EngramLM) -> torch.nn.Module:
        return apply_data_parallel(model, self.data_parallel, device=self.device)

    def batch(self, tokens, tcfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return random_batch(
            tokens, tcfg.batch_size // self.world_size, tcfg.seq_len, gen, rank=self.rank, world_size=self.world_size
        )

    def clip_grad_norm(self, model: EngramLM, params: list, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(model, max_norm)

    def sync_expert_counts(self, model: EngramLM) -> None:
        sync_expert_counts(model)

    def loss_value(self, loss: torch.Tensor) -> float:
        return global_mean(loss)

    def agree_to_stop(self, stop: bool, signum: int | None) -> tuple[bool, int | None]:
        """A signal seen by one rank stops them all at this step (and names the signal on every rank)."""
        flag = torch.tensor([float(stop), float(signum or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0].item()), int(flag[1].item()) or None

    def barrier(self) -> None:
        dist.barrier()

    def checkpoints(self, directory: Path, keep_last: int) -> ShardedCheckpointManager:
        return ShardedCheckpointManager(directory, keep_last=keep_last)

    def save_checkpoint(self, ckpt, step: int, model: EngramLM, optimizers: list, state: dict[str, Any]) -> None:
        ckpt.save(step, model, optimizers, state)

    def load_checkpoint(self, ckpt, step: int, model: EngramLM, optimizers: list) -> dict:
        return ckpt.load(model, optimizers, step)

    def final_model(self, model: EngramLM, run: RunConfig, tok: TextTokenizer) -> EngramLM | None:
        """Rank 0: the gathered single-process model; the other ranks: None (collective).

        Device shards are gathered into rank 0's memory. Host and disk shards are streamed, chunk by chunk, into
        disk tables of the exported model (``model/tables/layerNN.rows``, opened in place by ``load_model``) with
        plain file writes: no process ever holds a whole table, but rank 0's disk holds all of it."""
        tables = sharded_tables(model)
        if shard_tier(tables) == "device":
            full = gather_full_state_dict(model)
            if self.rank != 0:
                return None
            gathered = build_model(run.model, tok)
            gathered.load_state_dict(full)
            return gathered
        backbone = gather_full_state_dict(model, offloaded=False)
        folder = Path(run.train.out_dir) / "model" / TABLES_DIR
        for layer_id, shard in offloaded_shards(model).values():
            with contextlib.ExitStack() as files:
                write, error = None, None
                if self.rank == 0:
                    try:  # the other ranks must not wait to send their rows to a file that cannot be made
                        folder.mkdir(parents=True, exist_ok=True)
                        path = folder / table_file_name(layer_id, "disk")
                        dtype = shard.local_rows().dtype
                        write = files.enter_context(row_file_writer(path, shard.num_rows, shard.head_dim, dtype))
                    except (OSError, ValueError) as e:
                        error = e
                agree(error, self.table_group, "create the exported model's table files")
                send_rows_to_rank0(shard, write)
        if self.rank != 0:
            return None
        gathered = build_model(run.model, tok, _exported_tables(folder))
        result = gathered.load_state_dict(backbone, strict=False)
        missing = set(result.missing_keys) - {f"{n}.weight" for n in tables}
        if missing or result.unexpected_keys:
            raise ValueError(f"the gathered state does not fit the model: {missing}, {result.unexpected_keys}")
        return gathered

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _exported_tables(folder: Path) -> TableFactory:
    """The disk tables :meth:`DataParallel.final_model` wrote to ``folder/layerNN.rows``, opened in place (where
    :func:`engram.model.save_model` keeps them)."""

    def make(layer_id: int, head_sizes: list[int], head_dim: int, init_std: float) -> OffloadedEmbedding:
        path = folder / table_file_name(layer_id, "disk")
        store = DiskRowStore(path, num_rows=sum(head_sizes), dim=head_dim)
        return OffloadedEmbedding(head_sizes, head_dim, store, init_std=init_std)

    return make


def train_distributed(
    run: RunConfig,
    *,
    data: tuple[TextTokenizer, TokenizedCorpus] | None = None,
    stop_after: int | None = None,
    desc: str | None = None,
    on_eval: Callable[[dict], None] | None = None,
) -> TrainResult:
    """One rank's part of a data-parallel run with row-sharded Engram tables (module docstring).

    Arguments and result as :func:`engram.train.trainer.train`. ``result.model`` is, on rank 0 after a finished
    run, the gathered single-process model; otherwise this rank's sharded model.
    """
    return train(run, data=data, stop_after=stop_after, desc=desc, on_eval=on_eval, plan=DataParallel(run.train))
