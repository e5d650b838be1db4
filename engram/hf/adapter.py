"""Engram as an adapter on a pretrained Hugging Face causal LM.

:func:`add_engram` puts one :class:`~engram.Engram` (``hc_mult = 1``) in front of each chosen decoder layer of a
frozen model and adds its output Y to the residual stream there, ``h <- h + Y``, through forward pre-hooks on
the model's own layer modules: no model's forward is copied, so every family whose decoder layers take the
residual stream as their first argument works (the supported ones are listed in :data:`FAMILIES`).

At initialisation the value projection W_V is zero, so v = 0, the gated value is 0, the ShortConv of
RMSNorm(0) = 0 is 0 and Y = 0 exactly: the adapted model's logits equal the base model's bit for bit.
(The keys and tables still start random, so the gate is informative as soon as W_V moves.)

Decoding state. Engram at position t reads the last N-1 tokens (the n-gram) and the ShortConv reads
``(kernel - 1) * N`` earlier gated values; during cached decoding the model only sees the new tokens. The state
(the last N-1 compressed ids and each layer's ShortConv window) is stored *on the HF cache object itself*
(attribute ``engram_state``), because the cache is the one object that travels with a sequence through
``generate()``, through a manual ``model(ids, cache=out.cache)`` loop and through ``copy.deepcopy`` of a prompt
cache. Each state records how many tokens it has seen; a forward whose cache length differs (the cache was
cropped, or filled without the adapter) is refused instead of silently hashing the wrong n-grams, and the
cache's ``reorder_cache`` (beam search) reorders the state with it. Recomputing the history from the token ids
instead would need the whole prefix at every step, which HF models do not receive.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import EngramConfig
from ..errors import ConfigError, ModelLoadError
from ..files import atomic_write
from ..hashing import NgramHasher
from ..module import Engram
from ..tokenizer import CompressedTokenizer

ADAPTER_FORMAT = "engram-hf-adapter"
ADAPTER_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"

# model_type -> attribute path from the CausalLM to its list of decoder layers
FAMILIES: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gpt2": "transformer.h",
}

TableFactory = Callable[[int, list[int], int, float], nn.Module]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's own list of decoder layers (``model.model.layers`` for Llama, ``transformer.h`` for GPT-2)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(
            f"Engram adapters support the model families {sorted(FAMILIES)}; this model is "
            f"{model_type or type(model).__name__!r}. Other decoder-only families need their layer list added "
            f"to engram.hf.adapter.FAMILIES (their decoder layers must take the residual stream first)"
        )
    node: Any = model
    for part in FAMILIES[model_type].split("."):
        node = getattr(node, part, None)
        if node is None:
            raise ConfigError(
                f"{type(model).__name__} has no {FAMILIES[model_type]!r}: pass the *ForCausalLM model "
                f"(e.g. AutoModelForCausalLM), not its bare backbone"
            )
    return node


def _sampled_values(p: torch.Tensor, samples: int = 4096) -> torch.Tensor:
    flat = p.detach().reshape(-1)
    n = min(samples, flat.numel())
    idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)  # exact in int64
    # rounded to bf16: the same checkpoint loaded in float32 or bfloat16 has one fingerprint
    return flat[idx].to(torch.bfloat16).float().cpu()


def base_fingerprint(model: nn.Module, exclude: set[int] | None = None) -> str:
    """SHA-256 over the base model's type, parameter names and shapes, and 4096 evenly spaced values of each.

    Reading a sample rather than every value keeps it fast for billion-parameter bases while any other checkpoint
    (or a fine-tuned copy of this one) still differs with near certainty. ``exclude`` holds ids of parameters that
    are not the base's (the adapter's own).
    """
    exclude = exclude or set()
    h = hashlib.sha256(getattr(model.config, "model_type", type(model).__name__).encode())
    for name, p in model.named_parameters():
        if id(p) in exclude:
            continue
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(_sampled_values(p).numpy().tobytes())
    return h.hexdigest()


class DecodeState:
    """What Engram needs of the tokens before a forward: the last N-1 compressed ids and each ShortConv window."""

    def __init__(self, history: torch.Tensor, conv: dict[int, dict], seen: int):
        # conv: each Engram layer's decoding dict (its ShortConv window under "conv", and what the module keeps
        # between decode steps), handed to the next forward as a shallow copy
        self.history, self.conv, self.seen = history, conv, seen

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.history = self.history.index_select(0, beam_idx.to(self.history.device))
        self.conv = {
            k: {"conv": s["conv"].index_select(0, beam_idx.to(s["conv"].device))} for k, s in self.conv.items()
        }


def _attach(cache: Any, state: DecodeState) -> None:
    """Store ``state`` on ``cache``; the first time, make the cache's beam reordering reorder the state too."""
    if not hasattr(cache, "engram_state") and hasattr(cache, "reorder_cache"):
        original = cache.reorder_cache

        def reorder_cache(beam_idx, *args, **kwargs):
            result = original(beam_idx, *args, **kwargs)
            if cache.engram_state is not None:
                cache.engram_state.reorder(beam_idx)
            return result

        cache.reorder_cache = reorder_cache
    cache.engram_state = state


def _cache_of(kwargs: dict) -> Any:
    return kwargs.get("cache", kwargs.get("past_key_values"))


class EngramAdapter(nn.Module):
    """The Engram modules of an adapted model, their tokenizer compression, and the hooks that run them.

    Attached to the model as ``model.engram_adapter`` (so ``model.to(...)`` moves it and optimizers see its
    parameters); :func:`add_engram` builds it, :func:`remove_engram` takes it out again.
    """

    def __init__(
        self,
        config: EngramConfig,
        compressed: CompressedTokenizer,
        hidden_size: int,
        *,
        family: str,
        base_fingerprint: str,
        table_factory: TableFactory | None = None,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.config, self.compressed, self.family = config, compressed, family
        self.base_fingerprint = base_fingerprint
        self.hasher = NgramHasher.from_tokenizer(config, compressed)
        modules = {}
        for layer_id in config.layer_ids:
            table = None
            if table_factory is not None:
                head_sizes = [p for heads in self.hasher.table_sizes[layer_id] for p in heads]
                table = table_factory(layer_id, head_sizes, config.head_dim, init_std)
            engram = Engram(
                config, layer_id, hidden_size, hc_mult=1, hasher=self.hasher, init_std=init_std, table=table
            )
            nn.init.zeros_(engram.value_proj.weight)  # Y = 0 at init: logits equal the base model's exactly
            nn.init.zeros_(engram.value_proj.bias)
            modules[str(layer_id)] = engram
        self.engrams = nn.ModuleDict(modules)
        self._step: dict | None = None  # the running forward's hash ids, mask and per-layer conv states
        self._handles: list[Any] = []

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> None:
        layers = decoder_layers(model)
        self._handles.append(model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_model, with_kwargs=True, always_call=True))
        for layer_id in self.config.layer_ids:
            self._handles.append(
                layers[layer_id].register_forward_pre_hook(self._layer_hook(layer_id), with_kwargs=True)
            )

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _before_model(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(
                "a model with an Engram adapter needs input_ids (Engram looks up n-grams of token "
                "ids); inputs_embeds alone cannot be hashed"
            )
        b, t = input_ids.shape
        mask = kwargs.get("attention_mask")
        mask = None if mask is None or mask.dim() != 2 else mask[:, -t:].to(torch.bool)
        # padding hashes like the sequence start (the config's pad id), so left padding changes nothing
        raw = (
            input_ids if mask is None else torch.where(mask, input_ids, torch.full_like(input_ids, self.config.pad_id))
        )
        compressed = self.hasher.compress(raw)
        cache = _cache_of(kwargs)
        seen = 0 if cache is None else int(cache.get_seq_length())
        state = getattr(cache, "engram_state", None) if seen else None
        if seen and state is None:
            raise RuntimeError(
                f"the cache already holds {seen} tokens that the Engram adapter did not see (it was filled before "
                f"add_engram/load_adapter, or by another model); start generation from an empty cache"
            )
        if state is not None and state.seen != seen:
            raise RuntimeError(
                f"the cache holds {seen} tokens but the Engram state was built over {state.seen} (the cache was "
                f"cropped or edited outside the model); Engram's n-gram history no longer matches, start again "
                f"from an empty cache"
            )
        history = state.history if state is not None else self.hasher.initial_history(b, compressed.device)
        self._step = {
            "hash_ids": self.hasher.hash_incremental(history, compressed),
            "mask": mask,
            "conv": {
                l: (dict(state.conv[l]) if state is not None and l in state.conv else {}) for l in self.config.layer_ids
            },
            "history": self.hasher.advance_history(history, compressed),
            "seen": seen + t,
        }

    def _after_model(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        step, self._step = self._step, None
        if output is None:  # the forward raised (always_call): keep the cache's state as it was
            return
        # transformers 5 names the output cache `cache` (`past_key_values` is a deprecated alias), 4.x only the latter
        name = "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"
        cache = getattr(output, name, None) or _cache_of(kwargs)
        if step is None or cache is None or not hasattr(cache, "get_seq_length"):
            return
        conv = {
            l: (s if not s["conv"].requires_grad else {"conv": s["conv"].detach()})
            for l, s in step["conv"].items()
            if "conv" in s
        }
        _attach(cache, DecodeState(step["history"], conv, step["seen"]))

    def _layer_hook(self, layer_id: int):
        engram = self.engrams[str(layer_id)]

        def hook(layer: nn.Module, args: tuple, kwargs: dict):
            step = self._step
            if step is None:
                raise RuntimeError(
                    "an Engram-adapted decoder layer was called outside the model's forward; call "
                    "the *ForCausalLM model so the adapter sees the token ids"
                )
            hidden = args[0] if args else kwargs["hidden_states"]
            dtype = engram.value_proj.weight.dtype
            y = engram(
                hidden.to(dtype),
                hash_ids=step["hash_ids"][layer_id].to(hidden.device),
                mask=step["mask"],
                state=step["conv"][layer_id],
            )
            hidden = hidden + y.to(hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook

    # ------------------------------------------------------------------ reporting
    def trainable_parameters(self) -> int:
        """Adapter values that training changes: its parameters plus the rows of offloaded tables (which hold no
        ``nn.Parameter``; the row-wise optimizer updates them in their tier)."""
        dense = sum(p.numel() for p in self.parameters() if p.requires_grad)
        offloaded = sum(
            e.table.num_rows * e.table.head_dim
            for e in self.engrams.values()
            if not any(True for _ in e.table.parameters())
        )
        return dense + offloaded

    def activated_parameters_per_token(self) -> int:
        """Parameters one token touches: its (N-1)K table rows and the dense Engram weights, per layer."""
        per_layer = 0
        for e in self.engrams.values():
            dense = sum(p.numel() for n, p in e.named_parameters() if not n.startswith("table."))
            per_layer += dense + self.config.num_heads_total * self.config.head_dim
        return per_layer


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    size = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not size:
        raise ValueError(f"cannot find the hidden size in {type(cfg).__name__} (no hidden_size / n_embd)")
    return int(size)


def _check_fresh(model: nn.Module) -> None:
    if getattr(model, "engram_adapter", None) is not None:
        raise ValueError(
            "this model already has an Engram adapter; call engram.hf.remove_engram(model) first or "
            "start from a fresh base model"
        )


def _install(
    model: nn.Module,
    config: EngramConfig,
    compressed: CompressedTokenizer,
    *,
    table_factory: TableFactory | None,
    init_std: float,
    fingerprint: str | None = None,
    freeze: bool = True,
) -> EngramAdapter:
    _check_fresh(model)
    layers = decoder_layers(model)
    config.validate(num_layers=len(layers))
    vocab = model.get_input_embeddings().weight.shape[0]
    if compressed.vocab_size > vocab:
        raise ModelLoadError(
            f"the tokenizer has {compressed.vocab_size} ids but the model's embedding only "
            f"{vocab}: this tokenizer does not belong to this model"
        )
    if freeze:
        model.requires_grad_(False)
    fingerprint = fingerprint or base_fingerprint(model)
    device = next(model.parameters()).device
    adapter = EngramAdapter(
        config,
        compressed,
        _hidden_size(model),
        family=model.config.model_type,
        base_fingerprint=fingerprint,
        table_factory=table_factory,
        init_std=init_std,
    )
    adapter.to(device)  # an offloaded table keeps its rows in its tier; only its compute device follows
    adapter.requires_grad_(True)
    model.engram_adapter = adapter
    adapter.attach(model)
    return adapter


def add_engram(
    model: nn.Module,
    tokenizer: Any,
    config: EngramConfig,
    layers: list[int] | None = None,
    *,
    table_factory: TableFactory | None = None,
    init_std: float = 0.02,
    freeze: bool = True,
) -> EngramAdapter:
    """Insert Engram before ``layers`` (0-based decoder-layer indices; default ``config.layer_ids``) of ``model``.

    Args:
        model: a ``*ForCausalLM`` of a family in :data:`FAMILIES`.
        tokenizer: its tokenizer (a transformers tokenizer, ``tokenizers.Tokenizer`` or tokenizer.json path); the
            compression table P: V -> V' is built from it.
        config: the Engram hyper-parameters; ``pad_id`` must be a raw id of this tokenizer.
        table_factory: builds each layer's table in another tier (``engram.storage.table_factory("host")``),
            with the same contract as for :class:`~engram.model.EngramLM`.
        freeze: freeze every base parameter (the adapter's own stay trainable).

    Returns the :class:`EngramAdapter` (also ``model.engram_adapter``). The model's logits are unchanged until
    the adapter is trained.
    """
    if layers is not None:
        config = dataclasses.replace(config, layer_ids=[int(i) for i in layers])
    compressed = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
    return _install(model, config, compressed, table_factory=table_factory, init_std=init_std, freeze=freeze)


def get_adapter(model: nn.Module) -> EngramAdapter:
    adapter = getattr(model, "engram_adapter", None)
    if adapter is None:
        raise ValueError("this model has no Engram adapter; add one with engram.hf.add_engram or load_adapter")
    return adapter


def remove_engram(model: nn.Module) -> EngramAdapter:
    """Take the adapter out (hooks removed): the model is the base model again. Returns the adapter."""
    adapter = get_adapter(model)
    adapter.detach()
    del model.engram_adapter
    return adapter


# ---------------------------------------------------------------------------------------------------- files
def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` (Engram weights + compression table) and ``adapter_config.json``.

    The JSON holds the EngramConfig, the layers, the tokenizer's vocabulary fingerprint and the base model's
    fingerprint (:func:`base_fingerprint`), which :func:`load_adapter` checks. Tables in the host or disk tier are
    read out chunk by chunk through their state dict, so an adapter file never depends on where the rows lived.
    """
    from safetensors.torch import save

    adapter = get_adapter(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"engrams.{k}": v.detach().cpu().contiguous() for k, v in adapter.engrams.state_dict().items()}
    tensors["compression.lookup"] = torch.from_numpy(adapter.compressed.lookup.copy())
    meta = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "family": adapter.family,
        "base_model": str(getattr(model.config, "_name_or_path", "") or ""),
        "base_fingerprint": adapter.base_fingerprint,
        "tokenizer_fingerprint": adapter.compressed.fingerprint,
        "layers": list(adapter.config.layer_ids),
        "hidden_size": _hidden_size(model),
        "engram_config": adapter.config.to_dict(),
    }
    atomic_write(out / WEIGHTS_FILE, save(tensors, metadata={"format": ADAPTER_FORMAT}))
    atomic_write(out / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """The adapter's JSON, checked to be an Engram adapter of a version this library reads."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not an Engram adapter folder (no {CONFIG_FILE}); write one with "
            f"engram.hf.save_adapter or engram finetune --out"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != ADAPTER_FORMAT or meta.get("version") != ADAPTER_VERSION:
        raise ModelLoadError(
            f"{path} is format {meta.get('format')!r} version {meta.get('version')!r}; this library "
            f"reads {ADAPTER_FORMAT!r} version {ADAPTER_VERSION}"
        )
    return meta


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, tokenizer: Any = None, *, table_factory: TableFactory | None = None
) -> EngramAdapter:
    """Put the adapter saved in ``directory`` onto ``model`` (a fresh base model), frozen base, ready to run.

    Refused, with the reason, when ``model`` is not the base the adapter was trained on (family, width, depth
    or :func:`base_fingerprint`) or when ``tokenizer`` (if given; recommended) is not the one it was trained with.
    ``table_factory`` loads the tables into another tier (``engram.storage.table_factory("host")``).
    """
    from safetensors.torch import load_file

    meta = read_adapter_config(directory)
    _check_fresh(model)
    family = getattr(model.config, "model_type", None)
    if family != meta["family"]:
        raise ModelLoadError(
            f"wrong base model: the adapter in {directory} was trained on a {meta['family']!r} "
            f"model ({meta['base_model'] or 'unnamed'}), this one is {family!r}"
        )
    if _hidden_size(model) != meta["hidden_size"] or len(decoder_layers(model)) <= max(meta["layers"]):
        raise ModelLoadError(
            f"wrong base model: the adapter needs hidden size {meta['hidden_size']} and layers "
            f"{meta['layers']}, this model has hidden size {_hidden_size(model)} and "
            f"{len(decoder_layers(model))} layers"
        )
    fingerprint = base_fingerprint(model)
    if fingerprint != meta["base_fingerprint"]:
        raise ModelLoadError(
            f"wrong base model: the adapter in {directory} was trained on "
            f"{meta['base_model'] or 'another checkpoint'} (weights fingerprint "
            f"{meta['base_fingerprint'][:12]}), this model's weights differ "
            f"({fingerprint[:12]}); load the base checkpoint the adapter was trained on"
        )
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    compressed = CompressedTokenizer.from_lookup(
        tensors.pop("compression.lookup").numpy(), meta["tokenizer_fingerprint"]
    )
    if tokenizer is not None:
        given = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer(tokenizer)
        if given.fingerprint != compressed.fingerprint:
            raise ModelLoadError(
                f"wrong tokenizer: the adapter in {directory} was trained with a tokenizer "
                f"whose vocabulary fingerprint is {compressed.fingerprint[:12]}, the given one has "
                f"{given.fingerprint[:12]}; pass the base model's own tokenizer"
            )
        compressed.check_matches(given)
    config = EngramConfig.from_dict(meta["engram_config"])
    adapter = _install(model, config, compressed, table_factory=table_factory, init_std=0.02, fingerprint=fingerprint)
    prefix = "engrams."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    adapter.engrams.load_state_dict(state, strict=True)
    return adapter
