"""Editing and meta-training over a device mesh.

The mesh has two named axes:

- ``data``: the rows of the edit and training batches (packed edit requests) are split
  over it;
- ``model``: every large LLM parameter is split over it along its largest dimension that
  the axis size divides (fully sharded, FSDP-style; in the stacked layer layout the
  layer axis is never split, since the layers are scanned over). XLA gathers what each
  layer needs. Small tensors (norm scales, biases, anything whose one layer has under
  `MIN_SHARD_SIZE` elements) are replicated.

The editor state (hypernetworks, normaliser statistics, optimiser state) is replicated
unless `shard_editor=True` (then the same rule as the LLM parameters); weight deltas are
sharded like the kernels they are added to; metrics are replicated.

`sharded_edit_batch` and `sharded_train_step` run the computations of
`evaluate.edit_batch` and `train.train_step` under `jax.jit` with explicit input and
output shardings, compiled once per (mesh, configuration, batch shape). A batch whose
row count the data axis does not divide is padded with empty rows, which change no
loss, key, gradient or statistic. Inside the step, XLA (GSPMD) propagates the shardings.

Multi-host runs (TPU pods, several GPU nodes): call `maybe_initialize_distributed(True)`
before anything touches a device; every process runs the same program on the same data,
and arrays are assembled from each process's host copy (`jax.make_array_from_callback`).
"""

from __future__ import annotations

import functools
import math
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
from .models.transformer import is_layer_list, parse_module

DATA, MODEL = "data", "model"
MIN_SHARD_SIZE = 2 ** 12     # tensors with fewer elements are replicated


# ---------------------------------------------------------------- mesh and start-up
def make_mesh(data: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, model) mesh over the first data * model devices (automatic sharding
    propagation on both axes)."""
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be >= 1, got data={data}, model={model}")
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
                if devices[0].platform == "cpu" else "")
        raise ConfigError(f"a {data}x{model} mesh needs {data * model} devices; {len(devices)} "
                         f"{devices[0].platform} device(s) are available{hint}")
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


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


def mesh_from_spec(spec: str | None) -> Mesh | None:
    """The mesh of a `--mesh DATA,MODEL` option; None without one."""
    return None if spec is None else make_mesh(*parse_mesh(spec))


def maybe_initialize_distributed(flag: bool, **kwargs) -> bool:
    """Starts multi-host JAX (`jax.distributed.initialize`) if `flag`; must run before any
    other JAX call. On TPU pods, SLURM and Open MPI the cluster is found by itself;
    elsewhere set JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
    and JAX_PROCESS_ID on every host. `kwargs` (coordinator_address, num_processes,
    process_id, ...) override both. Returns whether it ran."""
    if not flag:
        return False
    for key, env in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if key not in kwargs and os.environ.get(env):
            kwargs[key] = int(os.environ[env])
    jax.distributed.initialize(**kwargs)
    return True


# ---------------------------------------------------------------- partition rules
def fsdp_spec(shape: Sequence[int], axis_size: int, *, skip: int = 0, min_size: int = MIN_SHARD_SIZE) -> P:
    """Partition of one tensor: its largest dimension (after the first `skip`, e.g. the
    layer axis) that `axis_size` divides goes on the model axis; ties go to the later
    dimension. Replicated when the axis has size 1, the tensor (after `skip`: one layer's
    slice, so both layer layouts agree) has fewer than `min_size` elements or fewer than
    two dimensions (norm scales, biases), or no dimension is divisible."""
    dims: list[str | None] = [None] * len(shape)
    if axis_size == 1 or math.prod(shape[skip:]) < min_size or len(shape) - skip < 2:
        return P(*dims)
    candidates = [i for i in range(skip, len(shape)) if shape[i] % axis_size == 0]
    if candidates:
        dims[max(candidates, key=lambda i: (shape[i], i))] = MODEL
    return P(*dims)


def _key(entry) -> Any:
    return getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", None)))


def param_specs(params, n_model: int, *, min_size: int = MIN_SHARD_SIZE):
    """PartitionSpecs of an LLM parameter tree (arrays or ShapeDtypeStructs, either layer
    layout) on a model axis of `n_model` devices; the leading layer axis of a stacked
    `params["layers"]` is never split."""
    stacked = not is_layer_list(params)

    def one(path, x):
        skip = 1 if stacked and _key(path[0]) == "layers" else 0
        return fsdp_spec(x.shape, n_model, skip=skip, min_size=min_size)

    return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(params, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    """NamedShardings of `param_specs` on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(params, mesh.shape[MODEL],
                                                                             min_size=min_size),
                        is_leaf=lambda x: isinstance(x, P))


def delta_shardings(deltas, lcfg: ModelConfig, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    """Each module's delta (d_in, d_out) is split like one layer of its kernel."""
    out = {}
    for name, d in deltas.items():
        parse_module(lcfg, name)
        out[name] = NamedSharding(mesh, fsdp_spec(d.shape, mesh.shape[MODEL], min_size=min_size))
    return out


def editor_shardings(tree, mesh: Mesh, shard: bool = False, *, min_size: int = MIN_SHARD_SIZE):
    """Editor state, optimiser state: replicated, or (`shard`) split like parameters."""
    if not shard:
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(getattr(x, "shape", ())), mesh.shape[MODEL],
                                                                min_size=min_size)), tree)


def _is_batch(x) -> bool:
    return isinstance(x, Batch)


def row_shardings(tree, mesh: Mesh):
    """Every `Batch` in `tree` has its rows on the data axis (rows are the first axis,
    or the second for stacked batches like RLEdit's memory); other leaves replicated."""
    def one(node):
        if _is_batch(node):
            lead = node.input_ids.ndim - 2
            sharding = NamedSharding(mesh, P(*([None] * lead), DATA))
            return jax.tree.map(lambda _: sharding, node)
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), node)

    return jax.tree.map(one, tree, is_leaf=_is_batch)


def pad_for_mesh(tree, mesh: Mesh):
    """Pads every `Batch` in `tree` with empty rows to a multiple of the data axis."""
    k = mesh.shape[DATA]

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
def _put(x, sharding: NamedSharding):
    """x on `sharding`: unchanged if it is already there; from the host copy of every
    process in a multi-host run."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def commit(tree):
    """Single-device runs: the arrays of `tree` committed to the default device. A jitted
    step returns committed arrays, and jit compiles again when its arguments go from a
    mix of committed (restored or returned) and uncommitted (fresh `jnp`) arrays to all
    committed, so a loop that feeds a step's outputs back would otherwise compile its
    step twice: for the first call and again for the second."""
    return jax.device_put(tree, jax.devices()[0])


def place(tree, shardings):
    """Places each leaf of `tree` on the matching sharding of `shardings`."""
    return jax.tree.map(_put, tree, shardings)


def place_params(params, mesh: Mesh, *, min_size: int = MIN_SHARD_SIZE):
    """The LLM parameters, fully sharded over the model axis."""
    return place(params, param_shardings(params, mesh, min_size=min_size))


def place_batch(batch, mesh: Mesh):
    """A Batch / EditBatch (or any tree of them), padded and split over the data axis."""
    batch = pad_for_mesh(batch, mesh)
    return place(batch, row_shardings(batch, mesh))


# ---------------------------------------------------------------- compiled steps
_COMPILED: dict = {}


def _freeze(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def _compiled(fn, statics: dict, in_shardings, out_shardings, donate: tuple[int, ...]):
    """One jitted `fn` per (statics, shardings); jit caches the compilations per shape."""
    key = (fn, tuple(sorted(statics.items())), _freeze(in_shardings), _freeze(out_shardings), donate)
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(functools.partial(fn, **statics), in_shardings=in_shardings,
                                 out_shardings=out_shardings, donate_argnums=donate)
    return _COMPILED[key]


def _edit(state, params, batch, deltas, **statics):
    from .evaluate import edit_batch
    return edit_batch(state, params, batch, deltas, **statics)


def prepare_edit(state, params, batch: Batch, deltas, *, mesh: Mesh, ecfg, lcfg: ModelConfig, n_answer: int,
                 remat: bool = False, chunk: int | None = None, shard_editor: bool = False,
                 min_size: int = MIN_SHARD_SIZE):
    """The jitted edit step on `mesh` and its placed arguments: `fn(*args)` is
    `sharded_edit_batch(...)`, and `fn.lower(*args).compile()` its compiled form (cost
    and memory analysis)."""
    batch = pad_for_mesh(batch, mesh)
    in_sh = (editor_shardings(state, mesh, shard_editor, min_size=min_size),
             param_shardings(params, mesh, min_size=min_size), row_shardings(batch, mesh),
             delta_shardings(deltas, lcfg, mesh, min_size=min_size))
    statics = {"ecfg": ecfg, "lcfg": lcfg, "n_answer": n_answer, "remat": remat, "chunk": chunk}
    fn = _compiled(_edit, statics, in_sh, (in_sh[3], in_sh[0]), ())
    return fn, place((state, params, batch, deltas), in_sh)


def sharded_edit_batch(state, params, batch: Batch, deltas, **kw):
    """`evaluate.edit_batch` on `kw["mesh"]`: (new deltas, editor state), deltas sharded
    like their kernels. Inputs are placed (and the batch padded) as needed; inputs already
    in place are used as they are. Keywords: those of `edit_batch` plus mesh,
    shard_editor and min_size. With `chunk`, a multiple of the data axis keeps every
    microbatch spread over all data devices."""
    fn, args = prepare_edit(state, params, batch, deltas, **kw)
    return fn(*args)


def _train(nets, stats, opt_state, params, batch, deltas, key_gram, *memory, **statics):
    from .train import train_step
    return train_step(nets, stats, opt_state, params, batch, deltas, *(memory or (None,)), key_gram, **statics)


def prepare_train(nets, stats, opt_state, params, batch, deltas, memory=None, key_gram=None, *, mesh: Mesh, ecfg,
                  lcfg: ModelConfig, tx, n_answer, beta_power: int = 1, only_step: int | None = None,
                  remat: bool = False, shard_editor: bool = False, min_size: int = MIN_SHARD_SIZE):
    """The jitted meta-training step on `mesh` and its placed arguments (see
    `prepare_edit`). The hypernetworks and optimiser state are donated, as in
    `train.train_step`. The key memory, if any, is replicated."""
    extra = () if memory is None else (memory,)
    key_gram = key_gram or {}
    batch, extra = pad_for_mesh((batch, extra), mesh)
    ed = functools.partial(editor_shardings, mesh=mesh, shard=shard_editor, min_size=min_size)
    in_sh = (ed(nets), ed(stats), ed(opt_state), param_shardings(params, mesh, min_size=min_size),
             row_shardings(batch, mesh), delta_shardings(deltas, lcfg, mesh, min_size=min_size),
             editor_shardings(key_gram, mesh), *row_shardings(extra, mesh))
    out_sh = (in_sh[0], in_sh[1], in_sh[2], in_sh[5], NamedSharding(mesh, P()), in_sh[6])
    statics = {"ecfg": ecfg, "lcfg": lcfg, "tx": tx, "n_answer": n_answer, "beta_power": beta_power,
               "only_step": only_step, "remat": remat}
    fn = _compiled(_train, statics, in_sh, out_sh, (0, 2))
    return fn, place((nets, stats, opt_state, params, batch, deltas, key_gram, *extra), in_sh)


def sharded_train_step(nets, stats, opt_state, params, batch, deltas, memory=None, key_gram=None, **kw):
    """`train.train_step` on `kw["mesh"]`: (nets, stats, opt_state, deltas, metrics,
    key_gram), metrics replicated. Keywords: those of `train_step` plus mesh, shard_editor and
    min_size. `memory` is RLEdit's buffer of earlier batches (its rows are split over the
    data axis too)."""
    fn, args = prepare_train(nets, stats, opt_state, params, batch, deltas, memory, key_gram, **kw)
    return fn(*args)
