"""The numba kernels behind :mod:`engram.decode_kernels` (imported only when they are used: numba is optional).

Module-level functions, so that numba's on-disk cache also holds :func:`hash_fuse_step`, which calls the others.

An Engram layer's constants reach the layer kernels as two flat arrays built once by :func:`pack_layer`: ``ints``
(int64: a header of sizes and flags, then the heads' row offsets and sizes, then the hashing constants) and
``floats`` (the model's dtype: projections, gains, conv taps, epsilons). In a model a decode step runs with cold
caches, where numba's unboxing of every array argument is a noticeable part of a layer's call: the packed form
keeps it at twelve arguments instead of twenty-six, and the tensors that are new at every step (ids, histories,
hidden state, output) reach :func:`hash_fuse_step` as addresses, so no numpy array is made for them.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

jit = numba.njit(cache=True, nogil=True)

# the header of ``ints``: what each entry holds (the sections follow it in this order: offsets [H], sizes [H],
# lookup [V], multipliers [N], primes [(N-1) K])
N_HEADS, GATING, SIGNED_SQRT, DILATION, N_TAPS, N_HIST, K_HEADS, VOCAB, BRANCHES, WIDTH, HEADER = range(11)
# what the layer kernels return besides -1 (done) and, from fuse_step, ``b * H + j`` >= 0 for an id outside its
# head: BAD_SHAPE where an argument does not fit the layer, and ``BAD_RAW - b`` for sequence b's raw id outside
# the vocabulary
BAD_SHAPE, BAD_RAW = -2, -3


@intrinsic
def _pointer_like(typingctx, address, like):
    """A pointer to ``like``'s dtype at the integer ``address`` (a tensor's ``data_ptr()``)."""
    if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
        return None
    pointer = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer))

    return pointer(address, like), codegen


def pack_layer(
    offsets, sizes, weight_t, bias, gains, taps, conv_gains, eps_q, eps_k, conv_eps, gating, signed_sqrt, dilation,
    lookup=None, mult=None, primes=None,
):  # fmt: skip
    """``(ints, floats)`` of one layer (see the module docstring). ``weight_t`` [d_mem, (1+M')D] is the value
    and (with gating) key projections transposed, ``bias`` [(1+M')D], ``gains`` [M, D] = g_q * g_k, ``taps``
    [w, M*D] (w = 0 without ShortConv), ``conv_gains`` [M, D]; ``lookup`` [V] raw -> compressed ids, ``mult`` [N]
    and ``primes`` [N-1, K] this layer's hashing constants (None where the layer is given hash ids only)."""
    if lookup is None:
        lookup, mult, primes = np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros((0, 0), np.int64)
    header = np.zeros(HEADER, dtype=np.int64)
    header[[N_HEADS, GATING, SIGNED_SQRT, DILATION, N_TAPS, N_HIST, K_HEADS, VOCAB, BRANCHES, WIDTH]] = [
        len(offsets), gating, signed_sqrt, dilation, taps.shape[0], primes.shape[0], primes.shape[1], len(lookup),
        *gains.shape,
    ]  # fmt: skip
    ints = np.concatenate([header, offsets, sizes, lookup, np.ravel(mult), np.ravel(primes)]).astype(np.int64)
    parts = [weight_t, bias, gains, taps, conv_gains, np.array([eps_q, eps_k, conv_eps])]
    floats = np.concatenate([np.ravel(p).astype(weight_t.dtype) for p in parts])
    return ints, floats


def with_heads(ints, offsets, sizes):
    """``ints`` with other head offsets and sizes (rows that another table gathered, in their own layout)."""
    out = ints.copy()
    n = out[N_HEADS]
    out[HEADER : HEADER + n], out[HEADER + n : HEADER + 2 * n] = offsets, sizes
    return out


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
def fuse_step(h, ids, mask, ring, slot, out, alpha_out, table, ints, floats):
    """One position per sequence; see :meth:`engram.module.Engram._decode_step` for the equations.

    h [B, 1, M, D]; ids [B, 1, H] per-head rows, head j reading table row ``offsets[j] + ids[b, 0, j]`` and
    holding ``sizes[j]`` rows; table [R, head_dim]; mask [B, 1] (1 = real token); ring [B, 2R, M*D] the
    ShortConv ring (R = 0 without ShortConv) written at ``slot`` and ``slot + R``; ``ints`` / ``floats`` from
    :func:`pack_layer`. Writes out [B, 1, M, D] and alpha_out [B, M]. Returns -1, ``BAD_SHAPE`` where an array
    does not fit the layer, or ``b * H + j`` for the first id outside its head (nothing is read or written then).
    """
    b_size, _, m_size, d = h.shape
    n_heads, w, dilation = ints[N_HEADS], ints[N_TAPS], ints[DILATION]
    gating, signed_sqrt = ints[GATING] != 0, ints[SIGNED_SQRT] != 0
    offsets = ints[HEADER : HEADER + n_heads]
    sizes = ints[HEADER + n_heads : HEADER + 2 * n_heads]
    head_dim = table.shape[1]
    d_mem, md = n_heads * head_dim, m_size * d
    n_out = d * (1 + m_size) if gating else d
    p = d_mem * n_out
    weight_t = floats[:p].reshape((d_mem, n_out))
    bias = floats[p : p + n_out]
    p += n_out
    gains = floats[p : p + md]
    taps = floats[p + md : p + md + w * md].reshape((w, md))
    p += md + w * md
    conv_gains = floats[p : p + md]
    eps_q, eps_k, conv_eps = floats[p + md], floats[p + md + 1], floats[p + md + 2]
    r = ring.shape[1] // 2
    n_floats = d_mem * n_out + n_out + md + w * md + md + 3
    if (
        m_size != ints[BRANCHES] or d != ints[WIDTH] or out.shape != h.shape or floats.shape[0] != n_floats
        or ids.shape[0] != b_size or ids.shape[2] != n_heads or mask.shape[0] != b_size
        or alpha_out.shape[0] != b_size or alpha_out.shape[1] != m_size
        or (r > 0 and (ring.shape[0] != b_size or ring.shape[2] != md or r != (w - 1) * dilation + 1))
    ):  # fmt: skip
        return BAD_SHAPE
    for b in range(b_size):
        for j in range(n_heads):
            if ids[b, 0, j] < 0 or ids[b, 0, j] >= sizes[j]:
                return b * n_heads + j
    vk = np.empty((b_size, n_out), dtype=floats.dtype)  # accumulates in the model's dtype, as torch's matmul
    for b in range(b_size):
        vk[b] = bias
    for j in range(n_heads):  # e = concatenated rows; vk = W e + bias, one weight row at a time for all b
        for c in range(head_dim):
            wrow = weight_t[j * head_dim + c]
            for b in range(b_size):
                x = table[offsets[j] + ids[b, 0, j], c]
                acc = vk[b]
                for o in range(n_out):
                    acc[o] += wrow[o] * x
    inv_sqrt_d = 1.0 / math.sqrt(d)
    for b in range(b_size):
        for m in range(m_size):
            base = m * d
            alpha = 1.0
            if gating:
                hh = 0.0
                kk = 0.0
                hk = 0.0
                key = (1 + m) * d
                for i in range(d):
                    hv = h[b, 0, m, i]
                    kv = vk[b, key + i]
                    hh += hv * hv
                    kk += kv * kv
                    hk += hv * kv * gains[base + i]
                score = hk * inv_sqrt_d / math.sqrt((hh / d + eps_q) * (kk / d + eps_k))
                if signed_sqrt:  # sign(x) * sqrt(max(|x|, 1e-6)), sign(0) = 0
                    mag = math.sqrt(max(abs(score), 1e-6))
                    score = mag if score > 0 else (-mag if score < 0 else score)
                alpha = 1.0 / (1.0 + math.exp(-score))
                alpha_out[b, m] = alpha
            alpha *= mask[b, 0]
            if r == 0:
                for i in range(d):
                    out[b, 0, m, i] = alpha * vk[b, i]
                continue
            vv = 0.0
            for i in range(d):
                g = alpha * vk[b, i]
                out[b, 0, m, i] = g
                vv += g * g
            inv_rms = 1.0 / math.sqrt(vv / d + conv_eps)
            for i in range(d):
                x = out[b, 0, m, i] * inv_rms * conv_gains[base + i]
                ring[b, slot, base + i] = x
                ring[b, slot + r, base + i] = x
            for i in range(d):  # taps read every N-th row of the last R positions, oldest first
                y = 0.0
                for j in range(w):
                    y += ring[b, slot + 1 + j * dilation, base + i] * taps[j, base + i]
                out[b, 0, m, i] += y / (1.0 + math.exp(-y))
    return -1


@jit
def hash_fuse_step(raw, history, next_history, h, out, mask, ring, slot, alpha_out, table, ints, floats):
    """Hash the raw ids after the history with this layer's constants in ``ints`` (as :func:`hash_next_token`
    does, writing the next history), then :func:`fuse_step`: a whole Engram layer of a decode step in one call.

    ``raw`` [B, 1], ``history`` and ``next_history`` [B, N-1] (int64), ``h`` and ``out`` [B, 1, M, D] (the model's
    dtype) are the addresses of C-contiguous CPU tensors of those shapes, B = ``mask.shape[0]``: the caller
    checks them, and so a step hands its tensors to the kernel without making numpy arrays of them (in a model
    each costs more than the arithmetic of the layer). Returns -1, ``BAD_RAW - b`` for a raw id of sequence b
    outside the vocabulary, or fuse_step's code."""
    n_heads, n_hist, k_heads, vocab = ints[N_HEADS], ints[N_HIST], ints[K_HEADS], ints[VOCAB]
    b, shape = mask.shape[0], (mask.shape[0], 1, ints[BRANCHES], ints[WIDTH])
    p = HEADER + 2 * n_heads
    lookup = ints[p : p + vocab]
    mult = ints[p + vocab : p + vocab + n_hist + 1].reshape((1, n_hist + 1))
    primes = ints[p + vocab + n_hist + 1 : p + vocab + n_hist + 1 + n_hist * k_heads].reshape((1, n_hist, k_heads))
    ids = np.empty((1, b, 1, n_heads), dtype=np.int64)
    bad = hash_next_token(
        numba.carray(_pointer_like(raw, ints), (b, 1)), lookup, numba.carray(_pointer_like(history, ints), (b, n_hist)),
        mult, primes, ids, numba.carray(_pointer_like(next_history, ints), (b, n_hist)),
    )  # fmt: skip
    if bad >= 0:
        return BAD_RAW - bad
    h_array = numba.carray(_pointer_like(h, floats), shape)
    out_array = numba.carray(_pointer_like(out, floats), shape)
    return fuse_step(h_array, ids[0], mask, ring, slot, out_array, alpha_out, table, ints, floats)
