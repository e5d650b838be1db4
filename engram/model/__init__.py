"""Language-model family: dense, MoE, Engram+MoE and OverEncoding backbones from one config."""

from ..errors import ModelLoadError
from .config import ModelConfig, OverEncodingConfig
from .generate import SamplingConfig, generate
from .io import load_model, load_offloaded, save_model
from .model import DecodeState, EngramLM, ModelOutput
from .params import ParamCounts, allocate, allocation_table, count_params
from .tables import TableFiles, build_offloaded

__all__ = [
    "DecodeState",
    "EngramLM",
    "ModelConfig",
    "ModelLoadError",
    "ModelOutput",
    "OverEncodingConfig",
    "ParamCounts",
    "SamplingConfig",
    "TableFiles",
    "allocate",
    "allocation_table",
    "build_offloaded",
    "count_params",
    "generate",
    "load_model",
    "load_offloaded",
    "save_model",
]
