"""engram: conditional memory (Engram, arXiv 2601.07372) for language models in PyTorch.

Data flows one way: token ids -> compressed ids (:class:`CompressedTokenizer`) -> hash ids
(:class:`NgramHasher`) -> table rows -> gated value -> residual (:class:`Engram`).
"""

from .accounting import EngramCounts, engram_counts
from .config import EngramConfig
from .decode_kernels import cpu_kernels_enabled, set_cpu_kernels
from .hashing import NgramHasher
from .module import Engram, MultiHeadEmbedding, ShortConv
from .table import EngramTable
from .tokenizer import CompressedTokenizer
from .validation import set_validation, validation_enabled

__all__ = [
    "CompressedTokenizer",
    "Engram",
    "EngramConfig",
    "EngramCounts",
    "EngramTable",
    "MultiHeadEmbedding",
    "NgramHasher",
    "ShortConv",
    "cpu_kernels_enabled",
    "engram_counts",
    "set_cpu_kernels",
    "set_validation",
    "validation_enabled",
]
__version__ = "0.1.0"
