"""Optimizers and learning-rate schedule for Engram models (paper section 4.1 / Table 5).

The paper's recipe: the backbone is trained with Muon, the Engram embedding tables with Adam at 5x the base
learning rate and no weight decay, on a DeepSeek-LLM step schedule (x0.316 at 80% and x0.1 at 90% of training).
:func:`param_groups` sorts a model's parameters into those roles by module type and name, so any model that
follows the library's naming works without changes:

============  ======================================================================  =======================
group         what                                                                    optimizer
============  ======================================================================  =======================
tables        parameters of every :class:`engram.table.EngramTable` (the device rows  Adam (or RowWiseAdam),
              of a ``MultiHeadEmbedding``, a rank's rows of a ``ShardedEmbedding``)    lr x table_lr_mult, wd 0
matrices      other 2-D weights: attention, dense MLP, Engram W_K / W_V               Muon
adamw         ``nn.Embedding`` (``tok_emb``), ``lm_head``, ``router`` weights and     AdamW, weight decay
              3-D+ tensors (MoE expert banks ``[E, D, I]``, conv kernels)
no_decay      every 0-D/1-D parameter: norm gains, biases, scalars                    AdamW, no weight decay
============  ======================================================================  =======================

``torch.optim.Muon`` (torch 2.13) only accepts 2-D parameters, and its update runs Newton-Schulz on the whole
tensor; a 3-D expert bank ``[E, D, I]`` would have to be split into per-expert leaf parameters to get Muon, which
changes the model. Expert banks therefore train with AdamW here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..storage.embedding import OffloadedEmbedding
from ..storage.optim import (
    SparseRowOptimizer,
    check_rowwise_hyperparameters,
    rowwise_adam,
)
from ..table import EngramTable
from ..yamlio import dataclass_from_dict

GROUPS = ("tables", "matrices", "adamw", "no_decay")


@dataclass
class OptimConfig:
    """Optimizer and schedule hyper-parameters.

    Defaults are for small models (1M-200M parameters, a few thousand steps):

    * ``lr = 1e-3``: base rate of AdamW and (with ``muon_adjust_lr = "match_rms_adamw"``, which scales Muon's
      orthogonalised update to AdamW's typical RMS) of Muon too, so one number drives both. The paper uses
      4e-4 for 27B-40B models; small models train faster at 1e-3 (see :meth:`paper`).
    * ``table_lr_mult = 5``, ``table_weight_decay = 0``: the paper's Engram-table setting.
    * ``betas = (0.9, 0.95)``, ``eps = 1e-8``, ``weight_decay = 0.1``, ``grad_clip = 1.0``: DeepSeek-LLM values.
    * ``warmup_steps = 100``, ``schedule = "step"`` with ``milestones = (0.8, 0.9)`` and
      ``milestone_factors = (0.316, 0.1)``: DeepSeek-LLM's multi-step decay (the factor is relative to the
      peak, not cumulative). ``"cosine"`` decays to ``min_lr_ratio`` x peak; ``"constant"`` stays at the peak.
    * ``table_optimizer = "adam"`` is the paper's (two moments per table value: device tables only);
      ``"rowwise"`` is row-wise Adam (:mod:`engram.storage.optim`: one second moment and one step count per row,
      and lazy: untouched rows do not move), the same rule in every tier (:func:`build_table_optimizer`).
    """

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    muon: bool = True
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    muon_adjust_lr: str = "match_rms_adamw"
    table_lr_mult: float = 5.0
    table_weight_decay: float = 0.0
    table_optimizer: str = "adam"
    warmup_steps: int = 100
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.8, 0.9)
    milestone_factors: tuple[float, ...] = (0.316, 0.1)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.milestones = tuple(float(m) for m in self.milestones)
        self.milestone_factors = tuple(float(f) for f in self.milestone_factors)
        if self.lr <= 0 or (self.muon_lr is not None and self.muon_lr <= 0):
            raise ValueError(f"learning rates must be positive, got lr={self.lr}, muon_lr={self.muon_lr}")
        if self.weight_decay < 0 or self.table_weight_decay < 0:
            raise ValueError("weight decays must be >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.table_lr_mult <= 0:
            raise ValueError(f"table_lr_mult must be positive, got {self.table_lr_mult}")
        if self.table_optimizer not in ("adam", "rowwise"):
            raise ValueError(f"table_optimizer must be 'adam' or 'rowwise', got {self.table_optimizer!r}")
        if self.muon_adjust_lr not in ("original", "match_rms_adamw"):
            raise ValueError(f"muon_adjust_lr must be 'original' or 'match_rms_adamw', got {self.muon_adjust_lr!r}")
        if self.schedule not in ("step", "cosine", "constant"):
            raise ValueError(f"schedule must be 'step', 'cosine' or 'constant', got {self.schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.milestones) != len(self.milestone_factors):
            raise ValueError(f"need one factor per milestone, got {self.milestones} and {self.milestone_factors}")
        if list(self.milestones) != sorted(self.milestones) or not all(0 < m <= 1 for m in self.milestones):
            raise ValueError(f"milestones must be increasing fractions of training in (0, 1], got {self.milestones}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")

    @classmethod
    def paper(cls, **overrides: Any) -> "OptimConfig":
        """The paper's large-model values (Table 5): base lr 4e-4, step decay, Muon + 5x Adam tables."""
        return cls(**{"lr": 4e-4, "schedule": "step", **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimConfig":
        return dataclass_from_dict(cls, d)


# ---------------------------------------------------------------------------------------------------- groups
def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Sort trainable parameters into :data:`GROUPS` (see the module docstring); shared parameters appear once."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        leaf_name = mod_name.rsplit(".", 1)[-1]
        is_table = isinstance(module, EngramTable)
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_table:
                group = "tables"
            elif p.ndim < 2:
                group = "no_decay"
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or leaf_name in ("lm_head", "router"):
                group = "adamw"
            elif p.ndim == 2:
                group = "matrices"
            else:
                group = "adamw"
            groups[group].append((name, p))
    return groups


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """Muon for the backbone matrices, AdamW for the rest, a separate optimizer for the Engram tables.

    Every param group carries ``name`` (one of :data:`GROUPS`) and ``base_lr`` (its peak learning rate, which
    :class:`LRSchedule` scales). Optimizers with no parameters are left out. With ``cfg.muon = False`` the
    matrices join the AdamW weight-decay group.
    """
    groups = param_groups(model)
    params = {g: [p for _, p in groups[g]] for g in GROUPS}
    optimizers: list[torch.optim.Optimizer] = []
    adamw_groups = []
    if cfg.muon and params["matrices"]:
        lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
        optimizers.append(
            torch.optim.Muon(
                [{"params": params["matrices"], "name": "matrices", "base_lr": lr}],
                lr=lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
                nesterov=True,
                adjust_lr_fn=cfg.muon_adjust_lr,
            )
        )
    elif params["matrices"]:
        adamw_groups.append({"params": params["matrices"], "name": "matrices", "weight_decay": cfg.weight_decay})
    if params["adamw"]:
        adamw_groups.append({"params": params["adamw"], "name": "adamw", "weight_decay": cfg.weight_decay})
    if params["no_decay"]:
        adamw_groups.append({"params": params["no_decay"], "name": "no_decay", "weight_decay": 0.0})
    if adamw_groups:
        for g in adamw_groups:
            g["base_lr"] = cfg.lr
        optimizers.append(torch.optim.AdamW(adamw_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps))
    if params["tables"]:
        lr = cfg.lr * cfg.table_lr_mult
        group = [{"params": params["tables"], "name": "tables", "base_lr": lr}]
        if cfg.table_optimizer == "adam":
            optimizers.append(
                torch.optim.AdamW(group, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.table_weight_decay)
            )
        else:
            optimizers.append(
                RowWiseAdam(group, lr=lr, beta2=cfg.betas[1], eps=cfg.eps, weight_decay=cfg.table_weight_decay)
            )
    if not optimizers:
        raise ValueError("the model has no trainable parameters")
    return optimizers


# ---------------------------------------------------------------------------------------------------- schedule
def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate at 0-based ``step``: linear warmup, then the configured decay.

    Warmup gives ``(step + 1) / warmup_steps`` so the first step already moves. Step decay uses the factor of
    the last milestone reached (``step >= milestone * total_steps``); cosine runs from the end of warmup to
    ``total_steps`` and then stays at ``min_lr_ratio``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.schedule == "constant":
        return warm
    if cfg.schedule == "step":
        decay = 1.0
        for milestone, factor in zip(cfg.milestones, cfg.milestone_factors):
            if step >= milestone * total_steps:
                decay = factor
        return warm * decay
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)))
    return warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class LRSchedule:
    """Sets ``lr = group["base_lr"] * lr_factor(step)`` on every param group of every optimizer.

    Follows torch's convention: the constructor applies step 0; call :meth:`step` after each optimizer step.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer], cfg: OptimConfig, total_steps: int):
        self.optimizers = list(optimizers)
        self.cfg = cfg
        self.total_steps = int(total_steps)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])
        self.last_step = 0
        self._apply()

    @property
    def factor(self) -> float:
        return lr_factor(self.last_step, self.total_steps, self.cfg)

    def _apply(self) -> None:
        f = self.factor
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict[str, int]:
        return {"last_step": self.last_step, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue at the saved step. The total stays this schedule's (the run's current ``train.steps``): a run
        extended on resume continues the schedule of its new length."""
        self.last_step = int(state["last_step"])
        self._apply()


# ---------------------------------------------------------------------------------------------------- row-wise
class RowWiseAdam(torch.optim.Optimizer):
    """Row-wise Adam (:func:`engram.storage.optim.rowwise_adam`, the rule every tier uses) for 2-D table
    parameters ``[rows, dim]``: device tables and row shards.

    Per row the state is its second moment ``sq_avg`` and its own step count ``row_step`` (two floats per row
    instead of Adam's two per element, i.e. ``head_dim`` times less memory). Rows with an all-zero gradient (not
    looked up) keep their weights and state exactly. Accepts dense gradients and sparse COO gradients
    (``F.embedding(..., sparse=True)``).
    """

    def __init__(
        self, params: Any, lr: float = 1e-3, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0
    ):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        check_rowwise_hyperparameters(lr, beta2, eps, weight_decay)
        super().__init__(params, {"lr": lr, "beta2": beta2, "eps": eps, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"RowWiseAdam takes 2-D tables [rows, dim], got a parameter of shape "
                        f"{tuple(p.shape)}; give other parameters to AdamW"
                    )

    @staticmethod
    def _touched(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, their gradient rows) for rows with any non-zero gradient."""
        if grad.is_sparse:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
            keep = values.ne(0).any(dim=1)
            return rows[keep], values[keep]
        rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
        return rows, grad.index_select(0, rows)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["sq_avg"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                    state["row_step"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                rows, g = self._touched(p.grad)
                if rows.numel() == 0:
                    continue
                scale, delta, sq_avg, steps = rowwise_adam(
                    g.float(),
                    state["sq_avg"].index_select(0, rows),
                    state["row_step"].index_select(0, rows),
                    lr=group["lr"],
                    beta2=group["beta2"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )
                state["sq_avg"].index_copy_(0, rows, sq_avg)
                state["row_step"].index_copy_(0, rows, steps)
                w = p.index_select(0, rows).float()
                if scale is not None:
                    w.mul_(scale)
                p.index_copy_(0, rows, w.add_(delta).to(p.dtype))
        return loss


def build_table_optimizer(model: nn.Module, cfg: OptimConfig, reopen: bool = False) -> SparseRowOptimizer | None:
    """The row-wise optimizer of ``model``'s offloaded (host / disk) tables, or None when it has none.

    Offloaded rows are no parameters (no torch optimizer sees them) and hold no per-value state, so only
    ``optim.table_optimizer = "rowwise"`` can train them; full Adam is refused rather than silently replaced.
    The rule is the one :class:`RowWiseAdam` applies to device tables, with the same learning rate
    (``lr x table_lr_mult``), ``beta2 = betas[1]``, ``eps`` and ``table_weight_decay``. ``reopen``: a resumed run
    opens the row state files of disk tables in place (see :class:`SparseRowOptimizer`).
    """
    tables = [m for m in model.modules() if isinstance(m, OffloadedEmbedding)]
    if not tables:
        return None
    if cfg.table_optimizer != "rowwise":
        raise ValueError(
            f"optim.table_optimizer={cfg.table_optimizer!r} keeps two moments per table value, which "
            f"host and disk tables do not hold; set optim.table_optimizer=rowwise (row-wise Adam, the "
            f"same rule on every tier) or keep the tables on the device (train.table_tier=device)"
        )
    return SparseRowOptimizer(
        tables,
        lr=cfg.lr * cfg.table_lr_mult,
        beta2=cfg.betas[1],
        eps=cfg.eps,
        weight_decay=cfg.table_weight_decay,
        reopen=reopen,
    )


# ---------------------------------------------------------------------------------------------------- clipping
def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale all gradients so their joint L2 norm is at most ``max_norm`` (``<= 0``: measure only).

    Returns the norm before clipping. Uses ``torch.nn.utils.clip_grad_norm_``; sparse table gradients (which it
    does not accept) are measured from their coalesced values and scaled with the same factor.
    """
    params = [p for p in parameters if p.grad is not None]
    limit = float(max_norm) if max_norm > 0 else float("inf")
    sparse = [p for p in params if p.grad.is_sparse]
    if not sparse:
        return torch.nn.utils.clip_grad_norm_(params, limit)
    dense = [p for p in params if not p.grad.is_sparse]
    for p in sparse:
        p.grad = p.grad.coalesce()
    norms = [p.grad.values().float().norm() for p in sparse]
    if dense:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in dense]))
    total = torch.stack([n.to(norms[0].device) for n in norms]).norm()
    torch.nn.utils.clip_grads_with_norm_(dense, limit, total)
    coef = torch.clamp(limit / (total + 1e-6), max=1.0)
    for p in sparse:
        p.grad.mul_(coef.to(p.grad.device))
    return total
