"""emsedit-jax: EMSEdit and meta-learning model editors as pure JAX functions.

The public API (emsedit_jax.api, loaded on first use, so `import emsedit_jax` is cheap
and changes nothing in the process):

    import emsedit_jax as ej
    model = ej.load_model("smollm2")
    editor = ej.load_editor("runs/demo/editor", model)
    edited = ej.edit(model, editor, [ej.Fact("The capital of France is", "Rome")])
    print(ej.generate(edited, "The capital of France is"))
    edited.save("runs/edited")

Also: ej.train_editor / ej.evaluate_editor (the submodules emsedit_jax.train and
emsedit_jax.evaluate keep their names), the configuration dataclasses (EditorConfig, TrainConfig,
EvalConfig), ej.configs and ej.PRESETS, the error types,
ej.limit_lapack_threads() (what the command line does at start on CPU), and
ej.from_nnx / ej.from_linen, which make a Flax model a Model to edit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> (module, attribute)
_EXPORTS = {
    **{name: ("api", name) for name in ("EditedModel", "Editor", "Fact", "edit", "evaluate_editor", "generate",
                                          "load_editor", "load_model", "train_editor")},
    "EditorConfig": ("editor.config", "EditorConfig"),
    "default_modules": ("editor.config", "default_modules"),
    "TrainConfig": ("train", "TrainConfig"),
    "configs": ("train", "configs"),
    "PRESETS": ("train", "PRESETS"),
    "EvalConfig": ("evaluate", "EvalConfig"),
    "EvalResult": ("evaluate", "EvalResult"),
    "EditRequest": ("data", "EditRequest"),
    "UserError": ("errors", "UserError"),
    "ConfigError": ("errors", "ConfigError"),
    "DataError": ("data", "DataError"),
    "CheckpointError": ("models.hf_io", "CheckpointError"),
    "limit_lapack_threads": ("lapack_threads", "limit"),
    "from_nnx": ("models.flax_nnx", "from_nnx"),
    "from_linen": ("models.flax_linen", "from_linen"),
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .api import (EditedModel, Editor, Fact, edit, evaluate_editor, generate, load_editor, load_model,
                      train_editor)
    from .data import DataError, EditRequest
    from .editor.config import EditorConfig, default_modules
    from .errors import ConfigError, UserError
    from .evaluate import EvalConfig, EvalResult
    from .lapack_threads import limit as limit_lapack_threads
    from .models.flax_linen import from_linen
    from .models.flax_nnx import from_nnx
    from .models.hf_io import CheckpointError
    from .train import PRESETS, TrainConfig, configs


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'emsedit_jax' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
