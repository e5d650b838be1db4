"""Independent plain-numpy reference of Engram's multi-head n-gram hashing.

Written from the text of the spec (issue #2), on purpose without importing ``engram``: the tests compare the
library against this file, so a shared mistake would need to be made twice, in two different styles.

- Multipliers of layer ``l``: ``default_rng(seed + 10007*l).integers(0, half, size=N, dtype=int64)`` with
  ``half = max(1, ((2**63 - 1) // V') // 2)``; ``m_i = 2*r_i + 1``.
- Table sizes: over layers (config order), orders 2..N, heads 1..K; every head takes the smallest prime that is
  greater than the previous head's prime of the same order (the first head of an order: >= the configured size)
  and not taken by any earlier head of the model. Primality by plain trial division.
- Hash: ``s_i`` = compressed token ``i`` positions back (the compressed pad id before the sequence start);
  ``mix_n = XOR_{i<n} s_i * m_i`` in wrapping int64; head ``(n, k)`` = ``mix_n mod p_{n,k}`` (non-negative).
  Output ``[B, T, (N-1)K]``, order-major then head.
"""

from __future__ import annotations

import numpy as np

INT64_MAX = 2**63 - 1


def is_prime_trial(n: int) -> bool:
    """Trial division by 2, 3 and 6j +- 1."""
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0 or n % 3 == 0:
        return False
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def ref_multipliers(seed: int, layer_id: int, max_ngram_size: int, vprime: int) -> np.ndarray:
    half = max(1, (INT64_MAX // vprime) // 2)
    gen = np.random.default_rng(seed + 10007 * layer_id)
    draws = gen.integers(0, half, size=max_ngram_size, dtype=np.int64)
    return draws * np.int64(2) + np.int64(1)


def ref_primes(layer_ids: list[int], sizes_per_order: list[int], heads: int) -> dict[int, list[list[int]]]:
    taken: set[int] = set()
    result: dict[int, list[list[int]]] = {}
    for layer in layer_ids:
        orders = []
        for size in sizes_per_order:
            chosen: list[int] = []
            for k in range(heads):
                cand = size if k == 0 else chosen[-1] + 1
                while cand in taken or not is_prime_trial(cand):
                    cand += 1
                taken.add(cand)
                chosen.append(cand)
            orders.append(chosen)
        result[layer] = orders
    return result


def ref_offsets(primes_of_layer: list[list[int]]) -> np.ndarray:
    flat = np.array([p for order in primes_of_layer for p in order], dtype=np.int64)
    out = np.zeros_like(flat)
    out[1:] = np.cumsum(flat)[:-1]
    return out


def ref_hash_layer(tokens: np.ndarray, mults: np.ndarray, primes_of_layer: list[list[int]], pad: int) -> np.ndarray:
    """tokens [B, T] compressed int64 -> [B, T, (N-1)K] int64 per-head ids for one layer."""
    tokens = np.asarray(tokens, dtype=np.int64)
    b, t = tokens.shape
    n_max = len(mults)
    # back[i][:, j] = token at position j - i, pad before the start
    back = []
    for i in range(n_max):
        arr = np.full((b, t), pad, dtype=np.int64)
        if i < t:
            arr[:, i:] = tokens[:, : t - i]
        back.append(arr)
    cols = []
    with np.errstate(over="ignore"):
        acc = np.zeros((b, t), dtype=np.int64)
        for n in range(1, n_max + 1):
            acc = np.bitwise_xor(acc, np.multiply(back[n - 1], mults[n - 1], dtype=np.int64))
            if n == 1:
                continue
            for p in primes_of_layer[n - 2]:
                cols.append(np.mod(acc, np.int64(p)))
    return np.stack(cols, axis=-1) if cols else np.zeros((b, t, 0), dtype=np.int64)


def ref_hash(
    tokens: np.ndarray,
    *,
    layer_ids: list[int],
    sizes_per_order: list[int],
    max_ngram_size: int,
    heads: int,
    seed: int,
    vprime: int,
    pad: int,
) -> dict[int, np.ndarray]:
    """All layers: ``{layer_id: [B, T, (N-1)K]}``."""
    primes = ref_primes(layer_ids, sizes_per_order, heads)
    return {
        l: ref_hash_layer(tokens, ref_multipliers(seed, l, max_ngram_size, vprime), primes[l], pad) for l in layer_ids
    }
