"""The Engram module: retrieval (multi-head hashed lookup) then fusion (context-aware gate + ShortConv).

Paper section 2 in equations, for one position t and residual branch m::

    e_t      = ||_{n=2..N} ||_{k=1..K} E_{n,k}[ z_{n,k}(t) ]                 (retrieval, d_mem wide)
    k_t^(m)  = W_K^(m) e_t ,   v_t = W_V e_t                                   (one key per branch, shared value)
    a_t^(m)  = sigmoid( RMSNorm(h_t^(m)) . RMSNorm(k_t^(m)) / sqrt(d) )        (paper)
    a_t^(m)  = sigmoid( ssqrt( RMSNorm(h_t^(m)) . RMSNorm(k_t^(m)) / sqrt(d) ) ) (reference; ssqrt(x)=sign(x)sqrt|x|)
    v~_t^(m) = a_t^(m) v_t
    Y        = v~ + SiLU( Conv1D_causal,depthwise,k=4,dilation=N( RMSNorm(v~) ) )

The block then does ``H <- H + Y`` before its attention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._compat import tensor_version
from .config import EngramConfig
from .hashing import NgramHasher
from .table import EngramTable


class ParameterDerived:
    """Tensors computed from parameters alone (a weight concatenation, a product of gains), kept between calls
    while no gradient is recorded, so a decode step does not rebuild them: at the demo size each rebuild is a
    few microseconds of dispatch, a sizeable part of an Engram layer's decode step.

    An entry is reused only while its parameters are the same objects, with the same storage and the same
    in-place version counter (an optimizer step, ``load_state_dict`` or ``.to()`` all change one of these),
    and the extra key (e.g. the compute dtype) matches. With gradients on, under ``torch.compile`` or for
    inference tensors (no version counter) it just builds the tensor, so autograd sees every op.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, torch.Tensor, tuple[torch.Tensor, ...]]] = {}

    def get(
        self, name: str, params: tuple[torch.Tensor, ...], build: Callable[[], torch.Tensor], extra: object = None
    ) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return build()
        versions = tuple(tensor_version(p) for p in params)
        if None in versions:
            return build()
        key = (tuple(p.data_ptr() for p in params), versions, extra)
        entry = self._entries.get(name)
        if entry is not None and entry[0] == key and all(a is b for a, b in zip(entry[2], params)):
            return entry[1]
        value = build()
        self._entries[name] = (key, value, params)
        return value


class MultiHeadEmbedding(EngramTable):
    """All hash heads of one Engram layer in a single fused table (an ``nn.Parameter`` on the compute device).

    ``forward(ids [..., H]) -> [..., H, head_dim]`` where ``ids`` are per-head row indices (as returned by
    :meth:`NgramHasher.hash`) and head h reads rows ``offsets[h] + ids[..., h]`` (:class:`~engram.table.EngramTable`).
    """

    def __init__(
        self,
        head_sizes: list[int],
        head_dim: int,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(head_sizes, head_dim, init_std)
        if device is not None and torch.device(device).type != "meta":
            self.offsets, self.sizes = self.offsets.to(device), self.sizes.to(device)
        self.weight = nn.Parameter(torch.empty(self.num_rows, self.head_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=self.init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids)
        return F.embedding(self.fused_ids(ids), self.weight)


class ShortConv(nn.Module):
    """Per-branch RMSNorm -> causal depthwise Conv1d (kernel w, dilation N) -> SiLU. Zero-initialised.

    Runs on the fused ``[B, T, M*D]`` layout (a view of ``[B, T, M, D]``): the M branch norms are one
    ``rms_norm`` times the stacked gains, and the convolution is ``w`` shifted multiply-adds (tap j reads the
    position ``(w - 1 - j) * N`` steps back), which on CPU is 2-3x faster than the depthwise ``conv1d`` in forward
    + backward and needs no transposes.
    """

    def __init__(self, hidden_size: int, hc_mult: int, kernel_size: int, dilation: int, eps: float = 1e-5):
        super().__init__()
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.kernel_size, self.dilation, self.eps = kernel_size, dilation, eps
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=eps) for _ in range(hc_mult))
        channels = hidden_size * hc_mult
        # holds the depthwise kernel [M*D, 1, w]; its forward is not used (see the class docstring)
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        self._derived = ParameterDerived()
        self.reset_parameters()

    def _gains(self) -> torch.Tensor:
        return torch.stack([norm.weight for norm in self.norms])

    def reset_parameters(self) -> None:
        # Paper: conv parameters start at zero so that Y = v~ at initialisation (identity fusion).
        if self.conv.weight.device.type != "meta":
            nn.init.zeros_(self.conv.weight)

    @property
    def state_len(self) -> int:
        """Past positions the causal conv reads: (kernel - 1) * dilation."""
        return (self.kernel_size - 1) * self.dilation

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, M, D] -> (y [B, T, M, D], new_state [B, state_len, M*D]).

        ``state`` holds the normalised inputs of the previous ``state_len`` positions (zeros at the sequence
        start), so decoding one token at a time gives the same outputs as a full-sequence pass.
        """
        if x.dim() != 4 or tuple(x.shape[2:]) != (self.hc_mult, self.hidden_size):
            raise ValueError(
                f"ShortConv input must be [B, T, M={self.hc_mult}, D={self.hidden_size}], got {tuple(x.shape)}"
            )
        b, t, m, d = x.shape
        if state is not None and tuple(state.shape) != (b, self.state_len, m * d):
            raise ValueError(
                f"ShortConv state must be [B, (kernel-1)*dilation, M*D] = {[b, self.state_len, m * d]} "
                f"(the state returned by the previous call for this batch), got {tuple(state.shape)}"
            )
        gains = self._derived.get("gains", tuple(n.weight for n in self.norms), self._gains)  # [M, D]
        normed = (F.rms_norm(x, (d,), eps=self.eps) * gains).reshape(b, t, m * d)
        if state is None:
            full = F.pad(normed, (0, 0, self.state_len, 0))  # zeros before the start
        else:
            full = torch.cat([state.to(normed.dtype), normed], dim=1)  # [B, state_len + T, M*D]
        if t == 1:  # a decode step: the w taps read exactly every N-th position of full, in one strided product
            taps_t = self._derived.get(
                "taps_t", (self.conv.weight,), lambda: self.conv.weight[:, 0, :].to(normed.dtype).t(), normed.dtype
            )  # [w, M*D]
            y = (full[:, :: self.dilation] * taps_t).sum(1, keepdim=True)
        else:
            taps = self.conv.weight[:, 0, :].to(normed.dtype)  # [M*D, w]
            y = full[:, :t] * taps[:, 0]
            for j in range(1, self.kernel_size):
                y = torch.addcmul(y, full[:, j * self.dilation : j * self.dilation + t], taps[:, j])
        # not full[:, -state_len:]: with kernel_size 1 (state_len 0) that slice is the whole sequence
        return F.silu(y).view(b, t, m, d), full[:, full.shape[1] - self.state_len :]


class Engram(nn.Module):
    """Conditional memory for one Engram layer.

    Args:
        config: the model's :class:`EngramConfig`.
        layer_id: the block index this module sits at (selects multipliers and primes).
        hidden_size: d, the backbone width.
        hc_mult: M, residual branches (1 = plain residual stream).
        hasher: the model's :class:`NgramHasher`; needed to hash token ids inside ``forward`` and to size
            the table.
        table: the rows, built in their own tier (e.g. ``engram.storage.OffloadedEmbedding.create(...,
            tier="host")``) so a host or disk table is never allocated on the accelerator first; default an
            on-device :class:`MultiHeadEmbedding`.

    ``forward(hidden, hash_ids=None, input_ids=None)``: ``hidden`` is ``[B, T, D]`` (M = 1) or ``[B, T, M, D]``;
    pass either precomputed ``hash_ids`` ([B, T, (N-1)K] per-head ids from ``hasher.hash``) or raw ``input_ids``
    [B, T]. Returns Y with the shape of ``hidden``; the caller adds it to the residual.

    The parameters are one ``nn.Linear`` per projection (W_V, then W_K^(m) per branch) and one ``nn.RMSNorm``
    per gate norm, as in the equations; ``forward`` runs them fused (one matmul for the value and all keys, one
    pass for all branch norms) so its cost does not grow with Python loops over branches.
    """

    def __init__(
        self,
        config: EngramConfig,
        layer_id: int,
        hidden_size: int,
        hc_mult: int = 1,
        hasher: NgramHasher | None = None,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        table_dtype: torch.dtype | None = None,
        table: nn.Module | None = None,
    ):
        super().__init__()
        if layer_id not in config.layer_ids:
            raise ValueError(f"layer_id {layer_id} is not one of the config's Engram layer_ids {config.layer_ids}")
        if hidden_size <= 0 or hc_mult <= 0:
            raise ValueError(f"hidden_size and hc_mult must be positive, got {hidden_size}, {hc_mult}")
        if hasher is None:
            raise ValueError(
                "Engram needs the model's NgramHasher (it fixes the table sizes): NgramHasher(config, V', pad)"
            )
        if hasher.config is not config and hasher.config != config:
            raise ValueError("the hasher was built for a different EngramConfig than this module")
        self.config, self.layer_id = config, layer_id
        self.hidden_size, self.hc_mult = hidden_size, hc_mult
        self.hasher = hasher
        head_sizes = [p for heads in hasher.table_sizes[layer_id] for p in heads]
        if table is None:
            table = MultiHeadEmbedding(head_sizes, config.head_dim, init_std=init_std, device=device, dtype=table_dtype)
        elif not isinstance(table, EngramTable):
            raise TypeError(
                f"table must be an engram.table.EngramTable (device, offloaded or sharded table), got "
                f"{type(table).__name__}"
            )
        elif table.head_sizes != head_sizes or table.head_dim != config.head_dim:
            raise ValueError(
                f"the given table has heads {table.head_sizes} x {table.head_dim}, "
                f"this layer needs {head_sizes} x {config.head_dim}"
            )
        self.table = table  # any EngramTable: the module does not know where its rows live
        d_mem = config.memory_dim
        n_keys = hc_mult if config.gating else 0
        bias = config.projection_bias
        eps = config.gate_norm_eps
        self.value_proj = nn.Linear(d_mem, hidden_size, bias=bias, device=device)
        self.key_projs = nn.ModuleList(nn.Linear(d_mem, hidden_size, bias=bias, device=device) for _ in range(n_keys))
        self.key_norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=eps, device=device) for _ in range(n_keys))
        self.query_norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=eps, device=device) for _ in range(n_keys))
        self.short_conv = (
            ShortConv(hidden_size, hc_mult, config.kernel_size, config.max_ngram_size) if config.short_conv else None
        )
        self.last_gate: torch.Tensor | None = None  # [B, T, M] of the last forward, for analysis
        self.record_gate = False
        self._derived = ParameterDerived()

    # ------------------------------------------------------------------ pieces
    def _gate_gains(self) -> torch.Tensor:
        """g_q * g_k of every branch's gate norms ([D] for one branch, else [M, D])."""
        if len(self.query_norms) == 1:
            return self.query_norms[0].weight * self.key_norms[0].weight
        return torch.stack([q.weight for q in self.query_norms]) * torch.stack([n.weight for n in self.key_norms])

    def retrieve(self, hash_ids: torch.Tensor) -> torch.Tensor:
        """e_t: [B, T, (N-1)K] per-head ids -> [B, T, d_mem] (one gather over all heads of the fused table)."""
        rows = self.table(hash_ids)
        return rows.flatten(-2)

    def project(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(v [B, T, 1, D], keys [B, T, M, D] or None without gating) from e [B, T, d_mem], in one matmul."""
        projs = [self.value_proj, *self.key_projs]
        weights = tuple(p.weight for p in projs)
        weight = weights[0] if len(projs) == 1 else self._derived.get("weight", weights, lambda: torch.cat(weights))
        if self.value_proj.bias is None:  # EngramConfig.projection_bias = False
            bias = None
        else:
            biases = tuple(p.bias for p in projs)
            bias = biases[0] if len(projs) == 1 else self._derived.get("bias", biases, lambda: torch.cat(biases))
        vk = F.linear(e, weight, bias).unflatten(-1, (len(projs), self.hidden_size))  # [B, T, 1 + M, D]
        return vk[:, :, :1], (vk[:, :, 1:] if self.key_projs else None)

    def gate(self, hidden: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """alpha: hidden [B, T, M, D], keys [B, T, M, D] -> [B, T, M, 1], computed in float32.

        ``RMSNorm(h) . RMSNorm(k) = sum(h * k * g_q * g_k) * rsqrt(mean(h^2) + eps) * rsqrt(mean(k^2) + eps)``:
        the same value without materialising either normalised tensor (fewer passes over [B, T, M, D], forward
        and backward). ``eps`` is :attr:`EngramConfig.gate_norm_eps`; None means the machine epsilon of each
        input's dtype, as ``nn.RMSNorm(eps=None)`` in the public reference.
        """
        eps_q = self.query_norms[0].eps if self.query_norms[0].eps is not None else torch.finfo(hidden.dtype).eps
        eps_k = self.key_norms[0].eps if self.key_norms[0].eps is not None else torch.finfo(keys.dtype).eps
        compute = torch.promote_types(hidden.dtype, torch.float32)
        h, k = hidden.to(compute), keys.to(compute)
        gains = self._derived.get(
            "gate_gains",
            tuple(n.weight for n in (*self.query_norms, *self.key_norms)),
            lambda: self._gate_gains().to(compute),
            compute,
        )
        dot = (h * k * gains).sum(-1, keepdim=True)
        inv_rms_h = torch.rsqrt(h.square().mean(-1, keepdim=True) + eps_q)
        inv_rms_k = torch.rsqrt(k.square().mean(-1, keepdim=True) + eps_k)
        score = dot * inv_rms_h * inv_rms_k / math.sqrt(self.hidden_size)
        if self.config.signed_sqrt:
            score = score.sign() * score.abs().clamp_min(1e-6).sqrt()
        return torch.sigmoid(score)

    def forward(
        self,
        hidden: torch.Tensor,
        hash_ids: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        state: dict | None = None,
    ) -> torch.Tensor:
        """Y for ``hidden``; see the class docstring.

        ``mask`` [B, T] (bool) marks real tokens: the gated value of padding positions is zeroed so a left-padded
        sequence gives the same outputs as the unpadded one. ``state`` (a dict, empty at the first call) carries
        the ShortConv context across decoding steps; it is updated in place.
        """
        single = hidden.dim() == 3
        if single:
            hidden = hidden.unsqueeze(2)
        if hidden.dim() != 4 or hidden.shape[2] != self.hc_mult or hidden.shape[3] != self.hidden_size:
            raise ValueError(
                f"hidden must be [B, T, {self.hidden_size}] (hc_mult=1) or [B, T, {self.hc_mult}, {self.hidden_size}],"
                f" got {tuple(hidden.shape if not single else hidden.squeeze(2).shape)}"
            )
        if single and self.hc_mult != 1:
            raise ValueError(f"this Engram has hc_mult={self.hc_mult}; pass hidden as [B, T, {self.hc_mult}, D]")
        if hash_ids is None:
            if input_ids is None:
                raise ValueError("Engram.forward needs hash_ids (from NgramHasher.hash) or input_ids")
            hash_ids = self.hasher.hash_tokens(input_ids)[self.layer_id]
        b, t = hidden.shape[:2]
        if hash_ids.dim() != 3 or tuple(hash_ids.shape) != (b, t, self.config.num_heads_total):
            raise ValueError(
                f"hash_ids must be [B, T, (N-1)K] = [{b}, {t}, {self.config.num_heads_total}] for this hidden, "
                f"got {tuple(hash_ids.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, t)):
            raise ValueError(
                f"mask must be bool [B, T] = [{b}, {t}] (True = real token), got {mask.dtype} {tuple(mask.shape)}"
            )

        e = self.retrieve(hash_ids).to(hidden.dtype)  # [B, T, d_mem]
        value, keys = self.project(e)  # [B, T, 1, D] shared, [B, T, M, D]
        if keys is not None:
            alpha = self.gate(hidden, keys)  # [B, T, M, 1]
            gated = alpha.to(value.dtype) * value
            if self.record_gate:
                self.last_gate = alpha.squeeze(-1).detach()
        else:
            gated = value.expand(-1, -1, hidden.shape[2], -1)
        if mask is not None:
            gated = gated * mask[:, :, None, None].to(gated.dtype)
        if self.short_conv is None:
            y = gated
        else:
            conv_out, conv_state = self.short_conv(gated, None if state is None else state.get("conv"))
            if state is not None:
                state["conv"] = conv_state
            y = gated + conv_out
        return y.squeeze(2) if single else y
