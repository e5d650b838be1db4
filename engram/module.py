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
import operator
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import decode_kernels
from ._compat import tensor_version
from .config import EngramConfig
from .hashing import NgramHasher, PendingStep
from .table import OUT_OF_RANGE, EngramTable


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


class StepConstants:
    """Tensors a decode step derives from parameters, kept in the decoding state of one batch of sequences.

    The decode-step counterpart of :class:`ParameterDerived`: a generation step is a few dozen tiny ops, where
    collecting a layer's parameters through module attributes alone costs as much as several of them. So the
    constants live in the layer's decoding dict (a state belongs to the weights it was started with: its KV
    cache was computed with them) and each step checks only the version counter and storage of the tensors
    they came from, which still notices an optimizer step, ``load_state_dict`` or ``.to()`` in between.
    """

    def __init__(self, sources: tuple[torch.Tensor, ...], **tensors: object):
        versions = [tensor_version(t) for t in sources]
        # inference tensors have no version counter: such constants are rebuilt every step
        self.reusable = None not in versions
        self._sources, self._versions = sources, versions
        self._pointers = [t.data_ptr() for t in sources]
        self.__dict__.update(tensors)

    @staticmethod
    def lookup(state: dict, key: str, build: Callable[[], StepConstants]) -> StepConstants:
        """``state[key]`` while its sources are unchanged, else a new ``build()`` (kept when reusable)."""
        consts = state.get(key)
        if consts is None or not consts.current():
            consts = build()
            if consts.reusable:
                state[key] = consts
        return consts

    def current(self) -> bool:
        # map() keeps the per-step check to two C-level passes: it runs on every decode step of every layer
        return [*map(_VERSION, self._sources)] == self._versions and [*map(_POINTER, self._sources)] == self._pointers


class KernelStep:
    """What an Engram layer's fused CPU decode step binds once per decoding state (see :meth:`Engram._kernel_step`):
    the kernels, the layer's constants packed as they take them
    (:func:`~engram.decode_kernels_numba.pack_layer`) and small buffers sized for the batch."""

    def __init__(
        self, conv: ShortConv | None, table: np.ndarray | None, ints: np.ndarray, floats: np.ndarray, hashes: bool
    ):
        kernels = decode_kernels.kernels()
        self.fuse, self.hash_fuse, self._with_heads = kernels.fuse_step, kernels.hash_fuse_step, kernels.with_heads
        self.BAD_SHAPE, self.BAD_RAW = kernels.BAD_SHAPE, kernels.BAD_RAW
        self.conv, self.ints, self.floats = conv, ints, floats
        self.device_table, self.hashes = table is not None, hashes  # hashes: ints hold this layer's hash constants
        self.table = table if table is not None else np.empty((0, 1), dtype=floats.dtype)
        self.dtype = torch.from_numpy(floats[:0]).dtype
        self.no_ring = np.zeros((1, 0, 1), dtype=floats.dtype)
        self.shape: torch.Size | None = None  # the hidden shape [B, 1, M, D] the buffers below are sized for
        self.ones = self.scratch = self.no_ring
        self.outputs: decode_kernels.FreshTensors | None = None
        self._row_layouts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def bind(self, hidden: torch.Tensor) -> None:
        """Size the buffers for a step of ``hidden`` [B, 1, M, D]: the mask of a batch without padding, where the
        kernel writes gate values nobody records, and the outputs."""
        b, _, m, _ = self.shape = hidden.shape
        self.ones = np.ones((b, 1), dtype=self.floats.dtype)
        self.scratch = np.empty((b, m), dtype=self.floats.dtype)
        self.outputs = decode_kernels.FreshTensors(hidden.shape, self.dtype)

    def row_layout(self, b: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, ints)`` that read rows ``[B * H, head_dim]`` gathered by another table in order: head j at
        offset j, every head B * H rows long, sequence b's head j at row ``b * H + j``."""
        layout = self._row_layouts.get((b, n_heads))
        if layout is None:
            ids = np.repeat(np.arange(b, dtype=np.int64)[:, None, None] * n_heads, n_heads, axis=2)
            layout = self._row_layouts[b, n_heads] = (ids, self._with_heads(self.ints, range(n_heads), b * n_heads))
        return layout


_VERSION = operator.attrgetter("_version")
_POINTER = torch.Tensor.data_ptr


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


class ConvRing:
    """ShortConv's decoding context as a mirrored ring buffer, so a decode step writes one row and reads views.

    The buffer holds the normalised inputs of the last ``R = state_len + 1`` positions twice, ``[B, 2R, C]``:
    position s is written to slots ``s mod R`` and ``s mod R + R`` in one broadcast copy. The last R positions,
    oldest first, are then always the contiguous window ``buf[:, p+1 : p+1+R]`` after a write at slot p, so the
    conv taps (every N-th row of that window) and the linear state handed back to callers (its last
    ``state_len`` rows, the format :meth:`ShortConv.forward` takes) are strided views, no concatenation.
    The views of each slot are made once and reused.
    """

    def __init__(self, linear: torch.Tensor | None, shape: tuple[int, int, int], dilation: int, dtype, device):
        b, state_len, c = shape
        self.r, self.dilation = state_len + 1, dilation
        if linear is None:
            self.buf = torch.zeros(b, 2 * self.r, c, dtype=dtype, device=device)
        else:
            self.buf = torch.empty(b, 2 * self.r, c, dtype=dtype, device=device)
            self.buf.view(b, 2, self.r, c)[:, :, :state_len].copy_(linear[:, None])
        self.slot = self.r - 1  # the first write lands after the linear state in the second copy
        self.linear: torch.Tensor | None = None  # the state view published after the last write
        self._views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None] = [None] * self.r
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        """The buffer as a numpy view (CPU rings), for the fused decode kernel to write."""
        if self._array is None:
            self._array = self.buf.numpy()
        return self._array

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.buf.shape[0], self.r - 1, self.buf.shape[2]

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """Write the newest position ``x`` [B, 1, C]; returns the taps' rows [B, w, C], oldest first."""
        views = self._slot_views(self.slot)
        views[0].copy_(x)
        self.advance()
        return views[1]

    def advance(self) -> None:
        """Move past the slot just written (by :meth:`push`, or by a kernel at ``slot`` and ``slot + R``)."""
        self.linear = self._slot_views(self.slot)[2]
        self.slot = (self.slot + 1) % self.r

    def _slot_views(self, p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        views = self._views[p]
        if views is None:
            b, _, c = self.buf.shape
            window = self.buf[:, p + 1 : p + 1 + self.r]
            views = (self.buf.view(b, 2, self.r, c)[:, :, p], window[:, :: self.dilation], window[:, 1:])
            self._views[p] = views
        return views


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
        self._check_state(state, b)
        normed = self._normed(x).reshape(b, t, m * d)
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

    def decode_step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """One new position per sequence, without gradients: x [B, M, D] -> conv output [B, M, D].

        ``state`` is the Engram layer's decoding dict: ``state["conv"]`` is the linear context that
        :meth:`forward` takes and returns (left as a view of the ring), ``state["conv_ring"]`` the
        :class:`ConvRing` behind it. A ring is reused only while ``state["conv"]`` is still the view it published;
        a context set by anyone else (a prefill, a copied or reordered cache) starts a new ring from it.
        """
        b, m, d = x.shape
        consts = StepConstants.lookup(state, "conv_constants", lambda: self._step_constants(x.dtype))
        ring = self.ring(state, b, x.dtype, x.device)
        # per-branch RMSNorm written out: fewer dispatches than F.rms_norm on a single position
        normed = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps) * consts.gains
        rows = ring.push(normed.view(b, 1, m * d))  # [B, w, M*D], oldest first
        state["conv"] = ring.linear
        return F.silu((rows * consts.taps_t).sum(1)).view(b, m, d)

    def ring(self, state: dict, batch: int, dtype: torch.dtype, device: torch.device) -> ConvRing:
        """The decoding state's :class:`ConvRing`, or a new one started from ``state["conv"]`` (see
        :meth:`decode_step`)."""
        linear = state.get("conv")
        ring = state.get("conv_ring")
        if ring is None or ring.linear is None or linear is not ring.linear:
            self._check_state(linear, batch)
            shape = (batch, self.state_len, self.hc_mult * self.hidden_size)
            ring = ConvRing(linear, shape, self.dilation, dtype, device)
            state["conv_ring"] = ring
        return ring

    def _step_constants(self, dtype: torch.dtype) -> StepConstants:
        sources = (self.conv.weight, *(n.weight for n in self.norms))
        return StepConstants(sources, gains=self._gains(), taps_t=self.conv.weight[:, 0, :].to(dtype).t())

    def _normed(self, x: torch.Tensor) -> torch.Tensor:
        """Per-branch RMSNorm of x [..., M, D]: one ``rms_norm`` times the stacked gains."""
        gains = self._derived.get("gains", tuple(n.weight for n in self.norms), self._gains)  # [M, D]
        return F.rms_norm(x, (self.hidden_size,), eps=self.eps) * gains

    def _check_state(self, state: torch.Tensor | None, batch: int) -> None:
        want = (batch, self.state_len, self.hc_mult * self.hidden_size)
        if state is not None and tuple(state.shape) != want:
            raise ValueError(
                f"ShortConv state must be [B, (kernel-1)*dilation, M*D] = {list(want)} "
                f"(the state returned by the previous call for this batch), got {tuple(state.shape)}"
            )


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

    # ------------------------------------------------------------------ decode step
    def _step_constants(self, dtype: torch.dtype, device: torch.device) -> StepConstants:
        """What :meth:`_decode_step` derives from parameters (see there).

        ``weight``/``bias``: one matmul giving ``[v, k^(1..M), sqrt(D) g^(m) k^(m)]`` from e, ``g^(m) = g_q^(m)
        g_k^(m)`` the gate gains, so that the gate's dot product needs no separate gain multiply.
        ``pair_rows``/``eps``: with S = [h; k; sqrt(D) g k] ([B, 3M, D]) and A = S's rows [h; k; h],
        ``vecdot(A, S) / D + eps`` is ``[mean(h^2) + eps_q, mean(k^2) + eps_k, h . (g k) / sqrt(D)]`` per branch:
        the three reductions of :meth:`gate` in one op. ``table_weight``/``offsets``: the fused rows of an
        on-device table, read with one ``embedding`` (other tables are called as usual).
        """
        m = self.hc_mult if self.key_projs else 0
        projs = [self.value_proj, *self.key_projs]
        gain_norms = [*self.query_norms, *self.key_norms]
        sources = tuple(t for p in projs for t in (p.weight, p.bias) if t is not None)
        sources += tuple(n.weight for n in gain_norms)
        scale = math.sqrt(self.hidden_size)
        gains = [q.weight * k.weight * scale for q, k in zip(self.query_norms, self.key_norms)]
        weight = torch.cat([p.weight for p in projs] + [g[:, None] * p.weight for g, p in zip(gains, projs[1:])])
        bias = None
        if self.value_proj.bias is not None:
            bias = torch.cat([p.bias for p in projs] + [g * p.bias for g, p in zip(gains, projs[1:])])
        compute = torch.promote_types(dtype, torch.float32)
        eps = []
        if m:
            eps_q = self.query_norms[0].eps if self.query_norms[0].eps is not None else torch.finfo(dtype).eps
            eps_k = self.key_norms[0].eps if self.key_norms[0].eps is not None else torch.finfo(dtype).eps
            eps = [eps_q] * m + [eps_k] * m + [0.0] * m
        table_weight = offsets = None
        if type(self.table) is MultiHeadEmbedding:
            table_weight = self.table.weight
            offsets = self.table.offsets.to(device)
            sources += (table_weight,)
        kernel = None
        if self._kernel_applies(dtype, device):
            kernel = self._kernel_constants(dtype, projs, table_weight)
            if self.short_conv is not None:
                sources += (self.short_conv.conv.weight, *(n.weight for n in self.short_conv.norms))
        return StepConstants(
            sources,
            weight=weight,
            bias=bias,
            compute=compute,
            pair_rows=torch.tensor([*range(2 * m), *range(m)], dtype=torch.int64, device=device),
            eps=torch.tensor(eps, dtype=compute, device=device),
            table_weight=table_weight,
            offsets=offsets,
            kernel=kernel,
        )

    def _kernel_applies(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether decode steps in ``dtype`` on ``device`` can take the fused CPU kernel
        (:mod:`engram.decode_kernels`): CPU, float32/float64 throughout, kernels on."""
        if device.type != "cpu" or dtype not in decode_kernels.KERNEL_DTYPES:
            return False
        if any(p.dtype != dtype or p.device.type != "cpu" for p in self.parameters()):
            return False
        return decode_kernels.cpu_kernels_enabled()

    def _kernel_constants(self, dtype: torch.dtype, projs: list[nn.Linear], table_weight) -> KernelStep:
        """The fused kernel's arguments that derive from parameters alone, packed once
        (:func:`~engram.decode_kernels_numba.pack_layer`; the table is a view of its parameter,
        :class:`StepConstants` rebuilds the rest when a source changes)."""
        d, m = self.hidden_size, self.hc_mult
        arr = decode_kernels.as_array
        weight_t = torch.cat([p.weight for p in projs]).t()
        if self.value_proj.bias is not None:
            bias = torch.cat([p.bias for p in projs])
        else:
            bias = weight_t.new_zeros(weight_t.shape[1])
        zeros = torch.zeros(m, d, dtype=dtype)
        if self.key_projs:
            gains = torch.stack([q.weight * k.weight for q, k in zip(self.query_norms, self.key_norms)])
            eps_q = self.query_norms[0].eps if self.query_norms[0].eps is not None else torch.finfo(dtype).eps
            eps_k = self.key_norms[0].eps if self.key_norms[0].eps is not None else torch.finfo(dtype).eps
        else:
            gains, eps_q, eps_k = zeros, 0.0, 0.0
        conv = self.short_conv
        if conv is not None:
            taps, conv_gains, conv_eps, dilation = conv.conv.weight[:, 0, :].t(), conv._gains(), conv.eps, conv.dilation
        else:
            taps, conv_gains, conv_eps, dilation = torch.zeros(0, m * d, dtype=dtype), zeros, 0.0, 1
        hashes = self.hasher.tokenizer is not None
        lookup, mult, primes = self.hasher.layer_kernel_constants(self.layer_id) if hashes else (None, None, None)
        ints, floats = decode_kernels.kernels().pack_layer(
            arr(self.table._offsets_cpu), arr(self.table._sizes_cpu), arr(weight_t.detach()), arr(bias.detach()),
            arr(gains.detach()), arr(taps.detach()), arr(conv_gains.detach()), float(eps_q), float(eps_k),
            float(conv_eps), bool(self.key_projs), bool(self.config.signed_sqrt), int(dilation),
            lookup, None if mult is None else mult[0], None if primes is None else primes[0],
        )  # fmt: skip
        return KernelStep(conv, None if table_weight is None else arr(table_weight), ints, floats, hashes)

    def _pending_step(
        self, hidden: torch.Tensor, pending: PendingStep, mask: torch.Tensor | None, state: dict
    ) -> torch.Tensor | None:
        """A decode step of :class:`~engram.hashing.PendingStep` (EngramLM's, with an on-device table) in one call
        of ``hash_fuse_step``, or None where that kernel does not apply (the caller takes the general path, which
        checks every argument). Only the checks that decide this are made here, and the constants' own check
        (:meth:`StepConstants.current`): in a model every Python operation of a decode step costs microseconds."""
        c = state.get("constants")
        if c is None or not c.current():
            if torch.is_grad_enabled() or torch.compiler.is_compiling() or not decode_kernels.cpu_kernels_enabled():
                return None
            c = StepConstants.lookup(state, "constants", lambda: self._step_constants(hidden.dtype, hidden.device))
        k = c.kernel
        if k is None or not k.hashes or not k.device_table or pending.hasher is not self.hasher:
            return None
        if not decode_kernels._enabled or torch.is_grad_enabled():
            return None
        if hidden.shape != k.shape or hidden.dtype != k.dtype or not hidden.is_contiguous() or not hidden.is_cpu:
            if hidden.dtype != k.dtype or hidden.shape != (pending.batch_size, 1, self.hc_mult, self.hidden_size):
                return None
            if not hidden.is_cpu:  # the kernel reads it by address
                return None
            hidden = hidden.contiguous()
            if hidden.shape != k.shape:
                k.bind(hidden)
        if pending.batch_size != k.shape[0]:
            return None
        if mask is None:
            weights = k.ones
        elif mask.shape == (hidden.shape[0], 1):
            weights = decode_kernels.as_array(mask.to(hidden.dtype))
        else:
            return None
        ring = state.get("conv_ring")
        if k.conv is not None and (ring is None or ring.linear is None or ring.linear is not state.get("conv")):
            ring = k.conv.ring(state, hidden.shape[0], hidden.dtype, hidden.device)
        out, out_ptr = k.outputs.take()
        alpha = np.empty_like(k.scratch) if self.record_gate else k.scratch
        ring_array, slot = (k.no_ring, 0) if ring is None else (ring.array, ring.slot)
        bad = k.hash_fuse(
            pending.raw, pending.history_ptr, pending.next_ptr, hidden.data_ptr(), out_ptr, weights, ring_array, slot,
            alpha, k.table, k.ints, k.floats,
        )  # fmt: skip
        if bad != -1:
            if bad <= k.BAD_RAW:
                raise self.hasher.out_of_vocabulary(int(pending.raw_ids[k.BAD_RAW - bad, 0]))
            self._kernel_failed(bad, k)
        pending.rolled = True
        return self._kernel_done(out, alpha, ring, state)

    def _kernel_step(
        self, hidden: torch.Tensor, hash_ids: torch.Tensor, mask: torch.Tensor | None, state: dict, k: KernelStep
    ) -> torch.Tensor:
        """:meth:`_decode_step` in one call of the fused CPU kernel ``fuse_step`` (:mod:`engram.decode_kernels`),
        for hash ids; everything that does not change between steps is bound once in ``k``."""
        b = hidden.shape[0]
        if hash_ids.dtype != torch.int64:
            self.table.check_layout(hash_ids)  # raises
        if k.device_table:
            ids, table, ints = decode_kernels.as_array(hash_ids), k.table, k.ints
        else:  # a host / disk / sharded table gathers (and checks) its rows; read in order
            rows = self.table(hash_ids).to(hidden.dtype).reshape(b, -1, self.config.head_dim)
            ids, ints = k.row_layout(b, rows.shape[1])
            table = decode_kernels.as_array(rows.view(-1, self.config.head_dim))
        if hidden.shape != k.shape:
            k.bind(hidden)
        weights = k.ones if mask is None else decode_kernels.as_array(mask.to(hidden.dtype))
        ring = None
        if k.conv is not None:
            ring = k.conv.ring(state, b, hidden.dtype, hidden.device)
        out = np.empty(k.shape, dtype=k.floats.dtype)
        alpha = np.empty_like(k.scratch) if self.record_gate else k.scratch
        ring_array, slot = (k.no_ring, 0) if ring is None else (ring.array, ring.slot)
        h = decode_kernels.as_array(hidden)
        bad = k.fuse(h, ids, weights, ring_array, slot, out, alpha, table, ints, k.floats)
        if bad != -1:
            self._kernel_failed(bad, k)
        return self._kernel_done(torch.from_numpy(out), alpha, ring, state)

    def _kernel_failed(self, code: int, k: KernelStep) -> None:
        """Raise the error a layer kernel's return ``code`` stands for (see ``fuse_step``)."""
        if code == k.BAD_SHAPE:
            shape = "" if k.shape is None else f" (hidden {tuple(k.shape)})"
            raise ValueError(
                f"the decoding state of Engram layer {self.layer_id} does not fit this step{shape}: its ShortConv "
                "context or mask is for another batch; start a new state for a new batch"
            )
        raise ValueError(OUT_OF_RANGE)

    def _kernel_done(self, out: torch.Tensor, alpha: np.ndarray, ring: ConvRing | None, state: dict) -> torch.Tensor:
        """After a kernel step: move the ring on, record the gate, hand out the output."""
        if ring is not None:
            ring.advance()
            state["conv"] = ring.linear
        if self.record_gate and self.key_projs:
            self.last_gate = torch.from_numpy(alpha).view(alpha.shape[0], 1, alpha.shape[1])
        return out

    def _decode_step(
        self, hidden: torch.Tensor, hash_ids: torch.Tensor, mask: torch.Tensor | None, state: dict
    ) -> torch.Tensor:
        """Y for one new token per sequence without gradients (a generation step): hidden [B, 1, M, D].

        The equations of the full forward with the work of a single position cut down to a few dozen dispatches
        (at the demo size each costs about as much as its arithmetic): one gather, one matmul for the value, the
        keys and the gain-scaled keys, the gate's three reductions in one ``vecdot``, and the ShortConv through
        its ring buffer (:meth:`ShortConv.decode_step`); the parameter-derived tensors are kept in ``state``
        (:class:`StepConstants`, built by :meth:`_step_constants`). On the CPU in float32/float64 with numba
        installed, all of it is one call of a fused kernel instead (:meth:`_kernel_step`,
        :mod:`engram.decode_kernels`). Equal to the full forward up to float rounding (tests check every path).
        """
        b, _, m, d = hidden.shape
        c = StepConstants.lookup(state, "constants", lambda: self._step_constants(hidden.dtype, hidden.device))
        if c.kernel is not None and decode_kernels.cpu_kernels_enabled():
            return self._kernel_step(hidden, hash_ids, mask, state, c.kernel)
        h = hidden.view(b, m, d)
        if c.table_weight is not None:
            self.table.check_ids(hash_ids)
            e = F.embedding(hash_ids + c.offsets, c.table_weight).view(b, -1)
        else:
            e = self.retrieve(hash_ids).view(b, -1)  # [B, d_mem]
        if e.dtype != h.dtype:
            e = e.to(h.dtype)
        vk = F.linear(e, c.weight, c.bias).view(b, -1, d)  # [B, 1 + 2M, D]: v, keys, gain-scaled keys
        value = vk[:, :1]
        if self.key_projs:
            s = torch.cat([h, vk[:, 1:]], dim=1)  # [B, 3M, D]
            if s.dtype != c.compute:
                s = s.to(c.compute)
            q = torch.add(c.eps, torch.linalg.vecdot(s.index_select(1, c.pair_rows), s), alpha=1.0 / d).view(b, 3, m)
            score = q[:, 2] * (q[:, 0] * q[:, 1]).rsqrt()
            if self.config.signed_sqrt:
                score = score.sign() * score.abs().clamp_min(1e-6).sqrt()
            alpha = torch.sigmoid(score)  # [B, M]
            if self.record_gate:
                self.last_gate = alpha.view(b, 1, m)
            gated = (alpha if alpha.dtype == value.dtype else alpha.to(value.dtype)).unsqueeze(-1) * value
        else:
            gated = value.expand(b, m, d)
        if mask is not None:
            gated = gated * mask.view(b, 1, 1).to(gated.dtype)
        if self.short_conv is not None:
            gated = gated + self.short_conv.decode_step(gated, state)
        return gated.view(b, 1, m, d)

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
        if type(hash_ids) is PendingStep and state is not None:  # EngramLM's decode step: first, the fused kernel
            y = self._pending_step(hidden, hash_ids, mask, state)
            if y is not None:
                return y
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
        b, t = hidden.shape[:2]
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, t)):
            raise ValueError(
                f"mask must be bool [B, T] = [{b}, {t}] (True = real token), got {mask.dtype} {tuple(mask.shape)}"
            )
        decode = t == 1 and state is not None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if isinstance(hash_ids, PendingStep):  # where the fused kernel does not apply: hash the token here
            if t != 1 or hash_ids.batch_size != b:
                raise ValueError(f"a PendingStep holds one token for {hash_ids.batch_size} sequences, got [{b}, {t}]")
            hash_ids = hash_ids.ids(self.layer_id)
        if hash_ids is None:
            if input_ids is None:
                raise ValueError("Engram.forward needs hash_ids (from NgramHasher.hash) or input_ids")
            hash_ids = self.hasher.hash_tokens(input_ids)[self.layer_id]
        if hash_ids.dim() != 3 or tuple(hash_ids.shape) != (b, t, self.config.num_heads_total):
            raise ValueError(
                f"hash_ids must be [B, T, (N-1)K] = [{b}, {t}, {self.config.num_heads_total}] for this hidden, "
                f"got {tuple(hash_ids.shape)}"
            )

        if decode:
            y = self._decode_step(hidden, hash_ids, mask, state)
            return y.squeeze(2) if single else y

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
