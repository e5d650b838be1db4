"""Export an engram model as a ``transformers`` folder: ``engram export --model DIR --out HF_DIR``.

The folder holds::

    config.json               EngramHFConfig with auto_map (remote code), the whole ModelConfig under engram_model
    configuration_engram.py   the config class         } copied from engram.hf; they import ``engram``, so the
    modeling_engram.py        EngramForCausalLM        } loading machine needs ``pip install engram``
    model.safetensors         every tensor but offloaded tables, keys prefixed ``model.``
    tables.json, tables/      host / disk tables as their own files (a disk table stays a memory-mappable row file)
    tokenizer.safetensors     the compression lookup P: V -> V' and the vocabulary fingerprint
    tokenizer.json, tokenizer_config.json   the text tokenizer for AutoTokenizer (left padding, for generate)
    generation_config.json

and loads with ``AutoModelForCausalLM.from_pretrained(HF_DIR, trust_remote_code=True)`` and
``AutoTokenizer.from_pretrained(HF_DIR)``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..model import EngramLM
from ..model.io import save_tokenizer_table
from ..model.tables import save_table_files
from ..tokenizer import vocab_fingerprint
from ..train.data import TextTokenizer, load_tokenizer

REMOTE_CODE = ("configuration_engram.py", "modeling_engram.py")
AUTO_MAP = {
    "AutoConfig": "configuration_engram.EngramHFConfig",
    "AutoModelForCausalLM": "modeling_engram.EngramForCausalLM",
}


def _check_tokenizer(model: EngramLM, tok: TextTokenizer) -> None:
    if tok.vocab_size != model.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} ids, the model's embedding {model.cfg.vocab_size}: "
            f"pass the tokenizer the model was trained with"
        )
    if model.tokenizer is None:
        return
    vocab = tok.hf.get_vocab(with_added_tokens=True) if hasattr(tok.hf, "token_to_id") else tok.hf.get_vocab()
    if vocab_fingerprint(vocab) != model.tokenizer.fingerprint:
        raise ValueError(
            "the tokenizer's vocabulary fingerprint differs from the one the model's compression table "
            "was built from: pass the tokenizer the model was trained with"
        )


def _write_tokenizer(tok: TextTokenizer, out: Path, max_len: int) -> None:
    if hasattr(tok.hf, "token_to_id"):  # a tokenizers.Tokenizer
        tok.hf.save(str(out / "tokenizer.json"))
        tokens = {"eos_token": tok.hf.id_to_token(tok.eos_id), "pad_token": tok.hf.id_to_token(tok.pad_id)}
    else:  # a transformers tokenizer
        tok.hf.save_pretrained(str(out))
        tokens = {"eos_token": tok.hf.eos_token, "pad_token": tok.hf.pad_token or tok.hf.eos_token}
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(tokenizer_class="PreTrainedTokenizerFast", padding_side="left", model_max_length=max_len, **tokens)
    config_path.write_text(json.dumps(config, indent=1))


def hf_config(model: EngramLM, tok: TextTokenizer):
    """The :class:`~engram.hf.configuration_engram.EngramHFConfig` of ``model`` with its text tokenizer."""
    from .configuration_engram import EngramHFConfig

    cfg, ctok = model.cfg, model.tokenizer
    config = EngramHFConfig(
        engram_model=cfg.to_dict(),
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
        tokenizer_fingerprint=None if ctok is None else ctok.fingerprint,
        compressed_vocab_size=None if ctok is None else ctok.compressed_vocab_size,
    )
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["EngramForCausalLM"]
    config.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return config


def export(model: EngramLM, out_dir: str | os.PathLike, tokenizer: TextTokenizer | str | os.PathLike) -> Path:
    """Write ``model`` with its text ``tokenizer`` (a :class:`~engram.train.data.TextTokenizer` or anything
    :func:`~engram.train.data.load_tokenizer` takes, e.g. the model folder) as a transformers folder."""
    tok = tokenizer if isinstance(tokenizer, TextTokenizer) else load_tokenizer(tokenizer)
    _check_tokenizer(model, tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    table_keys = save_table_files(model, out)
    state = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in table_keys}
    if cfg.tie_embeddings:
        state.pop("model.lm_head.weight")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer is not None:
        save_tokenizer_table(model.tokenizer, out)
    hf_config(model, tok).save_pretrained(str(out))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}, indent=1)
    )
    for name in REMOTE_CODE:
        shutil.copyfile(Path(__file__).with_name(name), out / name)
    _write_tokenizer(tok, out, cfg.max_seq_len)
    return out
