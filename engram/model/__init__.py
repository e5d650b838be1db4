"""Language-model family: dense, MoE, Engram+MoE and OverEncoding backbones from one config."""

from .config import ModelConfig, OverEncodingConfig
from .generate import SamplingConfig, generate
from .io import ModelLoadError, load_model, save_model
from .model import DecodeState, EngramLM, ModelOutput
from .params import ParamCounts, allocate, allocation_table, count_params

__all__ = [
    "DecodeState", "EngramLM", "ModelConfig", "ModelLoadError", "ModelOutput", "OverEncodingConfig",
    "ParamCounts", "SamplingConfig", "allocate", "allocation_table", "count_params", "generate", "load_model",
    "save_model",
]
