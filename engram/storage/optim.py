"""Row-wise Adam: the one update rule of Engram tables in every tier, and its optimizer for offloaded tables.

A table of billions of rows cannot afford Adam's two moments per value. Row-wise Adam keeps, per row r, one
second moment v_r (a scalar) and the row's own step count n_r, and moves only the rows whose gradient g_r
(summed over the row's occurrences in the batch, ``dim`` = D values) is non-zero::

    n_r  <- n_r + 1
    v_r  <- beta2 * v_r + (1 - beta2) * mean_j g_rj^2
    w_r  <- (1 - lr * weight_decay) * w_r  -  lr * g_r / (sqrt(v_r / (1 - beta2^n_r)) + eps)

The bias correction uses the row's own count, not the global step: a row of a Zipf table is touched rarely, and
a global-step correction (lazy Adam) would make its steps ~1/sqrt(1 - beta2) times too large. A row-scalar first
moment is left out because a scalar cannot carry the direction momentum needs. Rows the batch did not touch do
not change, not even by weight decay (which defaults to 0; the paper trains the tables without it).

:func:`rowwise_adam` is the rule, written once. Device tables (``nn.Parameter`` rows of a
:class:`~engram.module.MultiHeadEmbedding` or a row shard) apply it through
:class:`engram.train.optim.RowWiseAdam`; offloaded tables through :class:`SparseRowOptimizer` below, in the
table's own tier, so switching ``train.table_tier`` does not change the algorithm.

:class:`SparseRowOptimizer` keeps the state (v_r, n_r) as a ``[num_rows, 2]`` float32 :class:`RowStore` in the
table's tier (a tensor on the device, in host memory, or a memory-mapped file next to a disk table). Use::

    opt = SparseRowOptimizer(model, lr=5 * base_lr)   # finds every OffloadedEmbedding in the model
    loss.backward(); dense_opt.step(); opt.step(); dense_opt.zero_grad(); opt.zero_grad()

The captured gradients belong to the forward that made them, so ``opt.zero_grad()`` goes after ``opt.step()``
(not between the forward and the backward, where a training loop may zero a dense optimizer). The learning
rate lives in ``opt.param_groups[0]["lr"]`` as in a torch optimizer, so a schedule that sets the ``lr`` of every
param group (:class:`engram.train.optim.LRSchedule`) drives it too.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import fault_point
from .embedding import OffloadedEmbedding
from .formats import check_trainable
from .tiers import (
    DiskRowStore,
    RowStore,
    chunk_rows_for,
    copy_in_chunks,
    create_row_store,
    to_device,
)

STATE_FORMAT = 2  # [num_rows, 2] per table: second moment v_r, step count n_r


def rowwise_adam(
    grad: torch.Tensor,
    sq_avg: torch.Tensor,
    steps: torch.Tensor,
    *,
    lr: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row-wise Adam step (module docstring) for ``n`` rows, without reading the rows themselves.

    Args: ``grad [n, D]`` (float32), the rows' state ``sq_avg [n]`` and ``steps [n]`` (float32, on grad's device).
    Returns ``(scale, delta, sq_avg, steps)``: the new rows are ``scale * w + delta`` (``scale`` ``[n, 1]``, or
    None without weight decay); rows with an all-zero gradient get ``scale = 1``, ``delta = 0`` and keep their
    state, so no device value needs to be read to select the touched rows.
    """
    touched = grad.ne(0).any(dim=1)
    steps = steps + touched.to(steps.dtype)
    sq_avg = torch.where(touched, beta2 * sq_avg + (1 - beta2) * grad.square().mean(dim=1), sq_avg)
    correction = 1 - torch.pow(beta2, steps.clamp_min(1))
    denom = (sq_avg / correction).sqrt_().add_(eps)
    delta = grad / denom[:, None] * -lr  # zero where the gradient is zero
    scale = None
    if weight_decay:
        scale = torch.where(touched, 1 - lr * weight_decay, 1.0).to(grad.dtype)[:, None]
    return scale, delta, sq_avg, steps


def check_rowwise_hyperparameters(lr: float, beta2: float, eps: float, weight_decay: float) -> None:
    if lr < 0 or eps <= 0 or weight_decay < 0 or not 0.0 <= beta2 < 1.0:
        raise ValueError(
            f"row-wise Adam needs lr >= 0, eps > 0, weight_decay >= 0, 0 <= beta2 < 1; got lr={lr}, "
            f"eps={eps}, weight_decay={weight_decay}, beta2={beta2}"
        )


def row_state_path(table_path: str | os.PathLike) -> Path:
    """The row-optimizer state file of a disk table by default: ``<table file>.rowstate``, beside it."""
    return Path(str(table_path) + ".rowstate")


class SparseRowOptimizer:
    """Row-wise Adam (:func:`rowwise_adam`) over the rows captured by :class:`OffloadedEmbedding`.

    Args:
        tables: an OffloadedEmbedding, a list of them, or a module containing them.
        lr, beta2, eps, weight_decay: as in the update rule (module docstring).
        state_dir: where disk tables keep their optimizer state file (default: next to the table,
            ``<table file>.rowstate``). State files are created fresh (zeros); resume with :meth:`load_state_dict`.
        reopen: open the existing state files of disk tables instead (a resumed run whose journal,
            :mod:`engram.storage.journal`, restores them in place); a missing file is a CheckpointError.
    """

    def __init__(
        self,
        tables: OffloadedEmbedding | list[OffloadedEmbedding] | nn.Module,
        lr: float,
        *,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dir: str | os.PathLike | None = None,
        reopen: bool = False,
    ):
        if isinstance(tables, OffloadedEmbedding):
            tables = [tables]
        elif isinstance(tables, nn.Module):
            tables = [m for m in tables.modules() if isinstance(m, OffloadedEmbedding)]
        else:
            tables = list(tables)
        if not tables:
            raise ValueError("SparseRowOptimizer got no OffloadedEmbedding to optimise")
        for t in tables:
            if not isinstance(t, OffloadedEmbedding):
                raise TypeError(f"SparseRowOptimizer optimises OffloadedEmbedding tables, got {type(t).__name__}")
            check_trainable(t.store.format, f"a {t.store.kind} table of {t.num_rows} rows")
        check_rowwise_hyperparameters(lr, beta2, eps, weight_decay)
        self.tables = tables
        # every hyper-parameter lives in the one param group, like torch optimizers': the trainer re-applies a
        # group's values after a resume, so a changed eps / beta2 / weight decay is honoured, not overwritten
        self.param_groups = [
            {"name": "tables", "lr": lr, "base_lr": lr, "beta2": beta2, "eps": eps, "weight_decay": weight_decay}
        ]
        self.row_state: list[RowStore] = [self._new_state(t, i, state_dir, reopen) for i, t in enumerate(tables)]
        # False while a journaled checkpoint (engram.storage.journal) saves or loads: the journal holds the rows
        self.row_state_in_state_dict = True
        self._steps = 0  # steps taken by this process (names its crash-test fault points)

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = value

    @property
    def beta2(self) -> float:
        return self.param_groups[0]["beta2"]

    @property
    def eps(self) -> float:
        return self.param_groups[0]["eps"]

    @property
    def weight_decay(self) -> float:
        return self.param_groups[0]["weight_decay"]

    @staticmethod
    def _new_state(
        table: OffloadedEmbedding, index: int, state_dir: str | os.PathLike | None, reopen: bool
    ) -> RowStore:
        store = table.store
        if store.kind == "disk":
            assert isinstance(store, DiskRowStore)
            if state_dir is None:
                path = row_state_path(store.path)
            else:
                path = Path(state_dir) / f"{store.path.name}.{index}.rowstate"
            if reopen:
                if not path.is_file():
                    raise CheckpointError(
                        f"the row-optimizer state file {path} of table {store.path} is missing; a resumed run "
                        f"trains it in place: start over with train.resume=false"
                    )
                return DiskRowStore(path, num_rows=store.num_rows, dim=2, fmt="float32")
            return create_row_store("disk", store.num_rows, 2, init_std=0.0, path=path, overwrite=True)
        device = store.device if store.kind == "device" else None
        return create_row_store(
            store.kind,
            store.num_rows,
            2,
            init_std=0.0,
            device=device,
            **({"pin": False} if store.kind == "host" else {}),
        )

    @torch.no_grad()
    def step(self) -> None:
        """Apply the captured gradients to the touched rows of every table."""
        self._steps += 1
        for table, state in zip(self.tables, self.row_state):
            captured = table.row_grads()
            if captured is None:
                continue
            rows, grad = captured
            old = to_device(state.gather(rows, check=False), grad.device)
            scale, delta, sq_avg, steps = rowwise_adam(
                grad, old[:, 0], old[:, 1], lr=self.lr, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay
            )
            state.scatter(rows, torch.stack([sq_avg, steps], dim=1), check=False)
            fault_point(f"row-update-{self._steps}")
            table.update_rows(rows, delta, scale)

    def grad_tensors(self) -> list[torch.Tensor]:
        """The leaves holding the captured row gradients of every table, for a global-norm clip together with
        the model's parameters (scaling their ``.grad`` scales this optimizer's next step)."""
        return [leaf for table in self.tables for leaf in table.row_grad_tensors()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the captured gradients (call after :meth:`step`; ``set_to_none`` is accepted for the torch
        optimizer signature, captured gradients are always dropped)."""
        for table in self.tables:
            table.zero_grad()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Hyper-parameters and the per-row state (``[num_rows, 2]`` float32 per table, columns v_r and n_r: a
        view of the state store, not a copy; a disk table's state stays memory-mapped until it is saved)."""
        for state in self.row_state:
            state.flush()
        return {
            "format": STATE_FORMAT,
            "lr": self.lr,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "row_state": [state.read_range(0, state.num_rows) for state in self.row_state]
            if self.row_state_in_state_dict
            else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(
                f"row optimizer state of format {state_dict.get('format')!r}, this engram reads format "
                f"{STATE_FORMAT} (per-row second moment and step count); it was written by an older "
                f"engram whose row rule differed: restart the run"
            )
        row_state = state_dict["row_state"]
        if (row_state is None) == self.row_state_in_state_dict:
            raise ValueError(
                "row optimizer state: the per-row state is "
                + ("kept by a table journal, but none restores it" if row_state is None else "in the state dict")
                + f" (row_state_in_state_dict={self.row_state_in_state_dict})"
            )
        if row_state is not None:
            self._load_row_state(row_state)
        for key in ("lr", "beta2", "eps", "weight_decay"):
            self.param_groups[0][key] = state_dict[key]

    def _load_row_state(self, row_state: list[torch.Tensor]) -> None:
        if len(row_state) != len(self.row_state):
            raise ValueError(f"state has {len(row_state)} tables, this optimizer has {len(self.row_state)}")
        for i, (saved, state) in enumerate(zip(row_state, self.row_state)):
            if tuple(saved.shape) != (state.num_rows, 2):
                raise ValueError(
                    f"table {i}: saved state is {tuple(saved.shape)}, the table needs {(state.num_rows, 2)}"
                )
        for saved, state in zip(row_state, self.row_state):
            copy_in_chunks(
                lambda start, stop: saved[start:stop].to(state.device, torch.float32),
                state.write_range,
                state.num_rows,
                chunk_rows_for(state.row_bytes),
            )
            state.flush()

    def __repr__(self) -> str:
        return (
            f"SparseRowOptimizer(lr={self.lr}, beta2={self.beta2}, eps={self.eps}, "
            f"weight_decay={self.weight_decay}, tables={len(self.tables)})"
        )
