"""Row-wise sparse optimizer for offloaded Engram tables.

A step touches only the rows the last backward looked up, in the table's own tier, and keeps one float32
scalar of state per row (in a :class:`~engram.storage.RowStore` of the same tier: a tensor on the device, in
host memory, or a memory-mapped file next to a disk table). No state of the table's size times ``dim`` exists,
which is what makes training a table larger than device (or host) memory possible.

For a touched row r with gradient g_r (summed over its occurrences in the batch), ``dim`` = D:

    s_r   = mean_j g_rj^2                                              (one scalar per row and step)
    adam:     v_r <- s_r                       on the row's first update (v_r == 0)
              v_r <- beta2 * v_r + (1 - beta2) * s_r                   afterwards
    adagrad:  v_r <- v_r + s_r
    w_r   <- (1 - lr * weight_decay) * w_r  -  lr * g_r / (sqrt(v_r) + eps)

"adam" is row-wise Adam without a first moment: a first moment is D values per row, i.e. as large as the
table. Its second moment starts from the first observed gradient instead of zero, so no bias correction is
needed; a global-step bias correction (lazy Adam) would give rows that are touched rarely, most of a Zipf
table, steps ~1/sqrt(1 - beta2) times too large. "adagrad" is the row-wise Adagrad used for large
recommendation tables. Rows the batch did not touch do not change, not even by weight decay (which defaults to 0;
the paper trains the tables without it). The paper's 5x table learning rate is the caller's: pass ``lr=5 * base_lr``.

Use::

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

from .embedding import OffloadedEmbedding
from .tiers import DiskRowStore, RowStore, create_row_store, to_device

METHODS = ("adam", "adagrad")


class SparseRowOptimizer:
    """Row-wise Adam / Adagrad over the rows captured by :class:`OffloadedEmbedding` (module docstring).

    Args:
        tables: an OffloadedEmbedding, a list of them, or a module containing them.
        lr, beta2, eps, weight_decay: as in the update rule above.
        method: ``"adam"`` or ``"adagrad"``.
        state_dir: where disk tables keep their optimizer state file (default: next to the table,
            ``<table file>.rowstate``). State files are created fresh (zeros); resume with :meth:`load_state_dict`.
    """

    def __init__(self, tables: OffloadedEmbedding | list[OffloadedEmbedding] | nn.Module, lr: float, *,
                 method: str = "adam", beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 state_dir: str | os.PathLike | None = None):
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
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        if lr < 0 or eps <= 0 or weight_decay < 0 or not 0.0 <= beta2 < 1.0:
            raise ValueError(f"need lr >= 0, eps > 0, weight_decay >= 0, 0 <= beta2 < 1; got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, beta2={beta2}")
        self.tables = tables
        self.param_groups = [{"name": "tables", "lr": lr, "base_lr": lr}]
        self.method, self.beta2, self.eps, self.weight_decay = method, beta2, eps, weight_decay
        self.steps = 0
        self.row_state: list[RowStore] = [self._new_state(t, i, state_dir) for i, t in enumerate(tables)]

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.param_groups[0]["lr"] = value

    @staticmethod
    def _new_state(table: OffloadedEmbedding, index: int, state_dir: str | os.PathLike | None) -> RowStore:
        store = table.store
        if store.kind == "disk":
            assert isinstance(store, DiskRowStore)
            if state_dir is None:
                path = Path(str(store.path) + ".rowstate")
            else:
                path = Path(state_dir) / f"{store.path.name}.{index}.rowstate"
            return create_row_store("disk", store.num_rows, 1, init_std=0.0, path=path, overwrite=True)
        device = store.device if store.kind == "device" else None
        return create_row_store(store.kind, store.num_rows, 1, init_std=0.0, device=device,
                                **({"pin": False} if store.kind == "host" else {}))

    @torch.no_grad()
    def step(self) -> None:
        """Apply the captured gradients to the touched rows of every table."""
        for table, state in zip(self.tables, self.row_state):
            captured = table.row_grads()
            if captured is None:
                continue
            rows, grad = captured
            v = to_device(state.gather(rows, check=False), grad.device).squeeze(1)
            s = grad.square().mean(1)
            if self.method == "adam":
                v = torch.where(v == 0, s, self.beta2 * v + (1 - self.beta2) * s)
            else:
                v = v + s
            state.scatter(rows, v.unsqueeze(1), check=False)
            delta = grad / (v.sqrt() + self.eps).unsqueeze(1) * -self.lr
            scale = 1.0 - self.lr * self.weight_decay if self.weight_decay else None
            table.update_rows(rows, delta, scale)
        self.steps += 1

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
        """Hyper-parameters, step count and the per-row state (``[num_rows]`` float32 per table: a view of the
        state store, not a copy; a disk table's state stays memory-mapped until it is saved)."""
        for state in self.row_state:
            state.flush()
        return {
            "method": self.method, "lr": self.lr, "beta2": self.beta2, "eps": self.eps,
            "weight_decay": self.weight_decay, "steps": self.steps,
            "row_state": [state.read_range(0, state.num_rows).squeeze(1) for state in self.row_state],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("method") != self.method:
            raise ValueError(f"state is for method {state_dict.get('method')!r}, this optimizer uses {self.method!r}")
        row_state = state_dict["row_state"]
        if len(row_state) != len(self.row_state):
            raise ValueError(f"state has {len(row_state)} tables, this optimizer has {len(self.row_state)}")
        for i, (saved, state) in enumerate(zip(row_state, self.row_state)):
            if tuple(saved.shape) != (state.num_rows,):
                raise ValueError(f"table {i}: saved state is {tuple(saved.shape)}, the table has {state.num_rows} rows")
        for saved, state in zip(row_state, self.row_state):
            chunk = 16 << 20
            for start in range(0, state.num_rows, chunk):
                stop = min(state.num_rows, start + chunk)
                state.write_range(start, saved[start:stop].reshape(-1, 1).to(state.device, torch.float32))
            state.flush()
        self.lr, self.beta2, self.eps = state_dict["lr"], state_dict["beta2"], state_dict["eps"]
        self.weight_decay, self.steps = state_dict["weight_decay"], state_dict["steps"]

    def __repr__(self) -> str:
        return (f"SparseRowOptimizer({self.method}, lr={self.lr}, beta2={self.beta2}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, tables={len(self.tables)})")
