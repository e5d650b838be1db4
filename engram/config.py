"""Engram configuration.

Field names follow the public reference (``deepseek-ai/Engram``, ``engram_demo_v1.py``) so that configs can be
ported as they are; the extra switches at the end are ours (ablations and the paper/reference gate choice).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tokenizer import CompressedTokenizer

from .yamlio import dataclass_from_dict


def _default_vocab_sizes() -> list[int]:
    return [129280 * 5, 129280 * 5]


@dataclass
class EngramConfig:
    """Hyper-parameters of the Engram conditional-memory layers of one model.

    Attributes:
        engram_vocab_size: one configured table size per n-gram order (orders 2..N). Each hash head of that
            order gets its own prime-sized table starting at this size (the *per-head* size, as in the paper's
            "Engram vocab size").
        max_ngram_size: N, the largest n-gram order (>= 2).
        n_embed_per_ngram: embedding width per order; split evenly across the K heads of that order.
        n_head_per_ngram: K, hash heads per order.
        layer_ids: 0-based block indices that carry an Engram module (the paper's 1-based "layers 2 and 15"
            are blocks 1 and 14).
        pad_id: *raw* tokenizer id used for positions before the sequence start; it is mapped through the
            compressed tokenizer (as the reference does) to get the compressed pad id.
        seed: base seed of the per-layer hash multipliers.
        kernel_size: ShortConv kernel width (dilation is ``max_ngram_size``).
        signed_sqrt: apply the reference's signed square root to the gate score before the sigmoid
            (``False`` gives the paper's plain ``sigmoid(q.k / sqrt(d))``).
        gating: context-aware gating on (ablation switch; off means alpha = 1).
        short_conv: ShortConv on (ablation switch).
        compress_tokens: hash compressed ids (ablation switch; off hashes raw ids).
        multi_branch: branch-specific fusion with one gate key per residual branch; off applies one fusion to
            the branch-mixed hidden state (ablation switch, only meaningful with several residual branches).
        projection_bias: bias terms in the key and value projections W_K, W_V (the reference has them;
            DeepSeek-V4.1 does not, see :meth:`from_hf_config`).
        gate_norm_eps: epsilon of the gate's two RMSNorms (query and key). ``None`` (default) is torch's
            default, the machine epsilon of the input's dtype (1.2e-7 in float32, 7.8e-3 in bfloat16), which is
            what the public reference's ``nn.RMSNorm(hidden_size)`` uses; a fixed 1e-5 moves outputs by up to
            0.2% against it. The ShortConv norms keep 1e-5, as in the reference.
    """

    engram_vocab_size: list[int] = field(default_factory=_default_vocab_sizes)
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    signed_sqrt: bool = True
    gating: bool = True
    short_conv: bool = True
    compress_tokens: bool = True
    multi_branch: bool = True
    projection_bias: bool = True
    gate_norm_eps: float | None = None

    def __post_init__(self) -> None:
        self.engram_vocab_size = [int(v) for v in self.engram_vocab_size]
        self.layer_ids = [int(v) for v in self.layer_ids]
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_orders(self) -> int:
        """Number of n-gram orders, N - 1 (orders 2..N)."""
        return self.max_ngram_size - 1

    @property
    def num_heads_total(self) -> int:
        """Hash heads per Engram layer, (N - 1) * K."""
        return self.num_orders * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """Width of one head's table row, ``n_embed_per_ngram / K``."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """d_mem, the width of the concatenated retrieval e_t, ``(N - 1) * n_embed_per_ngram``."""
        return self.num_orders * self.n_embed_per_ngram

    # ------------------------------------------------------------------ validation / io
    def validate(self, num_layers: int | None = None) -> None:
        """Raise ``ValueError`` with a fix-it message when the config is inconsistent.

        ``num_layers`` (the backbone depth), when given, also checks that every layer id names a block.
        """
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2 (bigrams are the smallest order), got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.num_orders:
            raise ValueError(
                f"engram_vocab_size needs one table size per n-gram order 2..{self.max_ngram_size} "
                f"({self.num_orders} values), got {len(self.engram_vocab_size)}: {self.engram_vocab_size}"
            )
        if any(v < 2 for v in self.engram_vocab_size):
            raise ValueError(f"every engram_vocab_size must be >= 2, got {self.engram_vocab_size}")
        for name in ("n_embed_per_ngram", "n_head_per_ngram", "kernel_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be divisible by n_head_per_ngram "
                f"({self.n_head_per_ngram}); pick a width that splits evenly across the heads"
            )
        if not self.layer_ids:
            raise ValueError("layer_ids is empty: name at least one 0-based block index for Engram")
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids has duplicates: {self.layer_ids}")
        if any(i < 0 for i in self.layer_ids):
            raise ValueError(f"layer_ids are 0-based block indices and must be >= 0, got {self.layer_ids}")
        if num_layers is not None and any(i >= num_layers for i in self.layer_ids):
            raise ValueError(
                f"layer_ids {self.layer_ids} name blocks outside a {num_layers}-block model "
                f"(valid: 0..{num_layers - 1}; the paper's 1-based layer 2 is block 1)"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.gate_norm_eps is not None and not self.gate_norm_eps > 0:
            raise ValueError(
                f"gate_norm_eps must be > 0 or None (the dtype's machine epsilon), got {self.gate_norm_eps}"
            )
        if self.pad_id < 0:
            raise ValueError(f"pad_id is a raw tokenizer id and must be >= 0, got {self.pad_id}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngramConfig":
        return dataclass_from_dict(cls, d)

    # ------------------------------------------------------------------ DeepSeek-V4.1 configs
    @classmethod
    def from_hf_config(cls, d: dict[str, Any], tokenizer: CompressedTokenizer | None = None) -> EngramConfig:
        """The Engram config of a DeepSeek-V4.1-style ``config.json`` (its ``text_config``, or the dict itself).

        Reads ``engram_layer_ids``, ``engram_vocab_size`` (one per-head table size for every order, or one per
        order), ``engram_max_ngram_size``, ``engram_n_heads``, ``engram_head_dim``, ``engram_pad_token_id``, and
        checks the derived sizes against the checkpoint's: the prime table sizes of each layer must add up to
        ``engram_num_embeddings`` and, when ``tokenizer`` (a :class:`~engram.tokenizer.CompressedTokenizer`) is
        given, its V' must be ``engram_compressed_vocab_size``; otherwise the hash ids would address other rows
        than the ones the tables were trained on, so the config is refused. V4.1's module has no ShortConv and
        bias-free key / value projections, hence ``short_conv=False, projection_bias=False``.
        """
        d = d.get("text_config", d)
        required = (
            "engram_layer_ids",
            "engram_vocab_size",
            "engram_max_ngram_size",
            "engram_n_heads",
            "engram_head_dim",
            "engram_pad_token_id",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(
                f"not a DeepSeek-V4.1-style Engram config: missing {missing} (expected the keys "
                f"{list(required)}, in text_config or at the top level)"
            )
        n = int(d["engram_max_ngram_size"])
        sizes = d["engram_vocab_size"]
        sizes = [int(sizes)] * (n - 1) if isinstance(sizes, (int, float)) else [int(v) for v in sizes]
        heads, head_dim = int(d["engram_n_heads"]), int(d["engram_head_dim"])
        config = cls(
            engram_vocab_size=sizes,
            max_ngram_size=n,
            n_embed_per_ngram=heads * head_dim,
            n_head_per_ngram=heads,
            layer_ids=list(d["engram_layer_ids"]),
            pad_id=int(d["engram_pad_token_id"]),
            short_conv=False,
            projection_bias=False,
        )
        if "engram_num_embeddings" in d:
            primes = table_primes(config)
            rows = [sum(p for heads_of_order in primes[layer] for p in heads_of_order) for layer in config.layer_ids]
            if [int(r) for r in d["engram_num_embeddings"]] != rows:
                raise ValueError(
                    f"engram_num_embeddings {list(d['engram_num_embeddings'])} are not the table rows these keys "
                    f"derive ({rows} for layers {config.layer_ids}: per head the next unused prime from "
                    f"engram_vocab_size): the vocab size, n-gram size, head count or layer ids are wrong"
                )
        if tokenizer is not None:
            want = d.get("engram_compressed_vocab_size")
            if want is None:
                raise ValueError("a tokenizer was given but the config has no engram_compressed_vocab_size to check")
            if tokenizer.compressed_vocab_size != int(want):
                raise ValueError(
                    f"the tokenizer compresses to V' = {tokenizer.compressed_vocab_size}, the config says "
                    f"engram_compressed_vocab_size = {want}: the hash multipliers depend on V', so this tokenizer "
                    f"would address other rows; use the tokenizer the checkpoint was trained with"
                )
        return config


# ---------------------------------------------------------------------------------------------------- table sizes
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
