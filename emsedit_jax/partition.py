"""The sharding rule table: which mesh axes split which dimension of each tensor.

A mesh has three named axes (any of them may have size 1):

- ``data``: batch rows (packed edit requests) are split over it; parameters are
  replicated along it.
- ``fsdp``: fully sharded data parallelism. Batch rows are split over it too, and every
  large parameter is split along its hidden-size (``embed``) dimension; XLA gathers a
  layer's weights where they are used.
- ``tensor``: tensor (Megatron-style) parallelism. Batch rows are not split over it;
  attention heads and the MLP's hidden units are: the input projections (q/k/v, gate/up,
  fc_in) are split on their outputs, the output projections (o, down, fc_out) on their
  inputs, and the embedding and LM head on the vocabulary.

`RULES` maps each parameter role (`TensorSpec.role` in the model's tensor table) to the
mesh axes of the dimensions of one layer's kernel; a bias takes the entry of its
kernel's last dimension, and the stacked layout's leading layer axis is never split.
A dimension that its axis size does not divide stays whole; for the ``fsdp`` axis the
next largest divisible dimension takes it instead. Tensors with fewer than
`MIN_SHARD_SIZE` elements per layer are replicated.

The editor's state is split along its largest dimension over fsdp x tensor
(`editor_spec`).

`constrain` applies the same rules inside a jitted function (`jax.lax.with_sharding_constraint`)
when the caller has set a mesh (`jax.set_mesh`); without one it does nothing, so one
jitted function serves one device and any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

from .errors import ConfigError

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
MIN_SHARD_SIZE = 2 ** 10     # tensors (one layer's slice) with fewer elements are replicated
ROWS = (DATA, FSDP)          # the mesh axes batch rows are split over

# role -> mesh axis of each dimension of one layer's kernel (None: not split).
RULES: dict[str, tuple[str | None, ...]] = {
    "embedding": (TENSOR, FSDP),              # (vocab, embed)
    "position_embedding": (None, FSDP),       # (positions, embed)
    "attn_q": (FSDP, TENSOR),                 # (embed, heads * head_dim)
    "attn_k": (FSDP, TENSOR),                 # (embed, kv_heads * head_dim)
    "attn_v": (FSDP, TENSOR),
    "attn_qkv": (FSDP, TENSOR),               # GPT-2's fused (embed, 3 * embed)
    "attn_o": (TENSOR, FSDP),                 # (heads * head_dim, embed)
    "mlp_in": (FSDP, TENSOR),                 # (embed, mlp)
    "mlp_out": (TENSOR, FSDP),                # (mlp, embed)
    "lm_head": (FSDP, TENSOR),                # (embed, vocab)
    "norm": (None,),                          # scales and biases of norms: replicated
}
ROLES = tuple(RULES)
STRATEGIES = ("fsdp", "tp")


def mesh_shape(data: int, model: int, strategy: str = "fsdp") -> dict[str, int]:
    """Axis sizes of a (data, model) mesh whose model axis is `strategy` ("fsdp": fully
    sharded data parallel, the default; "tp": tensor parallel)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"sharding strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    return {DATA: data, FSDP: model if strategy == "fsdp" else 1, TENSOR: model if strategy == "tp" else 1}


def _spec(dims: Sequence) -> P:
    """A PartitionSpec without trailing Nones: the form jit gives its outputs, so a step's
    outputs fed back compare equal to placed inputs (jit compiles again otherwise)."""
    dims = list(dims)
    while dims and dims[-1] is None:
        dims.pop()
    return P(*dims)


def _size(axes: Mapping[str, int], names) -> int:
    return math.prod(axes.get(n, 1) for n in names)


def spec_for(role: str, shape: Sequence[int], axes: Mapping[str, int], *, skip: int = 0,
             min_size: int = MIN_SHARD_SIZE) -> P:
    """PartitionSpec of a tensor of `role` and `shape` on a mesh with axis sizes `axes`
    (only the axes named there are used). `skip` leading dimensions (the stacked layer
    axis) are never split."""
    if role not in RULES:
        raise ValueError(f"unknown tensor role {role!r} (known: {', '.join(ROLES)})")
    dims: list[str | None] = [None] * len(shape)
    inner = list(shape[skip:])
    if math.prod(inner) < min_size:
        return _spec(dims)
    rule = RULES[role][-len(inner):] if len(inner) <= len(RULES[role]) else (None,) * len(inner)
    for i, name in enumerate(rule):
        if name is not None and axes.get(name, 1) > 1 and inner[i] % axes[name] == 0:
            dims[skip + i] = name
    if axes.get(FSDP, 1) > 1 and FSDP in rule and FSDP not in dims:
        free = [skip + i for i, n in enumerate(inner) if dims[skip + i] is None and n % axes[FSDP] == 0]
        if free:
            dims[max(free, key=lambda i: (shape[i], i))] = FSDP
    return _spec(dims)


def editor_spec(shape: Sequence[int], axes: Mapping[str, int], *, min_size: int = MIN_SHARD_SIZE) -> P:
    """The editor's state (hypernetworks, normaliser statistics, key memory, optimiser
    state): its largest dimension that the model axes (fsdp x tensor) divide goes on
    them (ties to the later dimension); vectors and small tensors are replicated."""
    dims: list = [None] * len(shape)
    model = tuple(a for a in (FSDP, TENSOR) if axes.get(a, 1) > 1)
    size = _size(axes, model)
    if size == 1 or math.prod(shape) < min_size or len(shape) < 2:
        return _spec(dims)
    candidates = [i for i in range(len(shape)) if shape[i] % size == 0]
    if candidates:
        dims[max(candidates, key=lambda i: (shape[i], i))] = model if len(model) > 1 else model[0]
    return _spec(dims)


def row_axes(axes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes (of those present) that batch rows are split over."""
    return tuple(a for a in ROWS if a in axes)


def n_row_shards(axes: Mapping[str, int]) -> int:
    return _size(axes, row_axes(axes))


def rows_spec(ndim: int, axes: Mapping[str, int], lead: int = 0) -> P:
    """Rows (axis `lead`) split over the row axes, everything else whole."""
    rows = row_axes(axes)
    entry = None if not rows else rows if len(rows) > 1 else rows[0]
    return _spec([*([None] * lead), entry, *([None] * (ndim - lead - 1))])


def ambient_axes() -> dict[str, int]:
    """Axis sizes of the mesh set by the caller (`jax.set_mesh`), {} without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))


def constrain(x, spec_fn):
    """`jax.lax.with_sharding_constraint(x, spec_fn(axes))` under a caller-set mesh whose
    axis sizes are `axes`; `x` unchanged without a mesh. Inside jitted code only."""
    axes = ambient_axes()
    if not axes:
        return x
    return jax.lax.with_sharding_constraint(x, spec_fn(axes))


def constrain_rows(x, lead: int = 0):
    """Activations (B, ...): rows split over the row axes of the caller's mesh."""
    return constrain(x, lambda axes: rows_spec(x.ndim, axes, lead))
