"""One config for every model family: ``dense``, ``moe``, ``engram`` (MoE + Engram) and ``overencoding``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import EngramConfig
from ..yamlio import dataclass_from_dict

FAMILIES = ("dense", "moe", "engram", "overencoding")
ATTENTIONS = ("mha", "mla")
ROPE_SCALINGS = ("yarn",)


@dataclass
class RopeScaling:
    """RoPE context extension; ``type="yarn"`` is YaRN (Peng et al. 2023, arXiv 2309.00071) in DeepSeek-V2/V3's
    parameterisation, so a DeepSeek ``rope_scaling`` block maps field for field (see docs/long_context.md).

    - ``factor``: s, the scale factor; frequencies of the dims that rotate fewer than ``beta_slow`` times over
      ``original_max_seq_len`` are divided by s (position interpolation), those rotating more than ``beta_fast``
      times are kept, and a linear ramp over the dim index blends the dims in between (NTK-by-parts).
    - ``original_max_seq_len``: L, the context the model was pre-trained at.
    - ``beta_fast`` / ``beta_slow``: the YaRN paper's beta and alpha (32 and 1 in the paper and in DeepSeek-V3).
    - ``mscale`` / ``mscale_all_dim``: attention temperature. With ``m(c) = 0.1 c ln s + 1`` the softmax scale
      is multiplied by ``m(mscale_all_dim)^2`` and cos/sin by ``m(mscale) / m(mscale_all_dim)``; the YaRN paper's
      ``sqrt(1/t) = 0.1 ln s + 1`` on every logit is ``mscale = mscale_all_dim = 1`` (or ``mscale = 1,
      mscale_all_dim = 0`` for MHA, where every dim is rotary). The Engram paper's f = 0.707 is ``mscale =
      mscale_all_dim = 0.707``: ``sqrt(1/t) = 0.0707 ln s + 1`` on the whole logit, as in DeepSeek-V2.

    ``factor = 1`` is the identity: the frequencies and the scale are today's RoPE exactly.
    """

    type: str = "yarn"
    factor: float = 1.0
    original_max_seq_len: int = 1024
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling.type must be one of {ROPE_SCALINGS}, got {self.type!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"rope_scaling.factor (s) must be >= 1 (1 = no extension), got {self.factor}")
        if self.original_max_seq_len <= 0:
            raise ValueError(
                f"rope_scaling.original_max_seq_len must be the positive pre-training context, got "
                f"{self.original_max_seq_len}"
            )
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(
                f"rope_scaling needs 0 < beta_slow < beta_fast (the paper's alpha = 1, beta = 32), got "
                f"beta_slow={self.beta_slow}, beta_fast={self.beta_fast}"
            )
        if self.mscale < 0 or self.mscale_all_dim < 0:
            raise ValueError(
                f"rope_scaling.mscale and mscale_all_dim must be >= 0, got {self.mscale}, {self.mscale_all_dim}"
            )


@dataclass
class OverEncodingConfig:
    """Hashed n-gram *input* embeddings (Over-Tokenized Transformer, arXiv 2501.16975).

    For each order n = 2..max_ngram_size a table of ``table_size`` rows (rounded up to a prime, distinct per order)
    of width ``hidden_size`` is indexed by the hashed n-gram ending at t; the rows are averaged with the token
    embedding at the input. Hashing reuses Engram's multiplicative-XOR hash (one head per order).
    """

    table_size: int = 4096
    max_ngram_size: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.table_size < 2 or self.max_ngram_size < 2:
            raise ValueError(f"OverEncoding needs table_size >= 2 and max_ngram_size >= 2, got {self}")


@dataclass
class ModelConfig:
    """Decoder-only LM. ``family`` picks the FFN and memory:

    - ``dense``: SwiGLU FFN in every block.
    - ``moe``: the first ``first_k_dense`` blocks dense, the rest DeepSeek-style MoE.
    - ``engram``: ``moe`` plus Engram at ``engram.layer_ids`` (0-based block indices).
    - ``overencoding``: ``moe`` plus hashed n-gram input embeddings (``overencoding``).
    """

    family: str = "moe"
    vocab_size: int = 32000
    hidden_size: int = 256
    num_layers: int = 4
    max_seq_len: int = 1024
    # attention
    attention: str = "mha"
    num_heads: int = 4
    num_kv_heads: int | None = None  # GQA when < num_heads; None = num_heads
    head_dim: int | None = None  # None = hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None  # context extension (YaRN); None = plain RoPE
    # MLA (attention == "mla"), DeepSeek-V2/V3 naming
    q_lora_rank: int = 0  # 0 = queries not compressed
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # FFN
    intermediate_size: int = 688  # dense SwiGLU width
    moe_intermediate_size: int = 128  # one expert's SwiGLU width
    n_shared_experts: int = 1
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    first_k_dense: int = 1  # leading dense blocks in MoE families
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step (DeepSeek-V3 gamma)
    # residual
    hc_mult: int = 1  # M residual branches; 1 = plain residual, >1 = mHC
    hc_sinkhorn_iters: int = 20
    # memory
    engram: EngramConfig | None = None
    overencoding: OverEncodingConfig | None = None
    # misc
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.engram, dict):
            self.engram = EngramConfig.from_dict(self.engram)
        if isinstance(self.overencoding, dict):
            self.overencoding = OverEncodingConfig(**self.overencoding)
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = dataclass_from_dict(RopeScaling, self.rope_scaling, "model.rope_scaling")
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.family != "dense"

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.first_k_dense

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "max_seq_len", "num_heads", "hc_mult"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.kv_heads}")
        if self.attention == "mha" and self.attn_head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.attn_head_dim}")
        if self.attention == "mla" and self.qk_rope_head_dim % 2:
            raise ValueError(f"RoPE needs an even qk_rope_head_dim, got {self.qk_rope_head_dim}")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                    f"({self.n_routed_experts})"
                )
            if not 0 <= self.first_k_dense <= self.num_layers:
                raise ValueError(f"first_k_dense must be in 0..num_layers, got {self.first_k_dense}")
        if self.family == "engram":
            if self.engram is None:
                raise ValueError("family 'engram' needs an engram config (EngramConfig)")
            self.engram.validate(self.num_layers)
        elif self.engram is not None:
            raise ValueError(f"family {self.family!r} takes no engram config; use family='engram'")
        if self.family == "overencoding" and self.overencoding is None:
            raise ValueError("family 'overencoding' needs an overencoding config (OverEncodingConfig)")
        if self.family != "overencoding" and self.overencoding is not None:
            raise ValueError(f"family {self.family!r} takes no overencoding config")

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict; ``rope_scaling`` only when set, so that the config of a model without
        context extension is the dict it was before the field existed (old checkpoints resume against it)."""
        d = dataclasses.asdict(self)
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        return dataclass_from_dict(cls, d)

    def replace(self, **changes: Any) -> "ModelConfig":
        d = self.to_dict()
        d.update(changes)
        return ModelConfig.from_dict(d)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Load a JSON or YAML config file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            from ..yamlio import load_yaml

            d = load_yaml(text, source=str(path))
        else:
            d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a mapping of ModelConfig fields")
        return cls.from_dict(d.get("model", d))
