"""Training components, each usable alone: data, optimizers + schedule, checkpoints.

The model never imports from here; the trainer puts these pieces together.
"""

from .checkpoint import (
    CheckpointError,
    CheckpointManager,
    StopFlag,
    capture_rng_state,
    install_signal_handlers,
    restore_rng_state,
    verify_checkpoint,
)
from .data import (
    Corpus,
    TextTokenizer,
    TokenFile,
    TokenizedCorpus,
    bits_per_byte,
    build_token_files,
    eval_batches,
    load_corpus,
    load_tokenizer,
    random_batch,
)
from .optim import (
    LRSchedule,
    OptimConfig,
    RowWiseAdam,
    build_optimizers,
    clip_grad_norm,
    lr_factor,
    param_groups,
)

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "Corpus",
    "LRSchedule",
    "OptimConfig",
    "RowWiseAdam",
    "StopFlag",
    "TextTokenizer",
    "TokenFile",
    "TokenizedCorpus",
    "bits_per_byte",
    "build_optimizers",
    "build_token_files",
    "capture_rng_state",
    "clip_grad_norm",
    "eval_batches",
    "install_signal_handlers",
    "load_corpus",
    "load_tokenizer",
    "lr_factor",
    "param_groups",
    "random_batch",
    "restore_rng_state",
    "verify_checkpoint",
]
