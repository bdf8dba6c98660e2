"""Where arrays live: device meshes and the placement of parameters, batches and the
editor state on them.

The jitted steps (`evaluate.edit_batch`, `train.train_step`, `evaluate.slot_scores`) are
the same functions on one device and on any mesh. A mesh decides only where their
inputs live, and, when set around the call with `jax.set_mesh(mesh)` (`use_mesh`), the
sharding constraints inside them (`partition.constrain`); XLA (GSPMD) propagates the
rest. The axes and the rule table are described in `partition`:

- LLM parameters: split by their role (`partition.RULES`): over ``fsdp`` along the
  hidden size, over ``tensor`` along heads / MLP units / vocabulary;
- batch rows: split over ``data`` x ``fsdp``; a batch whose row count that does not
  divide is padded with empty rows, which change no loss, key, gradient or statistic;
- weight deltas: like the kernels they are added to;
- editor state (hypernetworks, normaliser statistics, key memory, optimiser state):
  split along its largest dimension over ``fsdp`` x ``tensor``.

Without a mesh (`mesh=None`) the same functions commit everything to the default
device: a jitted step returns committed arrays, and jit compiles again when its
arguments go from uncommitted (fresh `jnp`) to committed, so a loop that feeds a step's
outputs back would otherwise compile its step twice.

Multi-process runs (TPU pods, several GPU nodes, or several processes on one machine):
call `maybe_initialize_distributed(True)` before anything touches a device. Every
process runs the same program on the same data; `place` assembles each global array
from the copy every process holds (`jax.make_array_from_callback`), each process
supplying the slices of its own devices, and `to_host` brings results back to every
process.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .editor.capture import Batch, pad_rows
from .errors import ConfigError
from .models.config import ModelConfig
from .models.transformer import is_layer_list, parse_module, tensor_specs
from .partition import (DATA, FSDP, MESH_AXES, MIN_SHARD_SIZE, STRATEGIES, TENSOR, constrain, editor_spec,
                        mesh_shape, n_row_shards, rows_spec, spec_for)

__all__ = ["DATA", "FSDP", "TENSOR", "make_mesh", "parse_mesh", "mesh_from_spec", "use_mesh",
           "maybe_initialize_distributed", "param_specs", "param_shardings", "delta_specs", "delta_shardings",
           "editor_shardings", "row_shardings", "pad_for_mesh", "place", "place_params", "place_batch",
           "place_rows", "place_deltas", "place_editor", "to_host", "constrain_deltas", "constrain_editor"]


# ---------------------------------------------------------------- mesh and start-up
def make_mesh(data: int = 1, model: int = 1, *, strategy: str = "fsdp", tensor: int | None = None,
              devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over the first devices: `data` x `model` devices with
    the model axis used for `strategy` ("fsdp" or "tp"); or, with `tensor`, `model`
    fsdp devices and `tensor` tensor-parallel devices (both at once)."""
    sizes = mesh_shape(data, model, strategy) if tensor is None else {DATA: data, FSDP: model, TENSOR: tensor}
    if min(sizes.values()) < 1:
        raise ConfigError(f"mesh axes must be >= 1, got {sizes}")
    devices = list(jax.devices() if devices is None else devices)
    need = int(np.prod(list(sizes.values())))
    if need > len(devices):
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
                if devices[0].platform == "cpu" else "")
        raise ConfigError(f"a {'x'.join(map(str, sizes.values()))} mesh needs {need} devices; {len(devices)} "
                         f"{devices[0].platform} device(s) are available{hint}")
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices[:need])


def parse_mesh(spec: str) -> tuple[int, int]:
    """'1,4' (or '1x4') -> (data, model) = (1, 4)."""
    parts = spec.replace("x", ",").split(",")
    try:
        data, model = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--mesh takes DATA,MODEL (two positive integers, e.g. 1,4), not {spec!r}") from None
    if data < 1 or model < 1:
        raise ConfigError(f"--mesh takes DATA,MODEL (two positive integers, e.g. 1,4), not {spec!r}")
    return data, model


def mesh_from_spec(spec: str | None, strategy: str = "fsdp") -> Mesh | None:
    """The mesh of `--mesh DATA,MODEL --sharding STRATEGY`; None without --mesh."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--sharding takes {' or '.join(STRATEGIES)}, not {strategy!r}")
    return None if spec is None else make_mesh(*parse_mesh(spec), strategy=strategy)


def use_mesh(mesh: Mesh | None):
    """Context in which jitted steps see `mesh` (their sharding constraints apply);
    nothing for None."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def maybe_initialize_distributed(flag: bool, **kwargs) -> bool:
    """Starts multi-process JAX (`jax.distributed.initialize`) if `flag`; must run before
    any other JAX call. On TPU pods, SLURM and Open MPI the cluster is found by itself;
    elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID on every host. `kwargs` (coordinator_address, num_processes,
    process_id, ...) override both. On CPU the processes exchange data over gloo.
    Returns whether it ran."""
    if not flag:
        return False
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and os.environ.get(env):
            kwargs[key] = int(os.environ[env])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    return True


# ---------------------------------------------------------------- partition specs
def _axes(mesh: Mesh) -> dict[str, int]:
    return dict(mesh.shape)


def _key(entry) -> Any:
    return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))


def param_specs(lcfg: ModelConfig, params, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    """PartitionSpecs of an LLM parameter tree (arrays or ShapeDtypeStructs, either layer
    layout), from each tensor's role in the model's tensor table; the leading layer axis
    of a stacked `params["layers"]` is never split."""
    table = tensor_specs(lcfg)
    stacked = not is_layer_list(params)
    axes = _axes(mesh)

    def one(path, x):
        keys = [_key(p) for p in path]
        layered = keys[0] == "layers"
        if layered and not stacked:
            keys = keys[:1] + keys[2:]            # drop the list layout's layer index
        role = table[tuple(keys)].role
        return spec_for(role, x.shape, axes, skip=1 if layered and stacked else 0, min_size=min_size)

    return jax.tree_util.tree_map_with_path(one, params)


def _named(mesh: Mesh, specs):
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(lcfg: ModelConfig, params, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    """NamedShardings of `param_specs` on `mesh`."""
    return _named(mesh, param_specs(lcfg, params, mesh, min_size=min_size))


def delta_spec(lcfg: ModelConfig, name: str, shape: Sequence[int], axes, *, min_size: int = MIN_SHARD_SIZE) -> P:
    """A module's delta (d_in, d_out) is split like one layer of its kernel."""
    _, suffix = parse_module(lcfg, name)
    role = tensor_specs(lcfg)[("layers", *suffix.split("."), "kernel")].role
    return spec_for(role, shape, axes, min_size=min_size)


def delta_specs(lcfg: ModelConfig, deltas, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    return {name: delta_spec(lcfg, name, d.shape, _axes(mesh), min_size=min_size) for name, d in deltas.items()}


def delta_shardings(lcfg: ModelConfig, deltas, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    return _named(mesh, delta_specs(lcfg, deltas, mesh, min_size=min_size))


def editor_shardings(tree, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    """Editor state, optimiser state: split along the largest dimension over the model
    axes (`partition.editor_spec`)."""
    axes = _axes(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, editor_spec(tuple(getattr(x, "shape", ())), axes,
                                                                       min_size=min_size)), tree)


def _is_batch(x) -> bool:
    return isinstance(x, Batch)


def row_shardings(tree, mesh: Mesh):
    """Every `Batch` in `tree` has its rows on the row axes (rows are the first axis, or
    the second for stacked batches like RLEdit's memory); other leaves replicated."""
    axes = _axes(mesh)

    def one(node):
        if _is_batch(node):
            lead = node.input_ids.ndim - 2
            return jax.tree.map(lambda x: NamedSharding(mesh, rows_spec(x.ndim, axes, lead)), node)
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), node)

    return jax.tree.map(one, tree, is_leaf=_is_batch)


def pad_for_mesh(tree, mesh: Mesh):
    """Pads every `Batch` in `tree` with empty rows to a multiple of the row axes."""
    k = n_row_shards(dict(mesh.shape))

    def one(node):
        if not _is_batch(node):
            return node
        lead = node.input_ids.ndim - 2
        rows = node.input_ids.shape[lead]
        target = -(-rows // k) * k
        if target == rows:
            return node
        pad = functools.partial(pad_rows, n_rows=target)
        for _ in range(lead):
            pad = jax.vmap(pad)
        return pad(node)

    return jax.tree.map(one, tree, is_leaf=_is_batch)


# ---------------------------------------------------------------- placement
def _put(x, sharding):
    """x on `sharding`: unchanged if it is already there; in a multi-process run, built
    from the full copy this process holds (each process supplies its devices' slices)."""
    if x is None:
        return None
    if isinstance(x, jax.Array) and x.committed and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree, shardings):
    """Places each leaf of `tree` on the matching sharding of `shardings` (a tree of the
    same structure, or one sharding for every leaf)."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(_put, tree, shardings)
    return jax.tree.map(lambda x: _put(x, shardings), tree)


def _default_device():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def place_params(lcfg: ModelConfig, params, mesh: Mesh | None, *, min_size: int = MIN_SHARD_SIZE):
    """The LLM parameters split by the rule table (on the default device without a mesh)."""
    if mesh is None:
        return place(params, _default_device())
    return place(params, param_shardings(lcfg, params, mesh, min_size=min_size))


def place_batch(batch, mesh: Mesh | None):
    """A Batch / EditBatch (or any tree of them), padded and split over the row axes."""
    if mesh is None:
        return place(batch, _default_device())
    batch = pad_for_mesh(batch, mesh)
    return place(batch, row_shardings(batch, mesh))


def place_rows(x, mesh: Mesh | None, fill):
    """One row-major array (rows first) padded with `fill` rows like `place_batch` pads a
    batch, and split the same way."""
    if mesh is None:
        return place(x, _default_device())
    k = n_row_shards(dict(mesh.shape))
    extra = -(-x.shape[0] // k) * k - x.shape[0]
    if extra:
        x = np.concatenate([np.asarray(x), np.full((extra, *x.shape[1:]), fill, np.asarray(x).dtype)])
    return place(x, NamedSharding(mesh, rows_spec(x.ndim, dict(mesh.shape))))


def place_deltas(lcfg: ModelConfig, deltas, mesh: Mesh | None, *, min_size: int = MIN_SHARD_SIZE):
    """Weight deltas, split like their kernels."""
    if mesh is None:
        return place(deltas, _default_device())
    return place(deltas, delta_shardings(lcfg, deltas, mesh, min_size=min_size))


def place_editor(tree, mesh: Mesh | None, *, min_size: int = MIN_SHARD_SIZE):
    """Editor or optimiser state (see editor_shardings)."""
    if mesh is None:
        return place(tree, _default_device())
    return place(tree, editor_shardings(tree, mesh, min_size=min_size))


def to_host(tree):
    """numpy copies of the arrays of `tree`, on every process (a multi-process run
    gathers the slices the other processes hold)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)


# ---------------------------------------------------------------- inside jitted code
def constrain_deltas(lcfg: ModelConfig, deltas):
    """Under a caller-set mesh, each delta split like its kernel (inside jitted code;
    unchanged without a mesh)."""
    return {name: constrain(d, functools.partial(_delta_axes_spec, lcfg, name, d.shape)) for name, d in deltas.items()}


def _delta_axes_spec(lcfg, name, shape, axes):
    return delta_spec(lcfg, name, shape, axes)


def constrain_editor(tree):
    """Under a caller-set mesh, editor / optimiser state split by `partition.editor_spec`
    (inside jitted code; unchanged without a mesh)."""
    return jax.tree.map(lambda x: constrain(x, functools.partial(editor_spec, x.shape)), tree)
