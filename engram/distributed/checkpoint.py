"""Checkpoints of a distributed run: the backbone unsharded, the Engram tables as the row slices their owners hold.

Layout of one step directory (same atomic protocol and manifest as :class:`engram.train.CheckpointManager`)::

    step_00001000/
        model.safetensors                        backbone tensors, full (gathered from FSDP shards), rank 0
        state.pt                                 backbone optimizers (full, keyed by parameter name), table
                                                 optimizer hyper-parameters, schedule, data generator, rng
        meta.json                                step, config, extra, and "sharded_tables": the world size and
                                                 tier of the save and every table's size and row boundaries
        tables/rank00000-of-00002.safetensors    device shards: rank 0's rows of every table, and its
        tables/rank00001-of-00002.safetensors    table-optimizer state for those rows (Adam moments, RowWiseAdam
                                                 per-row state)
        tables/rank00000-of-00002.journal.pt     host / disk shards: rank 0's table-journal records, no rows
                                                 (the rows stay in the rank's live files, journaled:
                                                 :mod:`engram.distributed.shard_journal`)
        manifest.json                            sha256 and size of all of the above; written last

Each rank writes its own table file; rank 0 writes the rest, then the manifest, then renames the directory into
place and moves ``latest``. The directory must be on a file system every rank sees.

Loading re-slices device shards: a rank that now owns rows ``[start, end)`` reads exactly those rows (and their
optimizer state) from whichever saved files hold them, so a run saved on W ranks resumes on any W'. Host and disk
shards return every rank's journal records (``state["table_journal"]``), with which
:class:`~engram.distributed.shard_journal.ShardedTableJournals` restores (and, on another number of ranks,
re-slices) the live files. The backbone is saved whole, so it loads onto any data-parallel layout (FSDP2 or DDP,
any size). A checkpoint loads into shards of the tier it was saved from; a rank that finds its files missing or
corrupt makes every rank raise (no rank is left waiting in a collective).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..files import fsync_dir, fsync_file, set_file_mode, sha256_file
from ..storage.tiers import chunk_rows_for, to_device
from ..train.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    _tensors_for_safetensors,
    read_manifest,
    verify_files,
    write_manifest,
)
from .parallelize import sharded_tables
from .sharded_table import ShardedEmbedding, agree, rank_folder_name

TABLES_DIR = "tables"
_STATE_SEP = "::"  # "<table param name>::<optimizer state key>" in a table file


def table_file_name(rank: int, world_size: int) -> str:
    return f"{TABLES_DIR}/{rank_folder_name(rank, world_size)}.safetensors"


def journal_file_name(rank: int, world_size: int) -> str:
    """A host / disk shard's checkpoint file: the rank's table-journal records (no rows)."""
    return f"{TABLES_DIR}/{rank_folder_name(rank, world_size)}.journal.pt"


def _table_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{"blocks.1.engram.table.weight": local rows}`` for every device-tier sharded table."""
    return {f"{name}.weight": t.weight for name, t in sharded_tables(model).items() if t.local is None}


def shard_tier(tables: dict[str, ShardedEmbedding]) -> str:
    """The tier all sharded tables of a model live in (``"device"`` for a model without any)."""
    tiers = {t.tier for t in tables.values()}
    if len(tiers) > 1:
        raise ValueError(f"the sharded tables live in several tiers ({sorted(tiers)}); checkpoints need one")
    return tiers.pop() if tiers else "device"


def _split_optimizers(optimizers: list[torch.optim.Optimizer], table_params: dict[str, nn.Parameter]) -> list[bool]:
    """Which optimizers train table rows (they must train nothing else)."""
    ids = {id(p) for p in table_params.values()}
    flags = []
    for opt in optimizers:
        mine = [id(p) in ids for g in opt.param_groups for p in g["params"]]
        if any(mine) and not all(mine):
            raise ValueError(
                "an optimizer mixes sharded table rows with replicated parameters; give the tables an "
                "optimizer of their own (build_optimizers does)"
            )
        flags.append(bool(mine) and all(mine))
    return flags


def _check_journaled(state: dict[str, Any], journal: dict | None) -> None:
    """Host / disk shards are checkpointed by their journals: the state must carry this rank's journal records
    and no row state (see :mod:`engram.distributed.shard_journal`)."""
    rows_inside = (state.get("table_optimizer") or {}).get("row_state") is not None
    if journal is None or rows_inside:
        raise ValueError(
            "host / disk table shards are checkpointed by their row journals: save inside "
            "ShardedTableJournals.rows_left_out(), with its checkpoint(step) record as state['table_journal'] "
            "(the trainer does)"
        )


class ShardedCheckpointManager(CheckpointManager):
    """Save and load distributed training state (module docstring). ``save`` and ``load`` are collectives:
    every rank of ``group`` calls them with its own model and optimizers."""

    def __init__(
        self, directory: str | os.PathLike[str], keep_last: int | None = 3, group: dist.ProcessGroup | None = None
    ):
        super().__init__(directory, keep_last)
        self.group = group

    # ------------------------------------------------------------------ save
    def save(
        self,
        step: int,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],  # type: ignore[override]
        state: dict[str, Any] | None = None,
    ) -> Path:
        """Write checkpoint ``step``: ``model`` (the unwrapped model), its ``optimizers``, and ``state`` (other
        picklable keys; ``"config"`` and ``"extra"`` go to meta.json). Returns the step directory."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        state = dict(state or {})
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        tables = sharded_tables(model)
        tier = shard_tier(tables)
        params = _table_params(model)
        is_table_opt = _split_optimizers(optimizers, params)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        backbone = {k: v for k, v in get_model_state_dict(model, options=full).items() if k not in params}
        opt_states = [
            self._table_optimizer_groups(o, params) if t else get_optimizer_state_dict(model, o, options=full)
            for o, t in zip(optimizers, is_table_opt)
        ]
        journal = state.pop("table_journal", None)
        if tier != "device":
            _check_journaled(state, journal)

        final = self.directory / self.step_dir_name(step)
        tmp = self.directory / f".tmp-{final.name}-sharded"
        if rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.remove_stale()
            (tmp / TABLES_DIR).mkdir(parents=True)
        dist.barrier(group=self.group)

        error, info = None, {}
        try:  # this rank's own table file (disk full, ...): every rank must learn of a failure
            if tier == "device":
                name = self._save_device_shards(tmp, rank, world, tables, params, optimizers, is_table_opt)
            else:
                name = journal_file_name(rank, world)
                torch.save(journal, tmp / name)
            set_file_mode(tmp / name)
            fsync_file(tmp / name)
            info = {name: {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size}}
        except Exception as e:
            error = e
        agree(error, self.group, f"write its table file of checkpoint {final.name}", CheckpointError)
        infos: list[Any] = [None] * world
        dist.all_gather_object(infos, info, group=self.group)

        if rank == 0:
            try:
                save_file(_tensors_for_safetensors(backbone), str(tmp / MODEL_FILE))
                meta = {
                    "step": int(step),
                    "config": state.pop("config", None),
                    "extra": state.pop("extra", None),
                    "sharded_tables": {
                        "world_size": world,
                        "tier": tier,
                        "files": [next(iter(i)) for i in infos],
                        "tables": {
                            f"{n}.weight": {"num_rows": t.num_rows, "head_dim": t.head_dim, "bounds": t.bounds}
                            for n, t in tables.items()
                        },
                    },
                }
                (tmp / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
                torch.save({**state, "optimizers": opt_states}, tmp / STATE_FILE)
                write_manifest(
                    tmp, step, (MODEL_FILE, META_FILE, STATE_FILE), known={k: v for i in infos for k, v in i.items()}
                )
                fsync_dir(tmp / TABLES_DIR)
                self.publish(tmp, final)
            except Exception as e:  # the other ranks must learn of it, not wait for rank 0
                shutil.rmtree(tmp, ignore_errors=True)
                error = e
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        agree(error, self.group, f"publish checkpoint {final.name}", CheckpointError)
        return final

    @staticmethod
    def _save_device_shards(tmp, rank, world, tables, params, optimizers, is_table_opt) -> str:
        """This rank's rows of every device table and their optimizer state, as one safetensors file."""
        name = table_file_name(rank, world)
        tensors: dict[str, torch.Tensor] = {}
        for pname, p in params.items():
            tensors[pname] = p.detach()
            for o, t in zip(optimizers, is_table_opt):
                if t and p in o.state:
                    for k, v in o.state[p].items():
                        if isinstance(v, torch.Tensor):
                            tensors[f"{pname}{_STATE_SEP}{k}"] = v
        ranges = {f"{n}.weight": [t.start, t.end] for n, t in tables.items()}
        save_file(
            _tensors_for_safetensors(tensors),
            str(tmp / name),
            metadata={"rank": str(rank), "world_size": str(world), "ranges": json.dumps(ranges)},
        )
        return name

    @staticmethod
    def _table_optimizer_groups(opt: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> dict[str, Any]:
        """The table optimizer's hyper-parameters, with parameters named (their state is in the table files)."""
        names = {id(p): n for n, p in params.items()}
        return {
            "param_groups": [
                {**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                for g in opt.param_groups
            ]
        }

    # ------------------------------------------------------------------ load
    def load(
        self,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],  # type: ignore[override]
        which: str | int | os.PathLike[str] = "latest",
    ) -> dict[str, Any]:
        """Load a checkpoint saved on any number of ranks into ``model`` and ``optimizers`` (in place); returns
        the other state (``step``, ``config``, ``extra``, schedule, data generator, rng; for host / disk shards
        ``table_journal``, every saved rank's journal records, for :meth:`ShardedTableJournals.restore`)."""
        folder = self.resolve(which)
        files = read_manifest(folder)
        verify_files(folder, files, [META_FILE, STATE_FILE, MODEL_FILE])
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        saved = meta.get("sharded_tables")
        if saved is None:
            raise CheckpointError(
                f"{folder} was written by the single-process trainer (no sharded tables); resume "
                f"it with a plain `engram train`, or start this run in a new train.out_dir"
            )
        params = _table_params(model)
        tables = sharded_tables(model)
        tier, saved_tier = shard_tier(tables), saved.get("tier", "device")
        if tier != saved_tier:
            raise CheckpointError(
                f"{folder} holds {saved_tier}-tier table shards, this model's are {tier}-tier; resume with "
                f"train.table_tier={saved_tier} (the tier the run started with)"
            )
        names = {f"{n}.weight" for n in tables}
        if set(saved["tables"]) != names:
            raise CheckpointError(f"{folder} holds tables {sorted(saved['tables'])}, the model has {sorted(names)}")
        for n, t in tables.items():
            s = saved["tables"][f"{n}.weight"]
            if (s["num_rows"], s["head_dim"]) != (t.num_rows, t.head_dim):
                raise CheckpointError(
                    f"{folder}: table {n} was saved as {s['num_rows']} x {s['head_dim']} rows, the "
                    f"model's is {t.num_rows} x {t.head_dim}"
                )
            if len(s["bounds"]) != saved["world_size"] + 1 or len(saved["files"]) != saved["world_size"]:
                raise CheckpointError(
                    f"{folder}: meta.json says {saved['world_size']} ranks saved it, but lists "
                    f"{len(saved['files'])} rank files and {len(s['bounds']) - 1} shards of table {n}"
                )
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        if len(state["optimizers"]) != len(optimizers):
            raise CheckpointError(
                f"{folder} holds {len(state['optimizers'])} optimizer states, the run has {len(optimizers)} optimizers"
            )
        # every check above read the same shared files on every rank; the table files differ by rank
        error = None
        try:  # a host / disk resume reads every rank's journal records (small): a resharded one needs them all
            needed = self._device_files_needed(saved, tables) if tier == "device" else saved["files"]
            verify_files(folder, files, needed)
        except CheckpointError as e:
            error = e
        agree(error, self.group, f"load {folder}", CheckpointError)

        full = StateDictOptions(full_state_dict=True, strict=False)
        result = set_model_state_dict(model, load_file(str(folder / MODEL_FILE)), options=full)
        missing = sorted(set(result.missing_keys) - set(params))
        if missing or result.unexpected_keys:
            raise CheckpointError(
                f"{folder}: backbone state does not fit the model (missing {missing}, "
                f"unexpected {sorted(result.unexpected_keys)})"
            )
        is_table_opt = _split_optimizers(optimizers, params)
        table_state = self._load_table_rows(folder, saved, tables) if tier == "device" else {}
        for o, t, s in zip(optimizers, is_table_opt, state.pop("optimizers")):
            if t:
                self._load_table_optimizer(o, s, params, table_state)
            else:
                set_optimizer_state_dict(model, o, s, options=StateDictOptions(full_state_dict=True))
        if tier != "device":
            records = [torch.load(folder / n, map_location="cpu", weights_only=True) for n in saved["files"]]
            state["table_journal"] = {"world_size": saved["world_size"], "ranks": records}
        state.update({"config": meta.get("config"), "extra": meta.get("extra") or {}, "step": int(meta["step"])})
        return state

    @staticmethod
    def _device_files_needed(saved: dict[str, Any], tables: dict[str, ShardedEmbedding]) -> list[str]:
        needed = {0}  # scalars (e.g. Adam's step) are in every file; read them from the first
        for n, t in tables.items():
            bounds = saved["tables"][f"{n}.weight"]["bounds"]
            needed.update(r for r in range(len(bounds) - 1) if bounds[r] < t.end and bounds[r + 1] > t.start)
        return [saved["files"][r] for r in sorted(needed)]

    def _load_table_rows(
        self, folder: Path, saved: dict[str, Any], tables: dict[str, Any]
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Copy this rank's rows into each device table; returns its rows of the table-optimizer state, by table."""
        needed = self._device_files_needed(saved, tables)
        with contextlib.ExitStack() as stack:
            handles = {
                r: stack.enter_context(safe_open(str(folder / saved["files"][r]), framework="pt"))
                for r in range(len(saved["files"]))
                if saved["files"][r] in needed
            }
            return self._read_rows(handles, saved, tables)

    @staticmethod
    def _read_rows(
        handles: dict[int, Any], saved: dict[str, Any], tables: dict[str, Any]
    ) -> dict[str, dict[str, torch.Tensor]]:
        out: dict[str, dict[str, torch.Tensor]] = {}
        for n, t in tables.items():
            pname = f"{n}.weight"
            bounds = saved["tables"][pname]["bounds"]
            keys = [k for k in handles[0].keys() if k == pname or k.startswith(pname + _STATE_SEP)]
            pieces: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
            scalars: dict[str, torch.Tensor] = {}
            for k in keys:
                if len(handles[0].get_slice(k).get_shape()) == 0:
                    scalars[k] = handles[0].get_tensor(k)
            for r in range(len(bounds) - 1):
                lo, hi = max(bounds[r], t.start), min(bounds[r + 1], t.end)
                if lo >= hi:
                    continue
                for k in keys:
                    if k not in scalars:
                        pieces[k].append(handles[r].get_slice(k)[lo - bounds[r] : hi - bounds[r]])
            rows = {
                k: (torch.cat(v) if v else handles[0].get_slice(k)[0:0]) for k, v in pieces.items() if k not in scalars
            }
            with torch.no_grad():
                t.weight.copy_(rows.pop(pname))
            out[pname] = {k.split(_STATE_SEP, 1)[1]: v for k, v in {**rows, **scalars}.items()}
        return out

    @staticmethod
    def _load_table_optimizer(
        opt: torch.optim.Optimizer,
        saved: dict[str, Any],
        params: dict[str, nn.Parameter],
        table_state: dict[str, dict[str, torch.Tensor]],
    ) -> None:
        index = {}  # parameter name -> its position in the optimizer's state_dict numbering
        for g in opt.param_groups:
            for p in g["params"]:
                index[next(n for n, q in params.items() if q is p)] = len(index)
        groups = []
        for g in saved["param_groups"]:
            if any(n not in index for n in g["params"]):
                raise CheckpointError(f"the saved table optimizer trains {g['params']}, this one {sorted(index)}")
            groups.append({**g, "params": [index[n] for n in g["params"]]})
        opt.load_state_dict(
            {"state": {index[n]: s for n, s in table_state.items() if s and n in index}, "param_groups": groups}
        )


def send_rows_to_rank0(table: ShardedEmbedding, write: Callable[[int, torch.Tensor], None] | None) -> None:
    """Every rank's rows of ``table``, chunk by chunk (~64 MiB), to rank 0 of its group: rank 0 calls
    ``write(first_row, rows)`` for each chunk in row order (its own rows too), the others send theirs. Collective
    over ``table.group``; no rank holds more than one chunk besides its shard."""
    store = table.local_rows()
    chunk = chunk_rows_for(store.row_bytes)
    device = table.offsets.device  # the compute device: where the backend moves tensors (CUDA for nccl)
    for r in range(table.world_size):
        lo, hi = table.bounds[r], table.bounds[r + 1]
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            if table.rank == r == 0:
                write(a, store.read_range(a - lo, b - lo))
            elif table.rank == r:
                rows = to_device(store.read_range(a - lo, b - lo).contiguous(), device)
                dist.send(rows, group_dst=0, group=table.group)
            elif table.rank == 0:
                rows = torch.empty(b - a, store.dim, dtype=store.dtype, device=device)
                dist.recv(rows, group_src=r, group=table.group)
                write(a, rows)


def gather_full_state_dict(model: nn.Module, offloaded: bool = True) -> dict[str, torch.Tensor] | None:
    """The unsharded model's state dict (as a single-process :class:`~engram.model.EngramLM` has it) on rank 0,
    ``None`` on the other ranks. Collective. Holds the whole model in rank 0's memory: for export and tests.
    ``offloaded=False`` leaves out the host / disk tables (an export streams them to files instead)."""
    tables = sharded_tables(model)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}  # on the CPU these would alias the params
    rank = dist.get_rank()
    for name, t in tables.items():
        if t.local is not None and not offloaded:
            continue
        full = torch.empty(t.num_rows, t.head_dim, dtype=t.local_rows().dtype) if t.rank == 0 else None
        send_rows_to_rank0(t, None if full is None else lambda a, rows: full[a : a + len(rows)].copy_(rows))
        if t.rank == 0:
            sd[f"{name}.weight"] = full
    return sd if rank == 0 else None
