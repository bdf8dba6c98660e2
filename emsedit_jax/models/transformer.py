"""The forward pass shared by every family: embed -> layers -> head.

Parameters are a nested dict. The per-layer tensors come in one of two layouts:
- stacked: `params["layers"]` is one tree whose arrays have a leading layer axis (L, ...).
  Runs of layers without edits go through one `jax.lax.scan` (fast to compile).
- list: `params["layers"]` is a tuple of L per-layer trees; the layers are unrolled. On
  CPU this is the fast layout: XLA copies the slice of a stacked weight that a scan
  step (or a static index) reads before multiplying with it, which costs about as much
  as the matmul itself for the models edited here. `load_model` returns it.
`stack_layers` / `unstack_layers` convert. Edited layers are always unrolled so each
can carry its own `ModuleEdit`s. Everything here is a pure function of (config,
params, inputs) and accepts either layout.
"""

from __future__ import annotations

import functools
import re
from types import ModuleType
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..partition import constrain_rows
from . import gpt2, gptj, llama
from .config import ModelConfig
from .layers import Array, ModuleEdit, Params, Tap, TensorSpec, default_positions, get_path, set_path

Edits = Mapping[int, Mapping[str, ModuleEdit]]   # layer index -> module suffix -> edit

_FAMILY: dict[str, ModuleType] = {"llama": llama, "gpt2": gpt2, "gptj": gptj}


def family(cfg: ModelConfig) -> ModuleType:
    return _FAMILY[cfg.family]


def tensor_specs(cfg: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    return family(cfg).tensor_specs(cfg)


# ---------------------------------------------------------------- module names
def builtin(cfg) -> bool:
    """True for the built-in families (a ModelConfig). Any other model description
    (a `flax_nnx.FlaxModel`: NNX or Linen) brings its own parse_module, module_shape,
    get_kernel, apply_deltas and run(params, ids, mask, positions, edits by module name,
    logit_positions) -> (logits, keys), to which the functions here and in
    editor.capture defer; runs.config_sha256 uses its architecture(), the CLI and API
    its default `modules`."""
    return isinstance(cfg, ModelConfig)


def parse_module(cfg: ModelConfig, name: str) -> tuple[int, str]:
    """'model.layers.18.mlp.up_proj' -> (18, 'mlp.up_proj'); checks it is a linear."""
    if not builtin(cfg):
        return cfg.parse_module(name)
    m = re.fullmatch(re.escape(cfg.layer_prefix) + r"\.(\d+)\.(.+)", name)
    if not m:
        raise ValueError(f"module {name!r} is not of the form '{cfg.layer_prefix}.<layer>.<module>'")
    layer, suffix = int(m.group(1)), m.group(2)
    if not 0 <= layer < cfg.num_layers:
        raise ValueError(f"module {name!r}: layer {layer} out of range (model has {cfg.num_layers})")
    if ("layers", *suffix.split("."), "kernel") not in tensor_specs(cfg):
        linears = sorted(".".join(k[1:-1]) for k in tensor_specs(cfg) if k[0] == "layers" and k[-1] == "kernel")
        raise ValueError(f"module {name!r}: {suffix!r} is not a linear module of {cfg.model_type} "
                         f"(linear modules: {', '.join(linears)})")
    return layer, suffix


def module_shape(cfg: ModelConfig, name: str) -> tuple[int, int]:
    """(d_in, d_out) of an editable linear module."""
    if not builtin(cfg):
        return cfg.module_shape(name)
    _, suffix = parse_module(cfg, name)
    return tensor_specs(cfg)[("layers", *suffix.split("."), "kernel")].shape


# ---------------------------------------------------------------- layer layouts
def is_layer_list(params: Params) -> bool:
    """True for the list layout (a tuple of per-layer trees), False for stacked."""
    return isinstance(params["layers"], (list, tuple))


def unstack_layers(params: Params) -> Params:
    """The list layout of `params` (returned unchanged if it already is one)."""
    if is_layer_list(params):
        return params
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, i=i: a[i], params["layers"]) for i in range(n))}


def stack_layers(params: Params) -> Params:
    """The stacked layout of `params` (returned unchanged if it already is one)."""
    if not is_layer_list(params):
        return params
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *params["layers"])}


def layer_params(params: Params, i: int) -> Params:
    """The parameters of layer i, in either layout."""
    if is_layer_list(params):
        return params["layers"][i]
    return jax.tree.map(lambda a: a[i], params["layers"])


def get_kernel(cfg: ModelConfig, params: Params, name: str) -> Array:
    if not builtin(cfg):
        return cfg.get_kernel(params, name)
    layer, suffix = parse_module(cfg, name)
    return get_path(layer_params(params, layer), (*suffix.split("."), "kernel"))


def apply_deltas(cfg: ModelConfig, params: Params, deltas: Mapping[str, Array]) -> Params:
    """A new parameter tree with W + dW for each named module (params untouched)."""
    if not builtin(cfg):
        return cfg.apply_deltas(params, deltas)
    listed = is_layer_list(params)
    layers = list(params["layers"]) if listed else params["layers"]
    for name, delta in deltas.items():
        layer, suffix = parse_module(cfg, name)
        path = tuple(suffix.split(".")) + ("kernel",)

        def update(tree, path=path, layer=layer, delta=delta):
            if len(path) == 1:
                k = tree[path[0]]
                new = k + delta.astype(k.dtype) if listed else k.at[layer].add(delta.astype(k.dtype))
                return {**tree, path[0]: new}
            return {**tree, path[0]: update(tree[path[0]], path[1:])}

        if listed:
            layers[layer] = update(layers[layer])
        else:
            layers = update(layers)
    return {**params, "layers": tuple(layers) if listed else layers}


# ---------------------------------------------------------------- initialisation
def init_params(cfg: ModelConfig, key: Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters with the right shapes (for tests and timing runs)."""
    specs = tensor_specs(cfg)
    keys = jax.random.split(key, len(specs))
    params: Params = {}
    for k, (path, spec) in zip(keys, sorted(specs.items())):
        shape = ((cfg.num_layers,) if spec.stacked else ()) + spec.shape
        if spec.init == "ones":
            value = jnp.ones(shape, dtype)
        elif spec.init == "zeros":
            value = jnp.zeros(shape, dtype)
        else:
            value = (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)
        set_path(params, path, value)
    return params


def abstract_params(cfg: ModelConfig, dtype=jnp.float32, stacked: bool = True) -> Params:
    """ShapeDtypeStructs of the parameters (in the stacked or the list layout), without
    allocating them."""
    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), dtype))
    return tree if stacked else {**tree, "layers": tuple(
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), tree["layers"])
        for _ in range(cfg.num_layers))}


# ---------------------------------------------------------------- forward pieces
def embed(cfg: ModelConfig, params: Params, input_ids: Array, positions: Array) -> Array:
    """input_ids (B, S), positions (B, S) -> hidden (B, S, D), in cfg.residual_dtype if set."""
    h = family(cfg).embed(cfg, params, input_ids, positions)
    return h if cfg.residual_dtype is None else h.astype(cfg.residual_dtype)


def context(cfg: ModelConfig, attention_mask: Array, positions: Array) -> dict:
    """Per-batch constants of the layers (mask bias, rotary tables). attention_mask
    (B, S) is 0 on padding and a segment id per packed sequence otherwise."""
    return family(cfg).context(cfg, attention_mask, positions)


def run_layers(cfg: ModelConfig, params: Params, h: Array, ctx: dict, *, start: int = 0,
               stop: int | None = None, edits: Edits | None = None, remat: bool = False
               ) -> tuple[Array, dict[tuple[int, str], Array]]:
    """Layers [start, stop) on hidden h (B, S, D). Returns the new hidden state and the
    keys recorded by edited modules, as {(layer, suffix): (B, A, d_in)}."""
    stop = cfg.num_layers if stop is None else stop
    edits = edits or {}
    keys: dict[tuple[int, str], Array] = {}
    i = start
    h = constrain_rows(h)      # under a mesh: rows split over its row axes (no-op otherwise)
    while i < stop:
        if i in edits:
            h, k = layer(cfg, layer_params(params, i), h, ctx, edits[i])
            keys.update({(i, name): v for name, v in k.items()})
            i += 1
        elif is_layer_list(params):
            h, _ = layer(cfg, params["layers"][i], h, ctx, remat=remat)
            i += 1
        else:
            j = min([e for e in edits if i < e < stop] + [stop])
            run = jax.tree.map(lambda a: a[i:j], params["layers"])
            h, _ = jax.lax.scan(lambda h, lp: (layer(cfg, lp, h, ctx, remat=remat)[0], None), h, run)
            i = j
    return h, keys


@functools.partial(jax.jit, static_argnames=("cfg", "remat"))
def layer(cfg: ModelConfig, lp: Params, h: Array, ctx: dict, edits: Mapping[str, ModuleEdit] | None = None,
          remat: bool = False) -> tuple[Array, dict[str, Array]]:
    """One layer with its parameters `lp` and its modules' `edits` on hidden h (B, S, D):
    (new hidden, {module suffix: recorded keys}); `remat` recomputes its activations in
    the backward pass.

    A jitted function, also when called inside another jitted function: JAX traces,
    differentiates and transposes it once per kind of call (argument shapes, edited
    modules) and reuses that for every layer, instead of once per layer and per use (an
    edit step runs the layers above the first edited one in every one of its T
    captures). XLA inlines the calls; the compiled program is the same. Tracing the
    embedded model's CounterFact training step (T = 6, 27 layers from the first edited
    one) takes 4.1 s this way against 17.4 s (experiments/bench_trace.py)."""
    def run(lp, h, ctx, edits):
        tap = Tap(lp, edits)
        return constrain_rows(family(cfg).block(cfg, lp, h, ctx, tap)), tap.keys
    return (jax.checkpoint(run) if remat else run)(lp, h, ctx, edits)


def head(cfg: ModelConfig, params: Params, h: Array, positions: Array | None = None) -> Array:
    """Final norm and LM head in float32. h (B, S, D) -> logits (B, S, V); with
    positions (B, A) only those rows are computed -> (B, A, V)."""
    if positions is not None:
        h = jnp.take_along_axis(h, positions[..., None], axis=1)
    return family(cfg).head(cfg, params, h)


def forward(cfg: ModelConfig, params: Params, input_ids: Array, attention_mask: Array, *,
            positions: Array | None = None, edits: Edits | None = None,
            logit_positions: Array | None = None, remat: bool = False
            ) -> tuple[Array, dict[tuple[int, str], Array]]:
    """Full model: (B, S) ids and mask -> (logits, captured keys). `positions`
    defaults to 0..S-1 (right padding); packed rows pass each token's position."""
    positions = default_positions(attention_mask) if positions is None else positions
    if not builtin(cfg):
        if edits:
            raise ValueError("forward: edits by layer apply to the built-in families; pass deltas to apply_deltas")
        return cfg.run(params, input_ids, attention_mask, positions, {}, logit_positions)[0], {}
    ctx = context(cfg, attention_mask, positions)
    h, keys = run_layers(cfg, params, embed(cfg, params, input_ids, positions), ctx, edits=edits, remat=remat)
    return head(cfg, params, h, logit_positions), keys


def logits(cfg: ModelConfig, params: Params, input_ids: Array, attention_mask: Array) -> Array:
    return forward(cfg, params, input_ids, attention_mask)[0]


def greedy_generate(cfg: ModelConfig, params: Params, input_ids: np.ndarray, attention_mask: np.ndarray,
                    max_new_tokens: int, pad_id: int = 0) -> np.ndarray:
    """Greedy continuation of right-padded prompts (no KV cache: recomputes the full
    sequence each step, which is fine for the short demos here).
    Returns (B, max_new_tokens) new token ids."""
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask)
    b, s = ids.shape
    total = s + max_new_tokens
    buf = np.full((b, total), pad_id, np.int32)
    buf[:, :s] = ids
    m = np.zeros((b, total), np.int32)
    m[:, :s] = mask
    lengths = mask.sum(1).astype(np.int64)
    out = np.zeros((b, max_new_tokens), np.int32)
    for t in range(max_new_tokens):
        nxt = np.asarray(_next_token(cfg, params, jnp.asarray(buf), jnp.asarray(m), jnp.asarray(lengths - 1)))
        out[:, t] = nxt
        buf[np.arange(b), lengths] = nxt
        m[np.arange(b), lengths] = 1
        lengths = lengths + 1
    return out


@functools.partial(jax.jit, static_argnums=0)
def _next_token(cfg: ModelConfig, params: Params, ids: Array, mask: Array, last: Array) -> Array:
    """Greedy token after position `last` (B,) of each row -> (B,) int32."""
    lg = forward(cfg, params, ids, mask, logit_positions=last[:, None])[0]
    return jnp.argmax(lg[:, 0], axis=-1).astype(jnp.int32)
