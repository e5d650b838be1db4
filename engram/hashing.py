"""Multi-head n-gram hashing (paper section 2.2), bit-exact with the public reference.

For an Engram layer l with odd multipliers m_0..m_{N-1} and compressed tokens s_i (the token i positions back,
positions before the sequence start take the compressed pad id)::

    mix_n(t)   = (s_0 * m_0) XOR (s_1 * m_1) XOR ... XOR (s_{n-1} * m_{n-1})      (wrapping int64)
    z_{n,k}(t) = mix_n(t) mod p_{n,k}                                                 (non-negative)

All K heads of one order share ``mix_n`` and differ only in their prime modulus p_{n,k}. Primes are distinct
across heads, orders and layers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from . import decode_kernels
from .config import EngramConfig, is_prime, table_primes  # noqa: F401  (re-exported: the table sizes)
from .tokenizer import CompressedTokenizer
from .validation import validation_enabled

_INT64_MAX = 2**63 - 1

#: A call producing at least this many ids (layers x positions x heads) is bulk hashing: data preparation, a corpus
#: profile, a large CPU batch. Decode steps and prompts stay far below it, so they never meet compile latency.
BULK_IDS = 1 << 16
#: ``compile=None`` compiles the fused kernel once the process has hashed this many ids in eager bulk calls: about
#: 6 s of eager hashing at the measured ~3 ns per id, a little more than one compile costs with inductor's cache
#: warm (about 5 s of CPU; ski rental: pay for the compile only after having spent as much without it, so a job
#: never loses more than that to the choice). The kernel then hashes 2-3x faster than eager.
COMPILE_AFTER_IDS = 1 << 31


def layer_multipliers(config: EngramConfig, layer_id: int, compressed_vocab_size: int) -> np.ndarray:
    """The N odd int64 multipliers of one Engram layer."""
    half = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(config.seed + 10007 * layer_id)
    r = rng.integers(0, half, size=config.max_ngram_size, dtype=np.int64)
    return r * 2 + 1


def mod_primes_by_reciprocal(x: torch.Tensor, p: torch.Tensor, inv_p: torch.Tensor) -> torch.Tensor:
    """``x mod p`` (non-negative) for int64 ``x`` and primes ``2 <= p < 2^50``, without an integer division.

    ``inv_p`` is float64 ``1/p`` rounded once (Python's ``1.0 / p``); the three broadcast together. Eagerly this
    is a dozen memory passes, slower than ``torch.remainder``; it exists for ``torch.compile``, which fuses it
    into one loop of multiplies where a division would stay a division (:func:`hash_division_free`).

    Why it is exact (u = 2^-53, every float64 operation rounds to nearest with relative error <= u):

    1. ``y = fl(fl(x) * inv_p)`` with ``|x| <= 2^63``: three roundings, so ``|y - x/p| <= (2^63/p) *
       ((1+u)^3 - 1) < 3.0001 * 2^10 / p =: E``. ``q1 = floor(y)`` therefore differs from ``floor(x/p)`` by
       ``|d1| <= E + 1``, and ``|y| < 2^63`` so the conversion to int64 is exact.
    2. ``r1 = x - q1*p`` in wrapping int64: the true integer is ``(x mod p) - d1*p``, of magnitude
       ``< p + (E + 1) p < 3074 + 2p < 2^52``; it lies in int64, so the product's wrap-around modulo 2^64
       cancels and ``r1`` is that integer exactly (and exactly representable in float64).
    3. ``q2 = floor(fl(r1 * inv_p))``: ``r1`` is exact, two roundings give ``|fl(r1 * inv_p) - r1/p| <=
       |r1/p| * 2.0001u < 2^-40``, so ``q2`` is off ``floor(r1/p)`` by at most 1 and ``r2 = r1 - q2*p`` (exact,
       small) lies in ``[-p, 2p)``, congruent to ``x`` mod ``p``.
    4. One conditional ``+p`` and one conditional ``-p`` bring ``r2`` into ``[0, p)``.

    Step 3 is needed only for ``p < 3074`` (where ``E >= 1``); it is kept for every prime so that one code
    path serves all. The bound on ``p`` keeps ``r1`` exact in float64; table sizes are far below it. The same
    code runs on CUDA; two float64 multiplies per head are cheap on H100/H200, slow on GPUs with little FP64.
    """
    r = x - torch.floor(x.to(torch.float64) * inv_p).to(torch.int64) * p
    r = r - torch.floor(r.to(torch.float64) * inv_p).to(torch.int64) * p
    r = torch.where(r < 0, r + p, r)
    return torch.where(r >= p, r - p, r)


def hash_division_free(
    context: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, inv_primes: torch.Tensor
) -> torch.Tensor:
    """``z_{n,k}`` of every layer, position and head, ``[L, B, T, N-1, K]``, from compressed ids ``context``
    ``[B, N-1+T]`` (the N-1 left context of the first position in place), ``multipliers`` ``[L, N]``, ``primes``
    and their float64 ``inv_primes`` ``[L, N-1, K]``.

    The whole hash as one expression for ``torch.compile``, which turns it into a single loop: read N tokens,
    write (N-1)K ids per position and layer. Eagerly it would be many memory passes; :class:`NgramHasher` hashes
    eagerly with ``torch.remainder`` instead.
    """
    n_max, total = multipliers.shape[1], context.shape[1]
    mix = context[None, :, n_max - 1 :] * multipliers[:, 0, None, None]
    mixes = []
    for i in range(1, n_max):  # mix_{i+1} = mix_i XOR s_i * m_i, s_i the token i positions back
        mix = torch.bitwise_xor(mix, context[None, :, n_max - 1 - i : total - i] * multipliers[:, i, None, None])
        mixes.append(mix)
    mix = torch.stack(mixes, dim=-1)  # [L, B, T, N-1]
    return mod_primes_by_reciprocal(mix[..., None], primes[:, None, None], inv_primes[:, None, None])


class _BulkKernel:
    """The process's one ``torch.compile`` of :func:`hash_division_free`, shared by every hasher.

    Batch and sequence sizes are marked dynamic, so one compile serves every shape of a configuration; inductor
    keeps the compiled code in its on-disk cache, so a later process on the same machine compiles in seconds
    instead of tens of seconds. ``failure`` holds the reason when compiling failed (e.g. no C++ compiler);
    ``eager_bulk_ids`` counts the ids hashed eagerly in bulk calls, for the ``compile=None`` policy.
    """

    def __init__(self) -> None:
        self.fn = None
        self.failure: str | None = None
        self.eager_bulk_ids = 0

    def __call__(
        self, context: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor, inv_primes: torch.Tensor
    ) -> torch.Tensor:
        if self.fn is None:
            self.fn = torch.compile(hash_division_free, dynamic=False)
        for dim in (0, 1):  # a size of one specialises (torch.compile's rule): one more compile at worst
            if context.shape[dim] > 1:
                torch._dynamo.mark_dynamic(context, dim)
        return self.fn(context, multipliers, primes, inv_primes)


_bulk_kernel = _BulkKernel()


class NgramHasher:
    """Hashes compressed token ids into per-head table rows for every Engram layer at once.

    ``NgramHasher(config, compressed_vocab_size, compressed_pad_id)``, or ``NgramHasher.from_tokenizer(config,
    ctok)`` which takes V' and the pad id from a :class:`~engram.tokenizer.CompressedTokenizer` and can then also
    hash raw ids. The two kinds of ids never mix in one method: :meth:`hash` and :meth:`hash_incremental` take
    compressed ids, :meth:`hash_tokens` and :meth:`compress` take raw ids.

    Attributes:
        multipliers: ``{layer_id: np.ndarray[int64] of length N}``.
        table_sizes: ``{layer_id: [[p_{2,1}..p_{2,K}], ..., [p_{N,1}..p_{N,K}]]}``.
        offsets: ``{layer_id: LongTensor[(N-1)K]}`` row offset of each head in that layer's fused table.
        num_rows: ``{layer_id: int}`` total rows of that layer's fused table.

    Two bit-exact implementations: eager (``torch.remainder``, one integer division per id) and a compiled kernel
    (:func:`hash_division_free` through ``torch.compile``: one loop without divisions, 2-3x faster on the
    CPU). Eager cannot get there: each eager op is a memory pass, and one exact division-free reduction needs
    about eight of them. ``compile`` chooses:

    - ``None`` (default): eager, until this process has hashed :data:`COMPILE_AFTER_IDS` ids in bulk calls (at
      least :data:`BULK_IDS` ids each) on the CPU; from then on bulk calls use the compiled kernel. Compiling costs
      once per process about 5 s of CPU with inductor's on-disk cache warm and about 17 s cold (measured; three
      times that in wall time on a loaded machine), so only work that has already spent as much eagerly pays it:
      bulk hashing of a corpus, long CPU training runs. Decode steps and calls below :data:`BULK_IDS` neither
      count nor compile, so ``engram generate`` and short scripts never wait for a compile (a server that
      prefills billions of ids compiles once, like a long job). Where compiling fails (no C++
      compiler), a warning says so once and hashing stays eager. CUDA stays eager (not measured there yet).
    - ``True``: the compiled kernel for every call, compiling at the first (a failure raises).
    - ``False``: always eager.
    """

    def __init__(
        self,
        config: EngramConfig,
        compressed_vocab_size: int,
        compressed_pad_id: int,
        tokenizer: CompressedTokenizer | None = None,
        compile: bool | None = None,
    ):
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
        # mod_primes_by_reciprocal's bound; real tables are far below it
        divisible = max(p for per_order in self.table_sizes.values() for heads in per_order for p in heads) < 2**50
        if compile and not divisible:
            raise ValueError("compile=True needs table heads below 2^50 rows (mod_primes_by_reciprocal's bound)")
        self.compile = compile if divisible else False
        self._device_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._step_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see _hash_last
        self._kernel_step: Callable | None = None  # see hash_next_token
        self._kernel_consts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # see _kernel_arrays

    @classmethod
    def from_tokenizer(
        cls, config: EngramConfig, tokenizer: CompressedTokenizer, compile: bool | None = None
    ) -> NgramHasher:
        """The hasher of a model built with ``tokenizer``.

        With ``config.compress_tokens = False`` (the paper's "w/o tokenizer compression" ablation) ids are hashed
        uncompressed: the hasher keeps an identity compression of the same vocabulary (V' = V, same
        fingerprint), so :meth:`hash_tokens` hashes raw ids and :meth:`compress` returns them unchanged.
        """
        if not 0 <= config.pad_id < tokenizer.vocab_size:
            raise ValueError(
                f"pad_id {config.pad_id} is outside the tokenizer's vocabulary (size {tokenizer.vocab_size})"
            )
        if not config.compress_tokens:
            tokenizer = CompressedTokenizer.identity(tokenizer.vocab_size, tokenizer.fingerprint)
        pad = int(tokenizer.lookup[config.pad_id])
        return cls(config, tokenizer.compressed_vocab_size, pad, tokenizer, compile=compile)

    # ------------------------------------------------------------------ device constants
    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[L, N] multipliers, [L, N-1, K] primes and their float64 reciprocals, cached per device."""
        cached = self._device_cache.get(device)
        if cached is None:
            sizes = [self.table_sizes[l] for l in self.config.layer_ids]
            mult = torch.from_numpy(np.stack([self.multipliers[l] for l in self.config.layer_ids]))
            primes = torch.tensor(sizes, dtype=torch.int64)
            inv = torch.tensor(
                [[[1.0 / p for p in heads] for heads in per_order] for per_order in sizes], dtype=torch.float64
            )
            cached = (mult.to(device), primes.to(device), inv.to(device))
            self._device_cache[device] = cached
        return cached

    # ------------------------------------------------------------------ id checks
    @staticmethod
    def _as_ids(ids: torch.Tensor, name: str) -> torch.Tensor:
        """Type and shape checks (free: no device read); returns int64 ids."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name} must be [batch, seq], got shape {tuple(ids.shape)}")
        return ids.to(torch.int64)

    @staticmethod
    def _check_range(named: dict[str, torch.Tensor], size: int, what: str) -> None:
        """Raise unless every tensor holds ``what`` ("raw" or "compressed") ids in [0, size): one device-to-host
        read for all of them, and none when :func:`engram.validation.validation_enabled` is off."""
        named = {k: v for k, v in named.items() if v.numel()}
        if not named or not validation_enabled():
            return
        bounds = torch.stack([b for v in named.values() for b in torch.aminmax(v)]).tolist()
        for i, name in enumerate(named):
            lo, hi = bounds[2 * i], bounds[2 * i + 1]
            if hi >= size:
                raise ValueError(_TOO_LARGE[what].format(name=name, hi=hi, size=size))
            if lo < 0:
                raise ValueError(
                    f"{name} holds negative id {lo}: ids must lie in [0, {size}); replace padding / ignore-index "
                    f"values (e.g. -100) by the pad token before hashing"
                )

    # ------------------------------------------------------------------ hashing
    def _hash_context(self, context: torch.Tensor, t_out: int) -> dict[int, torch.Tensor]:
        """Hash the last ``t_out`` positions of compressed ids ``context`` [B, N-1+t_out] (the N-1 left context
        of the first output position already in place), all layers and heads at once."""
        n_max, k = self.config.max_ngram_size, self.config.n_head_per_ngram
        mult, primes, inv = self._constants(context.device)
        b, total = context.shape
        if not torch.compiler.is_compiling() and self._use_kernel(context.device, primes.numel() * b * t_out):
            try:
                heads = _bulk_kernel(context, mult, primes, inv)
                return {l: heads[li].view(b, t_out, (n_max - 1) * k) for li, l in enumerate(self.config.layer_ids)}
            except Exception as e:  # any failure of the optional compiler: the eager path below is just as exact
                if self.compile:
                    raise RuntimeError(f"NgramHasher(compile=True) could not compile its kernel: {e}") from e
                _bulk_kernel.failure = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(
                    f"NgramHasher: compiling the hash kernel failed ({_bulk_kernel.failure}); hashing stays eager "
                    f"(bit-exact, 2-3x slower for bulk calls)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        # s_i = the token i positions back, for every output position: [1, B, T] views, no copies
        shifted = [context[None, :, total - t_out - i : total - i] for i in range(n_max)]
        # mix[..., n-2] = mix_n of every layer [L, B, T]; each order's XOR builds on the previous one
        mixes = [shifted[0] * mult[:, 0, None, None]]
        for n in range(2, n_max + 1):
            mixes.append(torch.bitwise_xor(mixes[-1], shifted[n - 1] * mult[:, n - 1, None, None]))
        mix = torch.stack(mixes[1:], dim=-1)  # [L, B, T, N-1]
        if torch.compiler.is_compiling():
            # inside a caller's torch.compile: z_{n,k} of every layer and head in one broadcast op [L, B, T, N-1, K]
            # (the out= writes below would break the graph)
            heads = torch.remainder(mix[..., None], primes[:, None, None])
            return {l: heads[li].view(b, t_out, (n_max - 1) * k) for li, l in enumerate(self.config.layer_ids)}
        out: dict[int, torch.Tensor] = {}
        for li, layer_id in enumerate(self.config.layer_ids):
            heads = torch.empty((b, t_out, n_max - 1, k), dtype=torch.int64, device=context.device)
            for o in range(n_max - 1):  # z_{n,k} = mix_n mod p_{n,k}, written straight into the output
                torch.remainder(mix[li, :, :, o, None], primes[li, o], out=heads[:, :, o])
            out[layer_id] = heads.view(b, t_out, (n_max - 1) * k)
        return out

    def _use_kernel(self, device: torch.device, n_ids: int) -> bool:
        """Whether this call goes to the compiled kernel (see the class docstring for the ``compile`` policy);
        counts the eager bulk ids on the way."""
        if self.compile is not None or n_ids == 0:
            return bool(self.compile) and n_ids > 0
        if device.type != "cpu" or n_ids < BULK_IDS or _bulk_kernel.failure is not None:
            return False
        if _bulk_kernel.eager_bulk_ids >= COMPILE_AFTER_IDS:
            return True
        _bulk_kernel.eager_bulk_ids += n_ids
        return False

    def hash(self, compressed_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hash a batch of COMPRESSED ids [B, T] -> ``{layer_id: LongTensor[B, T, (N-1)K]}``.

        The result is on the input's device; ids are per-head row indices (add :attr:`offsets` for the fused
        table; :class:`~engram.module.MultiHeadEmbedding` does that). Raw token ids go to :meth:`hash_tokens`.
        """
        ids = self._as_ids(compressed_ids, "compressed_ids")
        self._check_range({"compressed_ids": ids}, self.compressed_vocab_size, "compressed")
        return self._hash_compressed(ids)

    def _hash_compressed(self, ids: torch.Tensor) -> dict[int, torch.Tensor]:
        pad = ids.new_full((ids.shape[0], self.config.max_ngram_size - 1), self.compressed_pad_id)
        return self._hash_context(torch.cat([pad, ids], dim=1), ids.shape[1])

    def hash_incremental(self, history: torch.Tensor, new_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Hash only new positions during decoding (compressed ids throughout).

        Args:
            history: [B, N-1] the last N-1 compressed tokens of each sequence, oldest first (left-filled with the
                compressed pad id where a sequence is shorter; :meth:`initial_history` gives the empty state).
            new_ids: [B, T_new] compressed ids of the new tokens.

        Returns the same as :meth:`hash` over the whole sequence, restricted to the new positions. The cost is
        O(T_new): the prefix is never re-hashed. Use :meth:`advance_history` to roll the state forward.
        """
        history = self._as_ids(history, "history")
        new_ids = self._as_ids(new_ids, "new_ids")
        if history.shape != (new_ids.shape[0], self.config.max_ngram_size - 1):
            raise ValueError(
                f"history must be [batch={new_ids.shape[0]}, N-1={self.config.max_ngram_size - 1}], "
                f"got {tuple(history.shape)}"
            )
        history = history.to(new_ids.device)
        self._check_range({"history": history, "new_ids": new_ids}, self.compressed_vocab_size, "compressed")
        return self.hash_continued(history, new_ids)[0]

    def hash_continued(
        self, history: torch.Tensor, new_ids: torch.Tensor
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """:meth:`hash_incremental` and :meth:`advance_history` in one pass over one concatenation, for callers
        that have checked both int64 tensors already (a decode step): ``(hash ids, next history)``."""
        context = torch.cat([history, new_ids], dim=1)
        if new_ids.shape[1] == 1 and not torch.compiler.is_compiling():
            return self._hash_last(context), context[:, 1:]
        return self._hash_context(context, new_ids.shape[1]), context[:, context.shape[1] - history.shape[1] :]

    def hash_next_token(
        self, history: torch.Tensor, raw_ids: torch.Tensor
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """A decode step: compress the RAW sampled ids [B, 1] (int64, known to lie in the vocabulary: a model's
        own samples), hash them after ``history`` and roll it: ``(hash ids, next history)``, the same as
        ``hash_continued(history, tokenizer.compress_valid(raw_ids))``. On the CPU this is one call of the fused
        kernel (:mod:`engram.decode_kernels`) where it applies; an id outside the vocabulary raises either way."""
        if raw_ids.device.type == "cpu" and not torch.compiler.is_compiling() and decode_kernels.cpu_kernels_enabled():
            step = self._kernel_step if self._kernel_step is not None else self._bind_kernel_step()
            return step(history, raw_ids)
        return self.hash_continued(history, self._require_tokenizer().compress_valid(raw_ids))

    def _bind_kernel_step(self) -> Callable[[torch.Tensor, torch.Tensor], tuple[dict, torch.Tensor]]:
        """:meth:`hash_next_token`'s kernel call with everything that does not change bound once: in a model the
        per-step Python around the kernel costs more than the kernel."""
        kernel = decode_kernels.kernels().hash_next_token
        lookup, mult, primes = self._kernel_arrays()
        layer_ids, n_layers = list(self.config.layer_ids), len(self.config.layer_ids)
        n_hist, n_heads = self.config.max_ngram_size - 1, self.config.num_heads_total
        arr = decode_kernels.as_array

        def step(history: torch.Tensor, raw_ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
            b = raw_ids.shape[0]
            ids = np.empty((n_layers, b, 1, n_heads), dtype=np.int64)
            next_history = np.empty((b, n_hist), dtype=np.int64)
            bad = kernel(arr(raw_ids), lookup, arr(history), mult, primes, ids, next_history)
            if bad >= 0:
                raise self.out_of_vocabulary(int(raw_ids[bad, 0]))
            heads = torch.from_numpy(ids)
            out = {layer_ids[0]: heads[0]} if n_layers == 1 else dict(zip(layer_ids, heads.unbind(0)))
            return out, torch.from_numpy(next_history)

        self._kernel_step = step
        return step

    def _kernel_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lookup [V], multipliers [L, N], primes [L, N-1, K])`` as the hashing kernels take them."""
        if self._kernel_consts is None:
            lookup = np.ascontiguousarray(self._require_tokenizer().lookup, dtype=np.int64)
            mult = np.stack([self.multipliers[l] for l in self.config.layer_ids])
            self._kernel_consts = (lookup, mult, self._constants(torch.device("cpu"))[1].numpy())
        return self._kernel_consts

    def layer_kernel_constants(self, layer_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_kernel_arrays` of one layer (``[1, N]`` multipliers, ``[1, N-1, K]`` primes), for the fused
        kernel that hashes a decode step's token inside that layer's call (:class:`PendingStep`)."""
        lookup, mult, primes = self._kernel_arrays()
        li = self.config.layer_ids.index(layer_id)
        return lookup, mult[li : li + 1], primes[li : li + 1]

    def out_of_vocabulary(self, tok: int) -> ValueError:
        """The error for a raw token id outside the tokenizer's vocabulary."""
        vocab = self._require_tokenizer().vocab_size
        if tok >= vocab:
            return ValueError(_TOO_LARGE["raw"].format(name="raw_ids", hi=tok, size=vocab))
        return ValueError(f"token id {tok} is negative; token ids must lie in [0, {vocab})")

    def _hash_last(self, context: torch.Tensor) -> dict[int, torch.Tensor]:
        """:meth:`_hash_context` for one output position (a decode step), every layer at once in a dozen ops.

        ``context`` [B, N] holds s_{N-1} .. s_0 (oldest first). One multiply gives s_i * m_i for every layer
        ([L, B, N], the multipliers reversed to the context's order), N-1 XORs build mix_2 .. mix_N from it,
        and one broadcast remainder takes every head of every layer: the same integers as the general path.
        """
        cached = self._step_cache.get(context.device)
        if cached is None:
            mult, primes, _ = self._constants(context.device)
            cached = self._step_cache[context.device] = (mult.flip(1)[:, None].contiguous(), primes[:, None])
        mult_reversed, primes = cached  # [L, 1, N], [L, 1, N-1, K]
        products = context[None] * mult_reversed  # [L, B, N]; column j = s_{N-1-j} * m_{N-1-j}
        columns = products.unbind(-1)
        mixes = [columns[-1]]
        for i in range(len(columns) - 2, -1, -1):
            mixes.append(torch.bitwise_xor(mixes[-1], columns[i]))
        heads = torch.remainder(torch.stack(mixes[1:], dim=-1)[..., None], primes)  # [L, B, N-1, K]
        heads = heads.view(heads.shape[0], context.shape[0], 1, -1)
        return dict(zip(self.config.layer_ids, heads.unbind(0)))

    def initial_history(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The decoding state of empty sequences: N-1 compressed pad ids each."""
        return torch.full(
            (batch_size, self.config.max_ngram_size - 1), self.compressed_pad_id, dtype=torch.int64, device=device
        )

    def advance_history(self, history: torch.Tensor, new_ids: torch.Tensor) -> torch.Tensor:
        """Roll the [B, N-1] decoding state forward past the compressed ids ``new_ids`` [B, T_new]."""
        return torch.cat([history.to(new_ids.device), new_ids.to(torch.int64)], dim=1)[
            :, -(self.config.max_ngram_size - 1) :
        ]

    # ------------------------------------------------------------------ raw ids
    def _require_tokenizer(self) -> CompressedTokenizer:
        if self.tokenizer is None:
            raise RuntimeError("this hasher has no CompressedTokenizer; build it with NgramHasher.from_tokenizer")
        return self.tokenizer

    def compress(self, raw_ids: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """RAW token ids -> compressed ids (:meth:`CompressedTokenizer.compress`; ``check=False`` for checked ids)."""
        return self._require_tokenizer().compress(raw_ids, check=check)

    def hash_tokens(self, raw_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Compress RAW token ids [B, T], then hash them as :meth:`hash` does (ids checked once, here)."""
        tokenizer = self._require_tokenizer()
        raw = self._as_ids(raw_ids, "raw_ids")
        self._check_range({"raw_ids": raw}, tokenizer.vocab_size, "raw")
        return self._hash_compressed(tokenizer.compress(raw, check=False))

    def __repr__(self) -> str:
        c = self.config
        return (
            f"NgramHasher(layers={c.layer_ids}, N={c.max_ngram_size}, K={c.n_head_per_ngram}, "
            f"V'={self.compressed_vocab_size}, pad={self.compressed_pad_id})"
        )


_TOO_LARGE = {
    "compressed": "{name} holds id {hi} >= compressed vocab size {size}: pass compressed ids "
    "(CompressedTokenizer.compress), or use hash_tokens() for raw ids",
    "raw": "{name} holds token id {hi}, out of range for a tokenizer with vocab size {size}: the ids come from a "
    "different (larger) tokenizer than the one this model was built with",
}


class PendingStep:
    """The hash ids of one decode step of sampled RAW ids, left to the Engram layers' fused CPU kernels.

    :meth:`engram.model.EngramLM.forward_checked` passes one to every Engram layer in place of hash ids when
    every table lives on the device (no table needs its ids early for a prefetch) and the kernels apply: each
    layer then hashes its own heads inside its one kernel call (``hash_fuse_step`` in
    :mod:`engram.decode_kernels`), which also writes the rolled history. Anyone else gets the ids from
    :meth:`ids`, the same as :meth:`NgramHasher.hash_next_token` gives.

    One object serves every step of a decoding state (:meth:`start` each step, :meth:`next_history` after it).
    The kernels take the ids and histories as addresses (``raw``, ``history_ptr``, ``next_ptr``) of the
    C-contiguous int64 CPU tensors kept here.
    """

    __slots__ = ("hasher", "history", "history_ptr", "_data", "_fresh", "raw_ids", "raw", "next", "next_ptr", "rolled",
                 "_hashed")  # fmt: skip

    def __init__(self, hasher: NgramHasher, history: torch.Tensor, raw_ids: torch.Tensor | None = None):
        self.hasher, self._fresh = hasher, None
        self._set_history(history)
        if raw_ids is not None:
            self.start(raw_ids)

    def _set_history(self, history: torch.Tensor) -> None:
        n_hist = self.hasher.config.max_ngram_size - 1
        if history.dim() != 2 or history.shape[1] != n_hist:
            raise ValueError(
                f"a decoding history is [B, N-1] = [B, {n_hist}] compressed ids, got {tuple(history.shape)}"
            )
        self.history = history  # the caller's tensor (EngramLM looks for it by identity)
        self._data = history.to(device="cpu", dtype=torch.int64).contiguous()  # history itself when it is one
        self.history_ptr = self._data.data_ptr()
        if self._fresh is None or self._fresh.shape != self._data.shape:
            self._fresh = decode_kernels.FreshTensors(self._data.shape, torch.int64)

    def start(self, raw_ids: torch.Tensor) -> None:
        """Begin the step of ``raw_ids`` [B, 1] after :attr:`history` [B, N-1]."""
        if raw_ids.dtype is not torch.int64 or not raw_ids.is_cpu or not raw_ids.is_contiguous():
            raw_ids = raw_ids.to(device="cpu", dtype=torch.int64).contiguous()
        if raw_ids.shape != (self._data.shape[0], 1):
            raise ValueError(
                f"a decode step takes raw ids [B, 1] for a history of B = {self._data.shape[0]} sequences, got "
                f"{tuple(raw_ids.shape)}"
            )
        self.raw_ids, self.raw = raw_ids, raw_ids.data_ptr()
        self.next, self.next_ptr = self._fresh.take()
        self.rolled = False  # True once a kernel has written the next history
        self._hashed: tuple[dict[int, torch.Tensor], torch.Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.raw_ids.shape[0]

    def ids(self, layer_id: int) -> torch.Tensor:
        """This step's hash ids of one layer [B, 1, (N-1)K], hashed on first use."""
        if self._hashed is None:
            self._hashed = self.hasher.hash_next_token(self.history, self.raw_ids)
        return self._hashed[0][layer_id]

    def next_history(self) -> torch.Tensor:
        """The decoding history after this step's token; it becomes :attr:`history` for the next :meth:`start`."""
        if self.rolled:
            self.history, self._data, self.history_ptr = self.next, self.next, self.next_ptr
        else:
            if self._hashed is None:
                self._hashed = self.hasher.hash_next_token(self.history, self.raw_ids)
            self._set_history(self._hashed[1])
        return self.history
