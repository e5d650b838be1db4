"""The ``transformers`` config of an exported engram model (``config.json`` of the folder ``engram export`` writes).

It carries the whole :class:`engram.model.ModelConfig` under ``engram_model`` (so the model is rebuilt exactly) and
mirrors the few fields ``transformers`` and lm-eval read (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``max_position_embeddings``, token ids). This file is copied into the exported folder and loaded there as remote
code (``trust_remote_code=True``); it imports nothing from ``engram`` so it loads even before the model file.
"""

from __future__ import annotations

from transformers import PreTrainedConfig


class EngramHFConfig(PreTrainedConfig):
    """``engram_model``: ``ModelConfig.to_dict()``; ``tokenizer_fingerprint`` / ``compressed_vocab_size``: the
    compressed tokenizer the hash multipliers were drawn for (checked against ``tokenizer.safetensors`` at load)."""

    model_type = "engram"

    engram_model: dict | None = None
    tokenizer_fingerprint: str | None = None
    compressed_vocab_size: int | None = None
    vocab_size: int = 0
    hidden_size: int = 0
    num_hidden_layers: int = 0
    max_position_embeddings: int = 0
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
