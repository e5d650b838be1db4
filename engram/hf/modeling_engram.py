"""An exported engram model as a ``transformers`` causal LM (remote code of the folder ``engram export`` writes).

``EngramForCausalLM`` wraps an :class:`engram.model.EngramLM` (``self.model``) and adds what ``transformers``
expects: ``forward(input_ids, attention_mask, cache, labels)`` returning logits / loss / cache, and the hooks
``generate`` uses. The engram model does the work, so the logits are exactly the engram model's.

Three things differ from a stock transformers model, each because of Engram:

* The compressed tokenizer (``tokenizer.safetensors``) fixes the hash multipliers, and host / disk tables live in
  their own files (``tables.json``, ``tables/``, memory-mapped for disk). Both are read from the exported folder
  (``config.name_or_path``) when the model is built; tables are opened on the CPU even while ``transformers``
  builds everything else on the meta device, because they are not in ``model.safetensors``.
* Non-persistent buffers (table row offsets, MoE expert counters) are not in the checkpoint either, so
  ``_init_weights`` rebuilds them after ``transformers`` moved them off the meta device as empty tensors.
* The cache (:class:`EngramCache`) holds engram's own decode state: the KV (or MLA latent) cache, the last N-1
  compressed ids for incremental hashing, the ShortConv context and the per-sequence positions of a left-padded
  batch. ``generate`` cannot build it, so ``_supports_default_dynamic_cache`` is False and ``forward`` creates it.

Padding: positions with ``attention_mask == 0`` are given the Engram pad token before hashing, so a left-padded
prompt gets the hash ids it gets unpadded, whatever pad token the tokenizer uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from engram.model import EngramLM, ModelConfig
from engram.model.ffn import MoE
from engram.model.io import load_tokenizer_table, save_tokenizer_table
from engram.model.tables import TableFiles, save_table_files
from engram.module import MultiHeadEmbedding
from engram.storage import OffloadedEmbedding, offloaded_tables

from .configuration_engram import EngramHFConfig


def _exported_folder(name_or_path: str | None) -> Path:
    """The local folder of an exported model: the path itself, or its snapshot in the Hugging Face cache."""
    if not name_or_path:
        raise ValueError(
            "EngramForCausalLM reads its compressed tokenizer and table files from the exported folder: "
            "load it with from_pretrained(FOLDER, trust_remote_code=True), not from a bare config"
        )
    if os.path.isdir(name_or_path):
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path))


def _cpu_tables(tables: TableFiles):
    """``tables`` as a table factory that opens each table on the CPU, outside a meta-device context."""

    def make(layer_id, head_sizes, head_dim, init_std):
        with torch.device("cpu"):
            return tables(layer_id, head_sizes, head_dim, init_std)

    return make


class EngramCache:
    """The generation cache: engram's :class:`~engram.model.model.DecodeState` for the whole batch."""

    is_compileable = False

    def __init__(self, state):
        self.state = state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Positions seen so far (padding included), i.e. the width of the attention mask they cover."""
        return self.state.length


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EngramHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["Block"]

    def __init__(self, config: EngramHFConfig, model: EngramLM | None = None):
        """Build the engram model of ``config`` from its exported folder, or wrap ``model`` (an engram model in
        memory, e.g. to evaluate it with lm-eval without exporting it first)."""
        super().__init__(config)
        if model is not None:
            self.model = model
            self.post_init()
            return
        cfg = ModelConfig.from_dict(dict(config.engram_model))
        tokenizer, table_factory = None, None
        if cfg.family == "engram":
            folder = _exported_folder(config.name_or_path)
            tokenizer = load_tokenizer_table(folder)
            if tokenizer is None:
                raise ValueError(f"{folder} has no tokenizer.safetensors (the compression table); re-export the model")
            if (
                tokenizer.fingerprint != config.tokenizer_fingerprint
                or tokenizer.compressed_vocab_size != config.compressed_vocab_size
            ):
                raise ValueError(
                    f"{folder}/tokenizer.safetensors is not the compressed tokenizer config.json was "
                    f"exported with (fingerprint or V' differ); re-export the model"
                )
            tables = TableFiles.open(folder)
            table_factory = None if tables is None else _cpu_tables(tables)
        self.model = EngramLM(cfg, tokenizer, table_factory=table_factory)
        if cfg.tie_embeddings:
            self._tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _init_weights(self, module) -> None:
        # Only the buffers that are no checkpoint tensors; every weight comes from model.safetensors or a table file.
        if isinstance(module, (MultiHeadEmbedding, OffloadedEmbedding)):
            sizes = torch.tensor(module.head_sizes, dtype=torch.int64)
            module.sizes.copy_(sizes)
            module.offsets.copy_(torch.cumsum(sizes, 0) - sizes)
        elif isinstance(module, MoE):
            module.expert_counts.zero_()

    def state_dict(self, *args, **kwargs):
        """Without offloaded tables: they live in their own files, never in ``model.safetensors``."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for key in offloaded_tables(self):
            state.pop(prefix + key, None)
        return state

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``transformers``' save, plus the files it does not know: table files and the compression table."""
        super().save_pretrained(save_directory, *args, **kwargs)
        save_table_files(self, save_directory)
        if self.model.tokenizer is not None:
            save_tokenizer_table(self.model.tokenizer, save_directory)

    def get_input_embeddings(self):
        return self.model.tok_emb

    def get_output_embeddings(self):
        return self.model.lm_head

    def _pad_masked(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is None or self.model.cfg.engram is None:
            return input_ids
        return input_ids.masked_fill(~mask, self.model.cfg.engram.pad_id)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: EngramCache | None = None,
        past_key_values: EngramCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits [B, T, V]; ``labels`` (-100 = ignore) give the mean next-token loss (shifted inside).

        ``cache`` (``past_key_values`` is the older name) continues a cached sequence; then ``attention_mask`` may
        cover the whole sequence so far (as ``generate`` passes it) or only the new tokens.
        """
        if input_ids is None:
            raise ValueError("EngramForCausalLM needs input_ids (inputs_embeds are not supported: Engram hashes ids)")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is None and use_cache and not self.training:
            cache = EngramCache(self.model.new_state())
        t = input_ids.shape[1]
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -t:].to(torch.bool)
            if cache is None and bool(mask.all()):
                mask = None
        input_ids = self._pad_masked(input_ids, mask)
        out = self.model(input_ids, attention_mask=mask, state=None if cache is None else cache.state)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, cache=cache)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: EngramCache | None = None,
        past_key_values: EngramCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        """Only the tokens the cache has not seen yet (the whole prompt at the first step)."""
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
