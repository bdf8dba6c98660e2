"""Building blocks shared by the model families: norms, rotary embeddings, attention,
activations, and `Tap`, the trace-time helper through which every linear module of a
layer runs so that edits (weight deltas, key capture, value probes) apply uniformly.

Shapes: B batch, S query length, T key length, D hidden, H heads, K kv heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]


# ---------------------------------------------------------------- parameter specs
@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One parameter: where it lives in the HF checkpoint and its shape here.

    `hf_name` is the full key for top-level tensors and the suffix after
    `<layer_prefix>.<i>.` for per-layer tensors (`stacked=True`, shape without the
    leading layer axis). `transpose` means HF stores the transpose of our array.
    `role` says what the tensor does (`partition.ROLES`: embedding, attn_q, mlp_in,
    norm, lm_head, ...); the sharding rule table maps roles to mesh axes. A bias has
    its module's role.
    """
    hf_name: str
    shape: tuple[int, ...]
    transpose: bool = False
    stacked: bool = False
    init: str = "normal"      # normal | ones | zeros
    role: str = "norm"


def linear_specs(suffix: str, d_in: int, d_out: int, *, bias: bool, hf_transposed: bool, role: str):
    """Specs of a linear module named `suffix` inside a layer: kernel (d_in, d_out)."""
    path = ("layers", *suffix.split("."))
    specs = {path + ("kernel",): TensorSpec(f"{suffix}.weight", (d_in, d_out),
                                             transpose=hf_transposed, stacked=True, role=role)}
    if bias:
        specs[path + ("bias",)] = TensorSpec(f"{suffix}.bias", (d_out,), stacked=True, init="zeros", role=role)
    return specs


def norm_specs(name: str, d: int, *, bias: bool, stacked: bool, hf_name: str | None = None):
    """Specs of a norm's scale (and bias) at path `name`; HF key `hf_name` (default `name`)."""
    path = (("layers",) if stacked else ()) + tuple(name.split("."))
    hf = hf_name or name
    specs = {path + ("weight",): TensorSpec(f"{hf}.weight", (d,), stacked=stacked, init="ones")}
    if bias:
        specs[path + ("bias",)] = TensorSpec(f"{hf}.bias", (d,), stacked=stacked, init="zeros")
    return specs


def get_path(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# ---------------------------------------------------------------- edits and taps
class ModuleEdit(NamedTuple):
    """What happens to one linear module of one layer during a forward pass.

    delta:     (d_in, d_out) added to the kernel, or None.
    positions: (B, A) int32 sequence positions at which the module input is recorded
               (the edit "keys") and `probe` is added to the output; or None.
    probe:     (B, A, d_out) added to the output at `positions` (zeros; its gradient is
               the value gradient); or None.
    """
    delta: Array | None = None
    positions: Array | None = None
    probe: Array | None = None


def _gather(x: Array, positions: Array) -> Array:
    """x (B, S, d), positions (B, A) -> (B, A, d)."""
    return jnp.take_along_axis(x, positions[..., None], axis=1)


class Tap:
    """Runs the linear modules of one layer (trace-time only; holds no state across
    calls). `tap.dense("mlp.up_proj", x)` applies the module, adds its edit if any,
    and records the module input at the edit positions in `tap.keys`."""

    def __init__(self, layer_params: Params, edits: Mapping[str, ModuleEdit] | None = None):
        self.params = layer_params
        self.edits = edits or {}
        self.keys: dict[str, Array] = {}

    def dense(self, name: str, x: Array) -> Array:
        p = get_path(self.params, tuple(name.split(".")))
        w = p["kernel"]
        edit = self.edits.get(name)
        delta = None if edit is None else edit.delta
        low_precision = is_low_precision(w.dtype)
        if delta is not None and not low_precision:
            w = w + delta.astype(w.dtype)
        # A float32 input (float32 residual stream) to bfloat16 weights: the matmul
        # stays in bfloat16, summed in float32; the key keeps the input's precision.
        y = low_precision_einsum("...i,io->...o", x.astype(w.dtype), w, w.dtype) if low_precision else \
            jnp.einsum("...i,io->...o", x, w)
        if delta is not None and low_precision:
            # A small delta would vanish in a bfloat16 W + dW: apply it as a separate
            # product in the delta's precision.
            y = y + jnp.einsum("...i,io->...o", x.astype(delta.dtype), delta).astype(y.dtype)
        if "bias" in p:
            y = y + p["bias"]
        if edit is not None and edit.positions is not None:
            self.keys[name] = _gather(x, edit.positions)
            if edit.probe is not None:
                b = jnp.arange(y.shape[0])[:, None]
                y = y.at[b, edit.positions].add(edit.probe.astype(y.dtype))
        return y


# ---------------------------------------------------------------- numerics
def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation precision: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def is_low_precision(dtype) -> bool:
    return jnp.finfo(dtype).bits < 32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def low_precision_einsum(spec: str, a: Array, b: Array, out_dtype) -> Array:
    """einsum(spec, a, b) of two operands in one low-precision dtype (bfloat16), summed
    in float32 and returned in `out_dtype`; the backward products likewise (the incoming
    gradient rounded to the operands' dtype). XLA on CPU multiplies bfloat16 with a
    float32 result on the processor's bfloat16 units (AMX) and one with a bfloat16
    result as float32 (a 576 -> 1536 layer's forward and input gradient, 512 tokens,
    2 cores: 1,060 against 240 GFLOP/s); accelerators do the former either way. Every
    index of each operand appears in the other or in the result (a product, no sum
    within one operand)."""
    if a.dtype != b.dtype or not is_low_precision(a.dtype):
        raise TypeError(f"low_precision_einsum takes two operands of one low-precision dtype, not {a.dtype} "
                        f"and {b.dtype}")
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _lp_fwd(spec, a, b, out_dtype):
    # Each operand is kept only if the other one's gradient is wanted (symbolic zeros
    # tell which inputs are differentiated): frozen weights get no weight gradient.
    y = low_precision_einsum(spec, a.value, b.value, out_dtype)
    return y, (a.value if b.perturbed else None, b.value if a.perturbed else None)


def _lp_bwd(spec, out_dtype, res, g):
    a, b = res
    dtype = (a if a is not None else b).dtype          # both operands' (low_precision_einsum checks)
    (sa, sb), so = spec.split("->")[0].split(","), spec.split("->")[1]
    g = g.astype(dtype)
    da = None if b is None else jnp.einsum(f"{so},{sb}->{sa}", g, b, preferred_element_type=jnp.float32)
    db = None if a is None else jnp.einsum(f"{sa},{so}->{sb}", a, g, preferred_element_type=jnp.float32)
    return (None if da is None else da.astype(dtype)), (None if db is None else db.astype(dtype))


low_precision_einsum.defvjp(_lp_fwd, _lp_bwd, symbolic_zeros=True)


def head_matmul(spec: str, x: Array, w: Array) -> Array:
    """The LM head's matmul in the weights' dtype (a float32 residual stream does not
    turn it into a float32 matmul), accumulated and returned in at least float32."""
    if is_low_precision(w.dtype):
        return low_precision_einsum(spec, x.astype(w.dtype), w, jnp.float32)
    return jnp.einsum(spec, x, w, preferred_element_type=acc_dtype(x.dtype))


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    xf = x.astype(acc_dtype(x.dtype))
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    xf = x.astype(acc_dtype(x.dtype))
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(y.dtype) + bias.astype(y.dtype)).astype(x.dtype)


def activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def rope_tables(inv_freq, positions: Array) -> tuple[Array, Array]:
    """cos, sin of shape (B, S, len(inv_freq)) in float32 for positions (B, S)."""
    inv = jnp.asarray(inv_freq, jnp.float32)
    ang = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang), jnp.sin(ang)


def rope_rotate_half(x: Array, cos: Array, sin: Array) -> Array:
    """Llama convention: the two halves of the head dim are the (re, im) parts.
    x (B, S, N, Dh); cos/sin (B, S, Dh/2)."""
    c = jnp.concatenate([cos, cos], -1)[:, :, None, :].astype(x.dtype)
    s = jnp.concatenate([sin, sin], -1)[:, :, None, :].astype(x.dtype)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * c + rot * s


def rope_interleaved(x: Array, cos: Array, sin: Array, rotary_dim: int) -> Array:
    """GPT-J convention: adjacent pairs (2i, 2i+1) are rotated, on the first
    `rotary_dim` dims only. x (B, S, N, Dh); cos/sin (B, S, rotary_dim/2)."""
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    c = jnp.repeat(cos, 2, axis=-1)[:, :, None, :].astype(x.dtype)
    s = jnp.repeat(sin, 2, axis=-1)[:, :, None, :].astype(x.dtype)
    x1, x2 = xr[..., 0::2], xr[..., 1::2]
    rot = jnp.stack([-x2, x1], axis=-1).reshape(xr.shape)
    return jnp.concatenate([xr * c + rot * s, xp], axis=-1)


def default_positions(attention_mask: Array) -> Array:
    """Positions 0..S-1 for every row (right padding)."""
    return jnp.broadcast_to(jnp.arange(attention_mask.shape[1], dtype=jnp.int32), attention_mask.shape)


def attention_bias(attention_mask: Array, sliding_window: int | None = None) -> Array:
    """Additive mask (B, 1, 1, S, S) in float32: causal, and a query sees only keys of
    its own sequence. `attention_mask` is 0 on padding and, for packed rows, holds a
    distinct positive segment id per packed sequence (a plain 0/1 mask is one segment)."""
    s = attention_mask.shape[1]
    q = jnp.arange(s)[:, None]
    k = jnp.arange(s)[None, :]
    seg = attention_mask
    allowed = (k <= q)[None] & (seg[:, None, :] == seg[:, :, None]) & (seg[:, None, :] > 0)
    if sliding_window is not None:
        allowed = allowed & ((q - k) < sliding_window)[None]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    return bias[:, None, None].astype(jnp.float32)


def attention(q: Array, k: Array, v: Array, bias: Array, scale: float) -> Array:
    """Grouped-query attention. q (B,S,H,Dh), k/v (B,T,K,Dh), bias (B,1,1,S,T)
    -> (B, S, H*Dh). Scores and softmax in float32.

    The G = H/K query heads that share a key head are one block of G*S rows, so both
    products are plain batched matmuls over (B, K): on the embedded model's shapes (2-core
    CPU, S = 160-512, alternating runs) the forward ran 1.5-2.6x and its gradient
    1.0-1.7x faster than with the group as a separate axis of the products."""
    b, s, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    q = q.reshape(b, s, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, dh)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # (B, K, T, Dh)
    low = is_low_precision(q.dtype) and q.dtype == k.dtype == v.dtype
    scores = low_precision_einsum("bkmd,bktd->bkmt", q, k, jnp.float32) if low else \
        jnp.einsum("bkmd,bktd->bkmt", q, k, preferred_element_type=acc_dtype(q.dtype))
    scores = scores.reshape(b, kv, g, s, -1) * scale + bias.astype(scores.dtype)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * s, -1)
    out = low_precision_einsum("bkmt,bktd->bkmd", probs, v, v.dtype) if low else \
        jnp.einsum("bkmt,bktd->bkmd", probs, v)
    return out.reshape(b, kv, g, s, dh).transpose(0, 3, 1, 2, 4).reshape(b, s, h * dh)
