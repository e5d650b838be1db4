"""Causal self-attention for the backbone: multi-head / grouped-query (``mha``) and Multi-head Latent (``mla``).

Both take the same arguments, so a block does not care which one it holds::

    forward(x [B, T, D], positions [B, T], cache=None, key_mask=None) -> [B, T, D]

- ``positions``: absolute position of every token of x (int64). They drive RoPE only, so rows of a left-padded
  batch may start at different offsets.
- ``cache``: a :class:`LayerKVCache`. If it holds ``T_past`` steps, x is appended as slots ``T_past..T_past+T-1``
  and the queries attend over all ``T_past + T`` slots.
- ``key_mask``: bool ``[B, T_past + T]``, True where a key slot is a real token (False = padding), over the whole
  cached + new length. New query i (slot ``T_past + i``) sees the key slots j with ``j <= T_past + i`` and
  ``key_mask[:, j]``. A query always sees its own slot, so a padding query (which has no valid key before it in a
  left-padded row) gets a finite output instead of NaN; that output is garbage and must be ignored downstream.

Without ``cache`` and ``key_mask`` the SDPA ``is_causal`` fast path is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, RopeScaling


# ---------------------------------------------------------------------------------------------------- RoPE
def yarn_mscale(factor: float, coefficient: float) -> float:
    """YaRN's attention-temperature factor ``m = 0.1 * coefficient * ln(s) + 1`` (1 for s <= 1).

    The YaRN paper's ``sqrt(1/t) = 0.1 ln s + 1`` is coefficient 1; DeepSeek-V2 (and the Engram paper, f = 0.707)
    use 0.707. Logits scale with ``m^2``: q and k are each scaled by m.
    """
    if factor <= 1.0:
        return 1.0
    return 0.1 * coefficient * math.log(factor) + 1.0


def yarn_ramp_bounds(dim: int, base: float, scaling: RopeScaling) -> tuple[float, float]:
    """The dim-pair indices where YaRN's NTK-by-parts ramp starts and ends, ``[low, high]`` within ``[0, dim/2 - 1]``.

    Pair i has wavelength ``lambda_i = 2 pi base^(2i/dim)`` and makes ``r_i = L / lambda_i`` rotations over the
    pre-training context L. ``r_i = beta`` at ``i(beta) = dim ln(L / (2 pi beta)) / (2 ln base)``; pairs below
    ``low = floor(i(beta_fast))`` rotate often (kept as they are), pairs above ``high = ceil(i(beta_slow))`` rotate
    less than beta_slow times (interpolated by s). Rounded outward to whole pairs, as in DeepSeek-V2/V3's code.
    """
    length = scaling.original_max_seq_len

    def pair_at(rotations: float) -> float:
        return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_at(scaling.beta_fast)), 0)
    high = min(math.ceil(pair_at(scaling.beta_slow)), dim // 2 - 1)
    return float(low), float(high)


class RotaryEmbedding(nn.Module):
    """RoPE angles (Su et al. 2021) for integer positions, optionally YaRN-scaled for a longer context.

    ``theta_i = base^(-2i/dim)`` for i = 0..dim/2-1 and the angle of position p is ``p * theta_i``.
    ``forward(positions [B, T]) -> (cos, sin)``, each float32 ``[B, T, dim/2]``. The frequencies are recomputed
    on every call (dim/2 numbers), so there is no buffer to move, materialise or checkpoint.

    With ``scaling`` (:class:`~engram.model.config.RopeScaling`, factor s > 1), YaRN's NTK-by-parts frequencies
    ``h(theta_i) = (1 - gamma_i) theta_i / s + gamma_i theta_i``, with gamma_i 1 below the ramp
    (:func:`yarn_ramp_bounds`), 0 above it and linear in i between; cos and sin are multiplied by
    :attr:`rotary_mscale`. Factor 1 (or no scaling) gives plain RoPE bit for bit.
    """

    def __init__(self, dim: int, base: float = 10000.0, scaling: RopeScaling | None = None):
        super().__init__()
        if dim <= 0 or dim % 2:
            raise ValueError(f"RoPE needs a positive even dim, got {dim}")
        self.dim, self.base = dim, base
        self.scaling = scaling if scaling is not None and scaling.factor > 1.0 else None
        self.rotary_mscale = 1.0
        if self.scaling is not None:
            s = self.scaling
            self.rotary_mscale = yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """The float32 frequencies ``[dim/2]``: ``theta_i``, or YaRN's ``h(theta_i)`` when scaling is on."""
        exponent = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        inv_freq = self.base**-exponent  # [dim/2]
        if self.scaling is None:
            return inv_freq
        low, high = yarn_ramp_bounds(self.dim, self.base, self.scaling)
        pair = torch.arange(self.dim // 2, device=device, dtype=torch.float32)
        interpolated = ((pair - low) / max(high - low, 1e-3)).clamp(0, 1)  # 1 - gamma_i
        return inv_freq / self.scaling.factor * interpolated + inv_freq * (1 - interpolated)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq(positions.device)  # [B, T, dim/2]
        if self.rotary_mscale == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * self.rotary_mscale, angles.sin() * self.rotary_mscale


def softmax_scale_factor(scaling: RopeScaling | None) -> float:
    """What YaRN multiplies the ``1/sqrt(d_qk)`` softmax scale by: ``m(mscale_all_dim)^2`` (1 without scaling)."""
    if scaling is None:
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, d] by (cos, sin) [B, T, d/2], pairing channel i with channel i + d/2 ("rotate-half").

    ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``, computed in float32 and returned in x's dtype.
    """
    if x.shape[-1] != 2 * cos.shape[-1]:
        raise ValueError(f"apply_rope: x has last dim {x.shape[-1]}, cos/sin are for dim {2 * cos.shape[-1]}")
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- cache
class LayerKVCache:
    """The cached keys/values of one attention layer; every tensor is ``[B, T, ...]`` and grows along dim 1.

    What is stored is up to the layer: :class:`Attention` keeps ``(k [B, T, H_kv, d], v [B, T, H_kv, d])`` with
    RoPE already applied to k; :class:`MLAttention` keeps ``(c_kv [B, T, kv_lora_rank], k_rope [B, T, 1,
    qk_rope_head_dim])``, the normalised latent and the RoPE'd shared key. Make one per layer, empty.
    """

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor, ...] = ()

    @property
    def length(self) -> int:
        """Number of cached time steps (0 when empty)."""
        return self.tensors[0].shape[1] if self.tensors else 0

    def update(self, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append this step's tensors along time and return the full cached tensors."""
        if not self.tensors:
            self.tensors = tuple(new)
            return self.tensors
        old_shapes = [tuple(t.shape[:1]) + tuple(t.shape[2:]) for t in self.tensors]
        new_shapes = [tuple(t.shape[:1]) + tuple(t.shape[2:]) for t in new]
        if old_shapes != new_shapes:
            raise ValueError(
                f"LayerKVCache.update: cached tensors have [B, *, ...] shapes {old_shapes}, new ones {new_shapes}; "
                "a cache belongs to one layer and one batch, call reset() before reusing it"
            )
        self.tensors = tuple(torch.cat((old, t), dim=1) for old, t in zip(self.tensors, new))
        return self.tensors

    def reset(self) -> None:
        self.tensors = ()


# ---------------------------------------------------------------------------------------------------- masks
def _check_inputs(
    x: torch.Tensor, positions: torch.Tensor, past: int, key_mask: torch.Tensor | None, hidden_size: int
) -> None:
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"attention input must be [B, T, {hidden_size}], got {tuple(x.shape)}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"positions must be [B, T] = {tuple(x.shape[:2])}, got {tuple(positions.shape)}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor (absolute token positions), got {positions.dtype}")
    if key_mask is not None:
        expected = (x.shape[0], past + x.shape[1])
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != expected:
            raise ValueError(
                f"key_mask must be bool [B, T_past + T] = {expected} (cached {past} + new {x.shape[1]} slots, "
                f"True = real token), got {key_mask.dtype} {tuple(key_mask.shape)}"
            )


def attention_mask(
    q_len: int, past: int, key_mask: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """The SDPA ``(attn_mask, is_causal)`` pair for q_len new queries after ``past`` cached slots.

    Returns ``(None, True)`` for the plain causal case, ``(None, False)`` for one query with no padding (it may
    see everything), else a bool mask ``[B or 1, 1, q_len, past + q_len]`` (True = may attend).
    """
    if key_mask is None and past == 0:
        return None, True
    if key_mask is None and q_len == 1:
        return None, False
    slots = torch.arange(past + q_len, device=device)
    query_slot = (past + torch.arange(q_len, device=device)).unsqueeze(1)  # [T, 1]
    allowed = slots <= query_slot  # [T, S] causal
    if key_mask is not None:
        # keep the query's own slot so that a row with no valid key (leading padding) is not all -inf (NaN)
        allowed = (allowed & key_mask.unsqueeze(1)) | (slots == query_slot)  # [B, T, S]
    else:
        allowed = allowed.unsqueeze(0)
    return allowed.unsqueeze(1), False


# ---------------------------------------------------------------------------------------------------- MHA / GQA
class Attention(nn.Module):
    """Causal multi-head attention with RoPE and grouped-query heads, no biases.

    ``q = x W_q``, ``k = x W_k``, ``v = x W_v`` with H query heads and H_kv = cfg.kv_heads key/value heads
    (each shared by H / H_kv query heads); ``o = softmax(RoPE(q) RoPE(k)^T / sqrt(d) + causal) v``; ``y = o W_o``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.attn_head_dim
        d = self.head_dim
        self.wq = nn.Linear(cfg.hidden_size, self.num_heads * d, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=False)
        self.wo = nn.Linear(self.num_heads * d, cfg.hidden_size, bias=False)
        self.rope = RotaryEmbedding(d, cfg.rope_theta, cfg.rope_scaling)
        # None = SDPA's own 1/sqrt(d) (today's path, bit for bit); YaRN's temperature multiplies it
        factor = softmax_scale_factor(cfg.rope_scaling)
        self.scale = None if factor == 1.0 else factor * d**-0.5

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerKVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        past = cache.length if cache is not None else 0
        _check_inputs(x, positions, past, key_mask, self.hidden_size)
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.num_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = self.rope(positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # [B, T_past + T, H_kv, d]
        group = self.num_heads // self.num_kv_heads
        if group > 1:  # explicit repeat (portable: SDPA's enable_gqa is limited to some kernels)
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        mask, is_causal = attention_mask(t, past, key_mask, x.device)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scale,
        )
        return self.wo(o.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


# ---------------------------------------------------------------------------------------------------- MLA
class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434; as used in DeepSeek-V3), no biases.

    Queries (optionally low-rank, ``q_lora_rank > 0``)::

        q = W_UQ RMSNorm(W_DQ x)   (or q = W_Q x),   q_i = [q_i^nope ; RoPE(q_i^rope)]

    Keys/values from a shared latent plus one decoupled RoPE key shared by all heads::

        c_kv = RMSNorm(W_DKV x)  (kv_lora_rank wide),   k^rope = RoPE(W_KR x)  (qk_rope_head_dim wide)
        [k_i^nope ; v_i] = W_UKV c_kv,   k_i = [k_i^nope ; k^rope]

    ``o_i = softmax(q_i k_i^T / sqrt(qk_nope_head_dim + qk_rope_head_dim) + causal) v_i``, ``y = W_O [o_1..o_H]``.
    The cache holds only ``c_kv`` and ``k^rope`` (kv_lora_rank + qk_rope_head_dim numbers per token, for all
    heads); per-head keys and values are re-expanded from it with ``W_UKV`` at every step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        if min(self.kv_lora_rank, self.nope_dim + self.rope_dim, self.v_dim) <= 0 or self.q_lora_rank < 0:
            raise ValueError(
                f"MLA needs kv_lora_rank, qk_nope_head_dim + qk_rope_head_dim and v_head_dim > 0 and q_lora_rank "
                f">= 0, got {self.kv_lora_rank}, {self.nope_dim}+{self.rope_dim}, {self.v_dim}, {self.q_lora_rank}"
            )
        qk_dim = self.nope_dim + self.rope_dim
        self.scale = qk_dim**-0.5 * softmax_scale_factor(cfg.rope_scaling)  # YaRN: the whole logit, nope part too
        h, d_model = self.num_heads, cfg.hidden_size
        if self.q_lora_rank > 0:
            self.wq_a = nn.Linear(d_model, self.q_lora_rank, bias=False)  # W_DQ
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, h * qk_dim, bias=False)  # W_UQ (nope and rope parts)
        else:
            self.wq = nn.Linear(d_model, h * qk_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, self.kv_lora_rank + self.rope_dim, bias=False)  # [W_DKV ; W_KR]
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, h * (self.nope_dim + self.v_dim), bias=False)  # W_UKV
        self.wo = nn.Linear(h * self.v_dim, d_model, bias=False)
        self.rope = RotaryEmbedding(self.rope_dim, cfg.rope_theta, cfg.rope_scaling) if self.rope_dim else None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: LayerKVCache | None = None,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        past = cache.length if cache is not None else 0
        _check_inputs(x, positions, past, key_mask, self.hidden_size)
        b, t, _ = x.shape
        h = self.num_heads
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank > 0 else self.wq(x)
        q_nope, q_rope = q.view(b, t, h, self.nope_dim + self.rope_dim).split([self.nope_dim, self.rope_dim], -1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)  # [B, T, r_kv]
        k_rope = k_rope.unsqueeze(2)  # [B, T, 1, d_rope]
        if self.rope is not None:
            cos, sin = self.rope(positions)
            q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope)  # [B, S, r_kv], [B, S, 1, d_rope]
        s = c_kv.shape[1]
        k_nope, v = self.wkv_b(c_kv).view(b, s, h, self.nope_dim + self.v_dim).split([self.nope_dim, self.v_dim], -1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(b, s, h, self.rope_dim)), dim=-1)
        mask, is_causal = attention_mask(t, past, key_mask, x.device)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scale,
        )
        return self.wo(o.transpose(1, 2).reshape(b, t, h * self.v_dim))


def build_attention(cfg: ModelConfig) -> nn.Module:
    """``cfg.attention``: ``"mha"`` -> :class:`Attention` (GQA when num_kv_heads < num_heads), ``"mla"`` ->
    :class:`MLAttention`."""
    if cfg.attention == "mha":
        return Attention(cfg)
    if cfg.attention == "mla":
        return MLAttention(cfg)
    raise ValueError(f"cfg.attention must be 'mha' or 'mla', got {cfg.attention!r}")
