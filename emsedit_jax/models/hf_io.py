"""Hugging Face checkpoints in and out.

`load_model(name_or_path)` accepts a local checkpoint folder, a hub id (resolved with
`huggingface_hub.snapshot_download`; nothing is fetched when HF_HUB_OFFLINE=1), or the
name of an embedded model (`smollm2`). `save_hf` writes parameters back as a folder that
`transformers` loads. Safetensors files are read and written here directly (numpy
memory maps + ml_dtypes), so bfloat16 needs no torch and a corrupt file is reported
with its name and the tensor concerned.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ConfigError, ModelConfig
from .layers import Params, get_path, set_path
from .transformer import layer_params, tensor_specs
from ..errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be read; the message names the file and tensor."""


_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------- safetensors
def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Returns (header dict, offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n} exceeds the file)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            count = int(np.prod(info["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry {info!r}") from e
        if end - begin != count * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r}: byte range {begin}..{end} does not match "
                                  f"shape {info['shape']} of {info['dtype']}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: tensor {name!r}: data is truncated "
                                  f"(needs {data_start + end} bytes, file has {size})")
    return header, data_start


def read_tensor(path: Path, header: dict, data_start: int, name: str) -> np.ndarray:
    info = header[name]
    begin, end = info["data_offsets"]
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin, shape=(end - begin,))
    return mm.view(dtype).reshape(info["shape"])


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict | None = None) -> None:
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    arrays = {}
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _ST_NAMES:
            raise CheckpointError(f"{path}: tensor {name!r}: dtype {arr.dtype} cannot be saved")
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays[name] = arr
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays.values():
            f.write(arr.tobytes())
    os.replace(tmp, path)


# ---------------------------------------------------------------- the model bundle
@dataclasses.dataclass
class Model:
    """A loaded model: its config, parameters, tokenizer, and where it came from."""
    config: ModelConfig
    params: Params
    tokenizer: Any
    path: Path
    hf_config: dict


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Local folder, embedded model name, or hub id -> local checkpoint folder."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    from .embedded import EMBEDDED_MODELS, ensure_embedded
    if str(name_or_path) in EMBEDDED_MODELS:
        return ensure_embedded(str(name_or_path))
    if p.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder, embedded model "
                              "(smollm2) or hub id of the form 'org/name'")
    from huggingface_hub import snapshot_download
    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - re-raised with the id named
        raise CheckpointError(f"{name_or_path}: could not resolve hub id: {e}") from e


def read_config(folder: Path, strict: bool = True) -> tuple[ModelConfig, dict]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint folder needs config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    return ModelConfig.from_hf(raw, strict=strict, source=str(path)), raw


def _weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> file that holds it (single file or sharded with index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wmap = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index file: {e}") from e
        missing = sorted({f for f in wmap.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: shard file(s) {missing} listed in the index are missing")
        return {k: folder / f for k, f in wmap.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found (PyTorch .bin files are not supported)")
    out = {}
    for f in files:
        header, _ = read_safetensors_header(f)
        out.update({k: f for k in header})
    return out


def _canonical(cfg: ModelConfig, key: str) -> str:
    # Early GPT-2 checkpoints omit the "transformer." prefix.
    if cfg.family == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def load_params(folder: Path, cfg: ModelConfig, dtype=jnp.float32, *, stacked: bool = False) -> Params:
    """Reads every tensor the config needs, checks shapes and finiteness, and builds the
    parameter tree in `dtype`: per-layer tensors in the list layout, or (`stacked`) on a
    leading layer axis (see models/transformer.py)."""
    files = {_canonical(cfg, k): (k, f) for k, f in _weight_files(folder).items()}
    headers: dict[Path, tuple[dict, int]] = {}

    def fetch(hf_key: str, want_shape: tuple[int, ...], transpose: bool) -> np.ndarray:
        if hf_key not in files:
            where = sorted({str(f.name) for _, f in files.values()})
            raise CheckpointError(f"{folder}: tensor {hf_key!r} is missing (looked in {where})")
        orig, f = files[hf_key]
        if f not in headers:
            headers[f] = read_safetensors_header(f)
        arr = read_tensor(f, *headers[f], orig)
        hf_shape = tuple(reversed(want_shape)) if transpose else tuple(want_shape)
        if tuple(arr.shape) != hf_shape:
            raise CheckpointError(f"{f}: tensor {orig!r} has shape {tuple(arr.shape)}, "
                                  f"the config implies {hf_shape}")
        arr = np.asarray(arr, np.float32)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{f}: tensor {orig!r} contains NaN or infinite values")
        return arr.T if transpose else arr

    params: Params = {} if stacked else {"layers": tuple({} for _ in range(cfg.num_layers))}
    used = set()
    for path, spec in tensor_specs(cfg).items():
        if spec.stacked:
            keys = [f"{cfg.layer_prefix}.{i}.{spec.hf_name}" for i in range(cfg.num_layers)]
            used.update(keys)
            if not stacked:
                for layer, k in zip(params["layers"], keys):
                    set_path(layer, path[1:], jnp.asarray(fetch(k, spec.shape, spec.transpose), dtype))
                continue
            value = np.stack([fetch(k, spec.shape, spec.transpose) for k in keys])
        else:
            value = fetch(spec.hf_name, spec.shape, spec.transpose)
            used.add(spec.hf_name)
        set_path(params, path, jnp.asarray(value, dtype))
    extra = sorted(k for k in files if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                   and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"{folder}: tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} are "
                              f"not used by the {cfg.model_type} model built from config.json")
    return params


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str | os.PathLike, *, dtype=jnp.float32, strict: bool = True,
               tokenizer: bool = True, residual: str | None = None, stacked: bool | None = None) -> Model:
    """`dtype`: the parameters' dtype. `residual`: the residual stream's dtype (None: the
    parameters'; "float32" with bfloat16 parameters: mixed precision with the running
    sum of the layers' outputs in float32 and every matmul in bfloat16). `stacked`: the
    per-layer tensors on a leading layer axis (unedited layers run as a `lax.scan`,
    faster to compile) instead of the list layout (faster to run on CPU); None: the
    backend's default (`backend.layer_layout`: list on CPU, stacked on GPU / TPU)."""
    if stacked is None:
        from ..backend import layer_layout
        stacked = layer_layout() == "stacked"
    folder = resolve(name_or_path)
    cfg, raw = read_config(folder, strict=strict)
    if residual is not None:
        cfg = dataclasses.replace(cfg, residual_dtype=jnp.dtype(residual).name)
    params = load_params(folder, cfg, dtype, stacked=stacked)
    tok = load_tokenizer(folder) if tokenizer else None
    return Model(cfg, params, tok, folder, raw)


# ---------------------------------------------------------------- export
def hf_state_dict(cfg: ModelConfig, params: Params, dtype=None) -> dict[str, np.ndarray]:
    """Our parameter tree (either layer layout) -> {HF name: array in HF layout}."""
    def host(x):
        x = np.asarray(jax.device_get(x))
        return x if dtype is None else x.astype(dtype)

    out = {}
    for path, spec in tensor_specs(cfg).items():
        if spec.stacked:
            for i in range(cfg.num_layers):
                v = host(get_path(layer_params(params, i), path[1:]))
                out[f"{cfg.layer_prefix}.{i}.{spec.hf_name}"] = v.T if spec.transpose else v
        else:
            value = host(get_path(params, path))
            out[spec.hf_name] = value.T if spec.transpose else value
    return out


def save_hf(model: Model, out_dir: str | os.PathLike, params: Params | None = None, *,
            dtype=None, max_shard_bytes: int | None = None) -> Path:
    """Writes `params` (default: model.params) as a Hugging Face checkpoint folder with
    the original config and tokenizer files. Shards above `max_shard_bytes`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model.config, model.params if params is None else params, dtype)
    first = next(iter(state.values()))
    hf_config = dict(model.hf_config)
    hf_config["dtype"] = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                          np.dtype(np.float16): "float16"}.get(first.dtype, "float32")
    hf_config.pop("torch_dtype", None)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    for name in TOKENIZER_FILES:
        src = model.path / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copy(src, out / name)
    if max_shard_bytes is None or sum(a.nbytes for a in state.values()) <= max_shard_bytes:
        write_safetensors(out / "model.safetensors", state)
        return out
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k, a in state.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = a
        size += a.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, shard)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


__all__ = ["CheckpointError", "ConfigError", "Model", "load_model", "load_params", "read_config",
           "resolve", "save_hf", "hf_state_dict", "write_safetensors", "read_safetensors_header"]
