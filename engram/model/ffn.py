"""Feed-forward layers: the dense SwiGLU and a DeepSeek-V3-style Mixture-of-Experts.

MoE (DeepSeek-V3, arXiv 2412.19437, section 2.1.2), for a token u_t::

    h'_t    = u_t + sum_{i<=N_s} FFN_i^(s)(u_t) + sum_{i<=N_r} g_{i,t} FFN_i^(r)(u_t)   (the block adds u_t)
    s_{i,t} = sigmoid(u_t^T e_i)                                                  (affinity, router row e_i)
    chosen  = TopK_i(s_{i,t} + b_i, K_r)                                          (b: balancing bias, no grad)
    g_{i,t} = s_{i,t} / sum_{j in chosen} s_{j,t}   for i in chosen, else 0       (gate: unbiased affinity)

times ``routed_scaling_factor``. The bias only steers which experts are picked; it never scales an output.
Auxiliary-loss-free balancing: after each step ``b_i += gamma * sign(mean_load - load_i)``, so overloaded experts
become less likely to be picked and underloaded ones more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def _grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``F.grouped_mm`` has a kernel for these operands (CPU: float32 / bfloat16 / float16; CUDA: bfloat16
    on compute capability >= 8.0 with 16-byte aligned rows); elsewhere the experts run one matmul each."""
    if x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return (
            x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and x.shape[-1] % 8 == 0
            and w.shape[-1] % 8 == 0
        )
    return False


@torch.library.custom_op("engram::expert_mm", mutates_args=())
def expert_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped matmul: rows ``offs[e-1]:offs[e]`` of x [R, A] (grouped by expert) times w[e] [A, C] -> [R, C].

    ``offs`` (int32 [E], cumulative group ends) stays on the device: with ``F.grouped_mm`` the dispatch reads no
    value back to the host (no sync on a GPU), and as a custom op it is one node for ``torch.compile`` (no graph
    break on the data-dependent group sizes). Where grouped_mm has no kernel the groups run one matmul each,
    which reads the group sizes (one host sync).
    """
    if _grouped_mm_runs(x, w):
        return F.grouped_mm(x, w, offs=offs)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.cat([xe @ w[e] for e, xe in enumerate(x.split(sizes))])


@expert_mm.register_fake
def _expert_mm_fake(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("engram::expert_mm_weight_grad", mutates_args=())
def expert_mm_weight_grad(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """d(expert_mm)/dw: per group e, ``x_e^T grad_e`` -> [E, A, C] (zeros for an expert with no rows)."""
    if _grouped_mm_runs(x, grad):
        return F.grouped_mm(x.t(), grad, offs=offs)
    sizes = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
    return torch.stack([xe.t() @ ge for xe, ge in zip(x.split(sizes), grad.split(sizes))])


@expert_mm_weight_grad.register_fake
def _expert_mm_weight_grad_fake(x: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offs.shape[0], x.shape[1], grad.shape[1])


def _expert_mm_setup(ctx, inputs, output) -> None:
    x, w, offs = inputs
    ctx.save_for_backward(x, w, offs)


def _expert_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    return expert_mm(grad, w.transpose(1, 2), offs), expert_mm_weight_grad(x, grad, offs), None


expert_mm.register_autograd(_expert_mm_backward, setup_context=_expert_mm_setup)


class SwiGLU(nn.Module):
    """``FFN(x) = W_2 (SiLU(W_1 x) * W_3 x)`` (Shazeer 2020), no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        if hidden <= 0 or intermediate <= 0:
            raise ValueError(f"SwiGLU needs positive hidden and intermediate sizes, got {hidden}, {intermediate}")
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.w1.in_features:
            raise ValueError(f"SwiGLU input must have last dim {self.w1.in_features}, got shape {tuple(x.shape)}")
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Shared + routed SwiGLU experts with sigmoid top-k routing and auxiliary-loss-free balancing.

    The routed experts are stacked 3-D weights ``w1, w3: [E, D, I]``, ``w2: [E, I, D]``. Dispatch sorts the
    (token, slot) pairs by expert and runs each projection as one grouped matmul over the contiguous groups
    (:func:`expert_mm`); group sizes and offsets stay on the device, so the dispatch needs no host sync where
    ``F.grouped_mm`` has a kernel (CPU; CUDA bfloat16 on sm80+) and one per projection elsewhere.

    Load bookkeeping: in training mode every forward adds the number of tokens routed to each expert to the
    ``expert_counts`` buffer; :meth:`update_bias` turns the accumulated counts into a bias step and clears them.
    Under data parallelism, all-reduce ``expert_counts`` (sum) across ranks before calling :meth:`update_bias`.
    Keep ``expert_bias`` in float32 (train with autocast / fp32 master weights): in bfloat16 a step of
    ``bias_update_rate`` = 1e-3 is below the rounding resolution once |b| > ~0.25 and would be lost.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.n_routed_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.intermediate_size = cfg.moe_intermediate_size
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.bias_update_rate = cfg.bias_update_rate
        self.init_std = cfg.init_std
        if not 0 < self.top_k <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..{self.n_routed_experts}, got {self.top_k}")
        e, d, i = self.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.shared = SwiGLU(d, cfg.n_shared_experts * i) if cfg.n_shared_experts > 0 else None
        self.router = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, d, i))
        self.w3 = nn.Parameter(torch.empty(e, d, i))
        self.w2 = nn.Parameter(torch.empty(e, i, d))
        self.register_buffer("expert_bias", torch.zeros(e))  # b_i: steers selection only, updated without grad
        # tokens routed per expert since the last update; int64 so that .to(bfloat16) cannot round the counts
        self.register_buffer("expert_counts", torch.zeros(e, dtype=torch.int64), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w1, self.w3, self.w2):
            nn.init.normal_(w, std=self.init_std)

    # ------------------------------------------------------------------ routing
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, K] int64, gates g [N, K] float32, affinities s [N, E] float32)."""
        scores = torch.sigmoid(self.router(x).float())
        expert_ids = (scores + self.expert_bias.float()).topk(self.top_k, dim=-1).indices
        gates = scores.gather(-1, expert_ids)
        gates = gates / gates.sum(-1, keepdim=True) * self.routed_scaling_factor
        return expert_ids, gates, scores

    def count_tokens(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """Pairs routed to each expert, [E] int64 (a scatter-add: unlike ``bincount`` it needs no host read)."""
        counts = torch.zeros(self.n_routed_experts, dtype=torch.int64, device=flat_ids.device)
        return counts.index_add_(0, flat_ids, torch.ones_like(flat_ids))

    def routed_experts(self, x: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_k g_k FFN_{e_k}(x): x [N, D], expert_ids / gates [N, K] -> [N, D]."""
        n, k = expert_ids.shape
        if n == 0:
            return torch.zeros_like(x)
        flat_ids = expert_ids.reshape(-1)  # [N*K], pair p = (token p // K, slot p % K)
        order = flat_ids.argsort(stable=True)  # pairs grouped by expert
        offs = self.count_tokens(flat_ids).cumsum(0).to(torch.int32)  # group ends, on the device
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        w1, w3, w2 = (w.to(dtype) for w in (self.w1, self.w3, self.w2))
        x_sorted = x[order // k].to(dtype)  # [N*K, D]
        h = F.silu(expert_mm(x_sorted, w1, offs)) * expert_mm(x_sorted, w3, offs)
        y_sorted = expert_mm(h, w2, offs)
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to (token, slot) order
        return (y.view(n, k, -1) * gates.unsqueeze(-1).to(y.dtype)).sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE input must have last dim {self.hidden_size}, got shape {tuple(x.shape)}")
        x_flat = x.reshape(-1, self.hidden_size)
        expert_ids, gates, _ = self.route(x_flat)
        if self.training:
            with torch.no_grad():
                self.expert_counts += self.count_tokens(expert_ids.reshape(-1))
        y = self.routed_experts(x_flat, expert_ids, gates)
        if self.shared is not None:
            y = y + self.shared(x_flat)
        return y.view(x.shape)

    # ------------------------------------------------------------------ balancing
    @property
    def load(self) -> torch.Tensor:
        """Tokens routed to each expert since the last :meth:`update_bias` (training mode only), [E]."""
        return self.expert_counts

    @staticmethod
    def load_stats(load: torch.Tensor) -> dict[str, float]:
        """Balance of a per-expert load vector: ``max_over_mean`` (1 = perfect) and ``cv`` (std/mean, 0 = perfect)."""
        load = load.float()
        mean = load.mean()
        if mean <= 0:
            return {"max_over_mean": float("nan"), "cv": float("nan")}
        return {"max_over_mean": float(load.max() / mean), "cv": float(load.std(unbiased=False) / mean)}

    @torch.no_grad()
    def update_bias(self) -> dict[str, float]:
        """``b_i += gamma * sign(mean_load - load_i)`` from the accumulated counts, then clear them.

        Returns :meth:`load_stats` of the counts that were used (NaNs and no change when nothing was counted).
        """
        load = self.expert_counts.float()
        stats = self.load_stats(load)
        if load.sum() > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_counts.zero_()
        return stats

    def activated_params_per_token(self) -> int:
        """Parameters one token touches: router, shared experts and K routed experts."""
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        per_expert = 3 * self.hidden_size * self.intermediate_size
        return self.router.weight.numel() + shared + self.top_k * per_expert


def build_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Block ``layer_idx``'s FFN: :class:`MoE` where ``cfg.is_moe_layer(layer_idx)``, else the dense
    ``SwiGLU(hidden_size, intermediate_size)``."""
    if not 0 <= layer_idx < cfg.num_layers:
        raise ValueError(f"layer_idx must be in 0..{cfg.num_layers - 1}, got {layer_idx}")
    if cfg.is_moe_layer(layer_idx):
        return MoE(cfg)
    return SwiGLU(cfg.hidden_size, cfg.intermediate_size)
