"""Safetensors files, through the `safetensors` library (numpy arrays; bfloat16 as
`ml_dtypes.bfloat16`), with errors that name the file and the tensor.

`tensor_table(path)` reads the header only; `read(path, name, index)` reads one tensor or
one slice of it (the library reads just the bytes of that slice from a memory map);
`write(path, tensors)` is the package's one writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ..errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the message names the file and tensor."""


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: str          # the safetensors name: F32, BF16, F16, ...


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


def tensor_table(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """{tensor name: (shape, dtype)} from the file's header; the data is not read."""
    path = Path(path)
    with _open(path) as f:
        out = {}
        for name in f.keys():
            s = f.get_slice(name)
            out[name] = TensorInfo(tuple(s.get_shape()), s.get_dtype())
        return out


def read(path: str | os.PathLike, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """Tensor `name` of the file, or only `index` (a tuple of slices, one per dimension
    or fewer) of it."""
    path = Path(path)
    with _open(path) as f:
        try:
            return f.get_tensor(name) if index is None else f.get_slice(name)[index]
        except (SafetensorError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r}: {e}") from e


def write(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` (numpy arrays; ml_dtypes.bfloat16 for bfloat16) to `path` through
    a temporary sibling file, so an interrupted write leaves no partial file. Metadata
    defaults to {"format": "pt"}, which transformers expects."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    arrays = {}
    for name, arr in tensors.items():
        arrays[name] = np.ascontiguousarray(arr)
    try:
        save_file(arrays, str(tmp), metadata=metadata or {"format": "pt"})
    except (SafetensorError, ValueError, TypeError) as e:
        tmp.unlink(missing_ok=True)
        bad = [f"{k} ({a.dtype})" for k, a in arrays.items() if a.dtype.kind not in "fiub"]
        raise CheckpointError(f"{path}: cannot write {bad or 'the tensors'}: {e}") from e
    os.chmod(tmp, 0o644)          # the library creates its files 0600
    os.replace(tmp, path)


__all__ = ["CheckpointError", "TensorInfo", "read", "tensor_table", "write"]
