"""The numba kernels behind :mod:`engram.decode_kernels` (imported only when they are used: numba is optional).

Module-level functions, so that numba's on-disk cache also holds :func:`hash_fuse_step`, which calls the other two.
"""

from __future__ import annotations

import math

import numba
import numpy as np

jit = numba.njit(cache=True, nogil=True)


@jit
def hash_next_token(raw, lookup, history, mult, primes, ids, next_history):
    """raw [B, 1] raw ids; lookup [V] raw -> compressed; history [B, N-1] compressed ids, oldest first;
    mult [L, N] odd multipliers; primes [L, N-1, K]. Writes ids [L, B, 1, (N-1)K] (per-head rows, the
    order of ``NgramHasher.hash``) and next_history [B, N-1]. Returns -1, or the first sequence whose raw id
    lies outside [0, V) (nothing is written for it)."""
    b_size, n_hist = history.shape
    n_layers, n_orders, k_heads = primes.shape
    vocab = lookup.shape[0]
    for b in range(b_size):
        tok = raw[b, 0]
        if tok < 0 or tok >= vocab:
            return b
        s0 = lookup[tok]
        for layer in range(n_layers):
            mix = s0 * mult[layer, 0]  # int64 products wrap, as numpy's and torch's do
            for o in range(n_orders):
                # order n = o + 2 adds the token o + 1 positions back: history column n_hist - 1 - o
                mix ^= history[b, n_hist - 1 - o] * mult[layer, o + 1]
                for k in range(k_heads):
                    ids[layer, b, 0, o * k_heads + k] = mix % primes[layer, o, k]  # non-negative for p > 0
        for j in range(n_hist - 1):
            next_history[b, j] = history[b, j + 1]
        if n_hist:
            next_history[b, n_hist - 1] = s0
    return -1


@jit
def fuse_step(
    h, ids, mask, ring, slot, out, alpha_out,
    offsets, sizes, table, weight_t, bias, gains, eps_q, eps_k, gating, signed_sqrt, dilation, taps,
    conv_gains, conv_eps,
):  # fmt: skip
    """One position per sequence; see :meth:`engram.module.Engram._decode_step` for the equations.

    h [B, 1, M, D]; ids [B, 1, H] per-head rows, head j reading table row ``offsets[j] + ids[b, j]`` and holding
    ``sizes[j]`` rows; table [R, head_dim]; weight_t [d_mem, (1+M')D] the value and
    (with gating, M' = M) key projections transposed; bias [(1+M')D]; gains [M, D] = g_q * g_k;
    mask [B, 1] (1 = real token); ring [B, 2R, M*D] the ShortConv ring (R = 0 without ShortConv) written at
    ``slot`` and ``slot + R``; taps [w, M*D]; conv_gains [M, D]. Writes out [B, 1, M, D] and alpha_out [B, M].
    Returns -1, or ``b * H + j`` for the first id outside its head (nothing is read from the table then).
    """
    b_size, _, m_size, d = h.shape
    n_heads = ids.shape[2]
    head_dim = table.shape[1]
    n_out = weight_t.shape[1]
    r = ring.shape[1] // 2
    w = taps.shape[0]
    vk = np.empty(n_out, dtype=weight_t.dtype)  # the projection accumulates in the model's dtype, as torch's
    inv_sqrt_d = 1.0 / math.sqrt(d)
    for b in range(b_size):
        for j in range(n_heads):
            if ids[b, 0, j] < 0 or ids[b, 0, j] >= sizes[j]:
                return b * n_heads + j
    for b in range(b_size):
        for o in range(n_out):
            vk[o] = bias[o]
        for j in range(n_heads):  # e = concatenated rows; vk = W e + bias, accumulated row by row
            row = offsets[j] + ids[b, 0, j]
            for c in range(head_dim):
                x = table[row, c]
                wrow = weight_t[j * head_dim + c]
                for o in range(n_out):
                    vk[o] += wrow[o] * x
        for m in range(m_size):
            alpha = 1.0
            if gating:
                hh = 0.0
                kk = 0.0
                hk = 0.0
                key = (1 + m) * d
                for i in range(d):
                    hv = h[b, 0, m, i]
                    kv = vk[key + i]
                    hh += hv * hv
                    kk += kv * kv
                    hk += hv * kv * gains[m, i]
                score = hk * inv_sqrt_d / math.sqrt((hh / d + eps_q) * (kk / d + eps_k))
                if signed_sqrt:  # sign(x) * sqrt(max(|x|, 1e-6)), sign(0) = 0
                    mag = math.sqrt(max(abs(score), 1e-6))
                    score = mag if score > 0 else (-mag if score < 0 else score)
                alpha = 1.0 / (1.0 + math.exp(-score))
                alpha_out[b, m] = alpha
            alpha *= mask[b, 0]
            if r == 0:
                for i in range(d):
                    out[b, 0, m, i] = alpha * vk[i]
                continue
            vv = 0.0
            for i in range(d):
                g = alpha * vk[i]
                out[b, 0, m, i] = g
                vv += g * g
            inv_rms = 1.0 / math.sqrt(vv / d + conv_eps)
            base = m * d
            for i in range(d):
                x = out[b, 0, m, i] * inv_rms * conv_gains[m, i]
                ring[b, slot, base + i] = x
                ring[b, slot + r, base + i] = x
            for i in range(d):  # taps read every N-th row of the last R positions, oldest first
                y = 0.0
                for j in range(w):
                    y += ring[b, slot + 1 + j * dilation, base + i] * taps[j, base + i]
                out[b, 0, m, i] += y / (1.0 + math.exp(-y))
    return -1


@jit
def hash_fuse_step(
    raw, lookup, history, mult, primes, next_history, h, mask, ring, slot, out, alpha_out,
    offsets, sizes, table, weight_t, bias, gains, eps_q, eps_k, gating, signed_sqrt, dilation, taps,
    conv_gains, conv_eps,
):  # fmt: skip
    """:func:`hash_next_token` for one layer (mult [1, N], primes [1, N-1, K]) straight into
    :func:`fuse_step`: a whole Engram layer of a decode step in one call. Returns -1, ``-2 - b`` for a raw
    id of sequence b outside the vocabulary, or fuse_step's code for a hash id outside its head."""
    b_size = h.shape[0]
    ids = np.empty((1, b_size, 1, primes.shape[1] * primes.shape[2]), dtype=np.int64)
    bad = hash_next_token(raw, lookup, history, mult, primes, ids, next_history)
    if bad >= 0:
        return -2 - bad
    return fuse_step(
        h, ids[0], mask, ring, slot, out, alpha_out, offsets, sizes, table, weight_t, bias, gains, eps_q,
        eps_k, gating, signed_sqrt, dilation, taps, conv_gains, conv_eps,
    )  # fmt: skip
