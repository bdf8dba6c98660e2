"""Functional decoder-only language models (LLaMA family, GPT-2, GPT-J) and their I/O."""

from .config import ConfigError, ModelConfig
from .hf_io import CheckpointError, Model, load_model, save_hf
from .layers import ModuleEdit
from .transformer import (abstract_params, apply_deltas, forward, get_kernel, greedy_generate,
                          init_params, logits, module_shape, parse_module, tensor_specs)

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelConfig", "ModuleEdit", "abstract_params",
           "apply_deltas", "forward", "get_kernel", "greedy_generate", "init_params", "load_model",
           "logits", "module_shape", "parse_module", "save_hf", "tensor_specs"]
