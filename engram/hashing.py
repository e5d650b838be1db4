"""Multi-head n-gram hashing (paper section 2.2), bit-exact with the public reference.

For an Engram layer l with odd multipliers m_0..m_{N-1} and compressed tokens s_i (the token i positions back,
positions before the sequence start take the compressed pad id)::

    mix_n(t)   = (s_0 * m_0) XOR (s_1 * m_1) XOR ... XOR (s_{n-1} * m_{n-1})      (wrapping int64)
    z_{n,k}(t) = mix_n(t) mod p_{n,k}                                                 (non-negative)

All K heads of one order share ``mix_n`` and differ only in their prime modulus p_{n,k}. Primes are distinct
across heads, orders and layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import EngramConfig

if TYPE_CHECKING:
    from .tokenizer import CompressedTokenizer

_INT64_MAX = 2**63 - 1


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for 64-bit integers."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def layer_multipliers(config: EngramConfig, layer_id: int, compressed_vocab_size: int) -> np.ndarray:
    """The N odd int64 multipliers of one Engram layer."""
    half = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(config.seed + 10007 * layer_id)
    r = rng.integers(0, half, size=config.max_ngram_size, dtype=np.int64)
    return r * 2 + 1


def table_primes(config: EngramConfig) -> dict[int, list[list[int]]]:
    """Per layer, per order, the K prime table sizes (distinct across the whole model)."""
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in config.layer_ids:
        per_order = []
        for size in config.engram_vocab_size:
            candidate = size - 1
            heads = []
            for _ in range(config.n_head_per_ngram):
                candidate += 1
                while candidate in seen or not is_prime(candidate):
                    candidate += 1
                seen.add(candidate)
                heads.append(candidate)
            per_order.append(heads)
        out[layer_id] = per_order
    return out


class NgramHasher:
    """Hashes compressed token ids into per-head table rows for every Engram layer at once.

    ``NgramHasher(config, compressed_vocab_size, compressed_pad_id)``, or ``NgramHasher.from_tokenizer(config,
    ctok)`` which takes V' and the pad id from a :class:`~engram.tokenizer.CompressedTokenizer` and can then also
    hash raw ids (:meth:`hash_tokens`).

    Attributes:
        multipliers: ``{layer_id: np.ndarray[int64] of length N}``.
        table_sizes: ``{layer_id: [[p_{2,1}..p_{2,K}], ..., [p_{N,1}..p_{N,K}]]}``.
        offsets: ``{layer_id: LongTensor[(N-1)K]}`` row offset of each head in that layer's fused table.
        num_rows: ``{layer_id: int}`` total rows of that layer's fused table.
    """

    def __init__(self, config: EngramConfig, compressed_vocab_size: int, compressed_pad_id: int,
                 tokenizer: "CompressedTokenizer | None" = None):
        config.validate()
        if compressed_vocab_size <= 0:
            raise ValueError(f"compressed_vocab_size must be positive, got {compressed_vocab_size}")
        if not 0 <= compressed_pad_id < compressed_vocab_size:
            raise ValueError(
                f"compressed_pad_id {compressed_pad_id} is outside the compressed vocabulary "
                f"[0, {compressed_vocab_size}); map the raw pad id through the CompressedTokenizer"
            )
        if tokenizer is not None and tokenizer.compressed_vocab_size != compressed_vocab_size:
            raise ValueError(
                f"compressed_vocab_size {compressed_vocab_size} does not match the tokenizer's V' "
                f"{tokenizer.compressed_vocab_size}: the multipliers would silently differ from the model's"
            )
        self.config = config
        self.compressed_vocab_size = int(compressed_vocab_size)
        self.compressed_pad_id = int(compressed_pad_id)
        self.tokenizer = tokenizer
        self.multipliers = {l: layer_multipliers(config, l, compressed_vocab_size) for l in config.layer_ids}
        self.table_sizes = table_primes(config)
        self.offsets: dict[int, torch.Tensor] = {}
        self.num_rows: dict[int, int] = {}
        for l, per_order in self.table_sizes.items():
            flat = [p for heads in per_order for p in heads]
            # host constants, explicitly on the CPU: also when the model is built under a meta-device context
            self.offsets[l] = torch.tensor([0] + np.cumsum(flat)[:-1].tolist(), dtype=torch.int64, device="cpu")
            self.num_rows[l] = int(sum(flat))
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_tokenizer(cls, config: EngramConfig, tokenizer: "CompressedTokenizer") -> "NgramHasher":
        if not 0 <= config.pad_id < tokenizer.vocab_size:
            raise ValueError(f"pad_id {config.pad_id} is outside the tokenizer's vocabulary (size {tokenizer.vocab_size})")
        pad = int(tokenizer.lookup[config.pad_id])
        return cls(config, tokenizer.compressed_vocab_size, pad, tokenizer)

    # ------------------------------------------------------------------ device constants
    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, N] multipliers and [L, (N-1)K] primes, cached per device."""
        cached = self._device_cache.get(device)
        if cached is None:
            mult = torch.from_numpy(np.stack([self.multipliers[l] for l in self.config.layer_ids]))
            primes = torch.tensor(
                [[p for heads in self.table_sizes[l] for p in heads] for l in self.config.layer_ids], dtype=torch.int64
            )
            cached = (mult.to(device), primes.to(device))
            self._device_cache[device] = cached
        return cached

    def _check_ids(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must be [batch, seq], got shape {tuple(ids.shape)}")
        ids = ids.to(torch.int64)
        if ids.numel():
            lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one host sync for both bounds
            if hi >= self.compressed_vocab_size:
                raise ValueError(
                    f"{name} holds id {hi} >= compressed vocab size {self.compressed_vocab_size}: pass "
                    f"compressed ids (CompressedTokenizer.compress), or use hash_tokens() for raw ids"
                )
            if lo < 0:
                raise ValueError(
                    f"{name} holds negative id {lo}: compressed ids must lie in [0, {self.compressed_vocab_size}); "
                    f"replace padding / ignore-index values (e.g. -100) by the pad token before hashing"
                )
        return ids

    # ------------------------------------------------------------------ hashing
    def _hash_padded(self, padded: torch.Tensor, t_out: int) -> dict[int, torch.Tensor]:
        """Hash the last ``t_out`` positions of ``padded`` [B, N-1+t_out] (left context already in place)."""
        n_max = self.config.max_ngram_size
        k = self.config.n_head_per_ngram
        mult, primes = self._constants(padded.device)
        total = padded.shape[1]
        # shifted[i] = token i positions back, for each output position
        shifted = [padded[:, total - t_out - i: total - i] for i in range(n_max)]
        out: dict[int, torch.Tensor] = {}
        for li, layer_id in enumerate(self.config.layer_ids):
            mix = shifted[0] * mult[li, 0]
            heads = []
            for n in range(2, n_max + 1):
                mix = torch.bitwise_xor(mix, shifted[n - 1] * mult[li, n - 1])
                p = primes[li, (n - 2) * k: (n - 1) * k]
                heads.append(torch.remainder(mix.unsqueeze(-1), p))
            out[layer_id] = torch.cat(heads, dim=-1)
        return out

    def hash(self, compressed_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hash a batch of compressed ids [B, T] -> ``{layer_id: LongTensor[B, T, (N-1)K]}``.

        The result is on the input's device; ids are per-head row indices (add :attr:`offsets` for the fused
        table; :class:`~engram.module.MultiHeadEmbedding` does that).
        """
        ids = self._check_ids(compressed_ids, "compressed_ids")
        pad = ids.new_full((ids.shape[0], self.config.max_ngram_size - 1), self.compressed_pad_id)
        return self._hash_padded(torch.cat([pad, ids], dim=1), ids.shape[1])

    def hash_incremental(self, history: torch.Tensor, new_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hash only new positions during decoding.

        Args:
            history: [B, N-1] the last N-1 compressed tokens of each sequence, oldest first (left-filled with the
                compressed pad id where a sequence is shorter; :meth:`initial_history` gives the empty state).
            new_ids: [B, T_new] compressed ids of the new tokens.

        Returns the same as :meth:`hash` over the whole sequence, restricted to the new positions. The cost is
        O(T_new): the prefix is never re-hashed. Use :meth:`advance_history` to roll the state forward.
        """
        history = self._check_ids(history, "history")
        new_ids = self._check_ids(new_ids, "new_ids")
        if history.shape != (new_ids.shape[0], self.config.max_ngram_size - 1):
            raise ValueError(
                f"history must be [batch={new_ids.shape[0]}, N-1={self.config.max_ngram_size - 1}], "
                f"got {tuple(history.shape)}"
            )
        return self._hash_padded(torch.cat([history.to(new_ids.device), new_ids], dim=1), new_ids.shape[1])

    def initial_history(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The decoding state of empty sequences: N-1 compressed pad ids each."""
        return torch.full((batch_size, self.config.max_ngram_size - 1), self.compressed_pad_id,
                          dtype=torch.int64, device=device)

    def advance_history(self, history: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        """Roll the [B, N-1] decoding state forward past ``new_ids`` [B, T_new]."""
        return torch.cat([history.to(new_ids.device), new_ids.to(torch.int64)], dim=1)[:, -(self.config.max_ngram_size - 1):]

    # ------------------------------------------------------------------ raw ids
    def compress(self, raw_ids: torch.Tensor) -> torch.Tensor:
        if self.tokenizer is None:
            raise RuntimeError("this hasher has no CompressedTokenizer; build it with NgramHasher.from_tokenizer")
        return self.tokenizer.compress(raw_ids)

    def hash_tokens(self, raw_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Compress raw token ids [B, T], then :meth:`hash` them."""
        return self.hash(self.compress(raw_ids))

    def __repr__(self) -> str:
        c = self.config
        return (f"NgramHasher(layers={c.layer_ids}, N={c.max_ngram_size}, K={c.n_head_per_ngram}, "
                f"V'={self.compressed_vocab_size}, pad={self.compressed_pad_id})")
