"""Hugging Face checkpoints in and out.

`load_model(name_or_path)` accepts a local checkpoint folder, a hub id (resolved with
`huggingface_hub.snapshot_download`; nothing is fetched when HF_HUB_OFFLINE=1), or the
name of an embedded model (`smollm2`). `save_hf` writes parameters back as a folder that
`transformers` loads. Safetensors files go through `safetensors_io` (the `safetensors`
library, errors naming the file and tensor). With `mesh=` (or `load_params(...,
shardings=)`), every array is assembled on its devices from the slices they hold, read
from the files slice by slice: no device holds more than its shard, a process reads only
its devices' slices, and the host holds about one tensor's slice at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from . import safetensors_io as st
from .config import ConfigError, ModelConfig
from .layers import Params, get_path, set_path
from .safetensors_io import CheckpointError
from ..errors import UserError
from .transformer import abstract_params, layer_params, tensor_specs


# Buffers some checkpoints carry that are not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------- the model bundle
@dataclasses.dataclass
class Model:
    """A loaded model: its config, parameters, tokenizer, and where it came from. For a
    Flax model (flax_nnx.from_nnx, flax_linen.from_linen) `config` is a FlaxModel and
    `params` its parameters as a nested dict."""
    config: ModelConfig
    params: Params
    tokenizer: Any
    path: Path
    hf_config: dict


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve(name_or_path: str | os.PathLike, patterns: Sequence[str] | None = None) -> Path:
    """Local folder, embedded model name, or hub id ('org/name' or a bare 'gpt2-xl')
    -> local checkpoint folder. A hub id comes from the local Hugging Face cache
    (HF_HOME / HF_HUB_CACHE) when HF_HUB_OFFLINE=1, else through `snapshot_download`,
    which fetches only the files matching `patterns` (default: config, weights and
    tokenizer files)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    from .embedded import EMBEDDED_MODELS, ensure_embedded
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return ensure_embedded(name)
    if p.exists() or name.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(name):
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder, embedded model "
                              "(smollm2) or hub id ('org/name' or 'name')")
    from huggingface_hub import snapshot_download
    if patterns is None:
        patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
    try:
        return Path(snapshot_download(name, allow_patterns=list(patterns)))
    except Exception as e:  # noqa: BLE001 - re-raised with the id named
        raise CheckpointError(f"{name_or_path}: no such checkpoint folder, and the hub id could not "
                              f"be resolved: {e}") from e


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
    return {k: f for f in files for k in st.tensor_table(f)}


def _canonical(cfg: ModelConfig, key: str) -> str:
    # Early GPT-2 checkpoints omit the "transformer." prefix.
    if cfg.family == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
        return "transformer." + key
    return key


def _full(ndim: int) -> tuple[slice, ...]:
    return (slice(None),) * ndim


def _assemble(shape: tuple[int, ...], sharding, dtype, block) -> jax.Array:
    """The array of global `shape` on `sharding`, built from this process's devices'
    slices: each distinct slice (a replicated one once) is read by `block(index)` and
    sent to its devices before the next is read, so the host holds one slice at a time.
    (`jax.make_array_from_callback` does the same but gathers every slice of the
    process before sending any.)"""
    groups: dict[tuple, tuple[tuple[slice, ...], list]] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        index = tuple(index) + _full(len(shape) - len(index))
        key = tuple(range(n)[i] for n, i in zip(shape, index))
        groups.setdefault(key, (index, []))[1].append(device)
    arrays = []
    for index, devices in groups.values():
        host = np.asarray(block(index), dtype)
        arrays += [jax.device_put(host, d) for d in devices]
        del host
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_params(folder: Path, cfg: ModelConfig, dtype=jnp.float32, *, stacked: bool = False,
                shardings: Params | None = None) -> Params:
    """Reads every tensor the config needs, checks shapes and finiteness, and builds the
    parameter tree in `dtype`: per-layer tensors in the list layout, or (`stacked`) on a
    leading layer axis (see models/transformer.py).

    `shardings`: None (every array whole on the default device), or a tree of
    `jax.sharding.Sharding`s shaped like the parameters (e.g. `sharding.param_shardings(
    abstract_params(cfg, dtype, stacked), mesh)`); each array is then assembled from the
    slices this process's devices hold, read from the files slice by slice (a transposed
    tensor by reading the transposed slice), one slice in host memory at a time."""
    files = {_canonical(cfg, k): (k, f) for k, f in _weight_files(folder).items()}
    tables: dict[Path, dict[str, st.TensorInfo]] = {}
    want = abstract_params(cfg, dtype, stacked=stacked)

    def locate(hf_key: str, want_shape: tuple[int, ...], transpose: bool) -> tuple[Path, str]:
        if hf_key not in files:
            where = sorted({str(f.name) for _, f in files.values()})
            raise CheckpointError(f"{folder}: tensor {hf_key!r} is missing (looked in {where})")
        orig, f = files[hf_key]
        if f not in tables:
            tables[f] = st.tensor_table(f)
        if orig not in tables[f]:
            raise CheckpointError(f"{f}: tensor {orig!r} (listed in the index) is not in the file")
        hf_shape = tuple(reversed(want_shape)) if transpose else tuple(want_shape)
        if tables[f][orig].shape != hf_shape:
            raise CheckpointError(f"{f}: tensor {orig!r} has shape {tables[f][orig].shape}, "
                                  f"the config implies {hf_shape}")
        return f, orig

    def read(source: tuple[Path, str], index: tuple[slice, ...], transpose: bool) -> np.ndarray:
        """index: a slice per dimension of our layout -> that slice, in the file's dtype."""
        f, orig = source
        arr = st.read(f, orig, tuple(reversed(index)) if transpose else index)
        if not np.isfinite(arr).all():
            raise CheckpointError(f"{f}: tensor {orig!r} contains NaN or infinite values")
        return arr.T if transpose else arr

    def build(path: tuple, layers: list[tuple[Path, str]] | None, source, transpose: bool):
        """One leaf: a tensor (`source`), or the stack of one tensor of every layer."""
        shape = get_path(want, path).shape
        if layers is None:
            def block(index):
                return read(source, index, transpose)
        else:
            def block(index):
                index = tuple(index) + _full(len(shape) - len(index))
                picked = range(len(layers))[index[0]]
                out = np.empty((len(picked), *[len(range(n)[i]) for n, i in zip(shape[1:], index[1:])]),
                               np.dtype(dtype))
                for j, layer in enumerate(picked):      # one layer's slice at a time
                    out[j] = read(layers[layer], index[1:], transpose)
                return out
        if shardings is None:
            return jnp.asarray(block(_full(len(shape))), dtype)
        return _assemble(shape, get_path(shardings, path), dtype, block)

    params: Params = {} if stacked else {"layers": tuple({} for _ in range(cfg.num_layers))}
    used = set()
    for path, spec in tensor_specs(cfg).items():
        if spec.stacked:
            keys = [f"{cfg.layer_prefix}.{i}.{spec.hf_name}" for i in range(cfg.num_layers)]
            used.update(keys)
            sources = [locate(k, spec.shape, spec.transpose) for k in keys]
            if stacked:
                set_path(params, path, build(path, sources, None, spec.transpose))
            else:
                for i, (layer, source) in enumerate(zip(params["layers"], sources)):
                    set_path(layer, path[1:], build(("layers", i, *path[1:]), None, source, spec.transpose))
        else:
            used.add(spec.hf_name)
            set_path(params, path, build(path, None, locate(spec.hf_name, spec.shape, spec.transpose),
                                         spec.transpose))
    extra = sorted(k for k in files if k not in used and not k.endswith(_IGNORED_SUFFIXES)
                   and not (cfg.tie_word_embeddings and k == "lm_head.weight"))
    if extra:
        raise CheckpointError(f"{folder}: tensors {extra[:5]}{' ...' if len(extra) > 5 else ''} are "
                              f"not used by the {cfg.model_type} model built from config.json")
    return params


# Tokenizer classes that are transformers' generic fast tokenizer (the one class both names
# stand for): a folder naming one of them is loaded without AutoTokenizer, which also reads
# the model's configuration through transformers' model code and so imports PyTorch where it
# is installed (5.1 s against 0.8 s for the embedded model's tokenizer in a fresh process).
GENERIC_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")


def load_tokenizer(folder: Path):
    folder = Path(folder)
    try:
        named = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        named = None
    if named in GENERIC_TOKENIZERS and (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast as tokenizer_class
    else:
        from transformers import AutoTokenizer as tokenizer_class
    try:
        tok = tokenizer_class.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot load the tokenizer: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str | os.PathLike, *, dtype=jnp.float32, strict: bool = True,
               tokenizer: bool = True, residual: str | None = None, stacked: bool | None = None,
               mesh=None) -> Model:
    """`dtype`: the parameters' dtype. `residual`: the residual stream's dtype (None: the
    parameters'; "float32" with bfloat16 parameters: mixed precision with the running
    sum of the layers' outputs in float32 and every matmul in bfloat16). `stacked`: the
    per-layer tensors on a leading layer axis (unedited layers run as a `lax.scan`,
    faster to compile) instead of the list layout (faster to run on CPU); None: the
    backend's default (`backend.layer_layout`: list on CPU, stacked on GPU / TPU).
    `mesh` (a `sharding.make_mesh` mesh): every parameter is read straight into its
    shards on the mesh (see `load_params`), placed as `sharding.param_shardings` says.
    'package.module:function' (not a path) calls that function for the Model (a Flax
    model: `flax_nnx.from_nnx`); the options above are then the function's business."""
    if is_factory(name_or_path):
        if jnp.dtype(dtype) != jnp.float32 or residual is not None or stacked or mesh is not None:
            raise UserError(f"model {name_or_path}: a model factory sets its own dtypes and layout "
                            "(dtype/residual/stacked/mesh apply to checkpoints)")
        return from_factory(name_or_path)
    if stacked is None:
        from ..backend import layer_layout
        stacked = layer_layout() == "stacked"
    folder = resolve(name_or_path)
    cfg, raw = read_config(folder, strict=strict)
    if residual is not None:
        cfg = dataclasses.replace(cfg, residual_dtype=jnp.dtype(residual).name)
    shardings = None
    if mesh is not None:
        from ..sharding import param_shardings
        shardings = param_shardings(cfg, abstract_params(cfg, dtype, stacked=stacked), mesh)
    params = load_params(folder, cfg, dtype, stacked=stacked, shardings=shardings)
    tok = load_tokenizer(folder) if tokenizer else None
    return Model(cfg, params, tok, folder, raw)


FACTORY = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)")


def is_factory(spec: str) -> bool:
    """True for 'package.module:function' (and not an existing path)."""
    return bool(FACTORY.fullmatch(str(spec))) and not os.path.exists(spec)


def from_factory(spec: str):
    """Imports `package.module` and returns `function()`, which must return a `Model`
    (for a Flax NNX model: `from_nnx(...)`). The module must be importable (installed,
    or its folder on PYTHONPATH)."""
    import importlib
    m = FACTORY.fullmatch(str(spec))
    if not m:
        raise UserError(f"model {spec!r}: a model factory is written 'package.module:function'")
    try:
        module = importlib.import_module(m.group(1))
    except ImportError as e:
        raise UserError(f"model {spec!r}: cannot import {m.group(1)!r} ({e}); is its folder on PYTHONPATH?") from e
    fn = getattr(module, m.group(2), None)
    if not callable(fn):
        raise UserError(f"model {spec!r}: {m.group(1)} has no function {m.group(2)!r}")
    model = fn()
    if not isinstance(model, Model):
        raise UserError(f"model {spec!r}: {m.group(2)}() returned {type(model).__name__}, expected a Model "
                        "(build it with emsedit_jax.models.flax_nnx.from_nnx)")
    return dataclasses.replace(model, path=Path(spec))      # runs record the spec, to load it again


# ---------------------------------------------------------------- export
def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{HF tensor name: shape in the HF layout} of the model `cfg` describes (no weights)."""
    out = {}
    for spec in tensor_specs(cfg).values():
        shape = tuple(reversed(spec.shape)) if spec.transpose else tuple(spec.shape)
        names = ([f"{cfg.layer_prefix}.{i}.{spec.hf_name}" for i in range(cfg.num_layers)]
                 if spec.stacked else [spec.hf_name])
        out.update({n: shape for n in names})
    return out


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
    from .transformer import builtin
    if not builtin(model.config):
        raise UserError(f"{model.config.name}: a Flax model is not saved as a Hugging Face checkpoint; its edited "
                        "parameters are apply_deltas(model.config, model.params, deltas), a pytree to save "
                        "as that model is saved")
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
        st.write(out / "model.safetensors", state)
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
        st.write(out / fname, shard)
        weight_map.update({k: fname for k in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in state.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


__all__ = ["CheckpointError", "ConfigError", "Model", "load_model", "load_params", "read_config",
           "resolve", "save_hf", "hf_shapes", "hf_state_dict"]
