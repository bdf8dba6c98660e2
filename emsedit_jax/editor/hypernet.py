"""The residual low-rank hypernetwork, one per distinct kernel shape.

Input h = normalised [u; g] of width D = d_in + d_out. Each of `n_blocks` blocks computes
    h <- h + scale_k * relu(h A B + b) + shift_k
with A ~ N(0, 1) (D, r), B = 0 (r, D), b = 0, and per-layer scale_k = 1, shift_k = 0 for
the k-th layer sharing the network, so the network starts as the identity. The output
splits into (u~, g~).

Layout: a net is {"blocks": (block, ...), "lr": (K,), "lamda": (K,)}, each block a dict of
its own arrays. The blocks are a tuple rather than arrays stacked on a block axis, and
the parameter sets of several steps (steps.EditorState) a tuple rather than a stacked
axis, each at its own rank: XLA on CPU copies a slice of a stacked weight before using
it (a microbenchmark on the embedded model's shapes: 28% of the forward pass, 34% of its
gradient; README, "Speed").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init_net(key: Array, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int,
             lr_init: float, lamda_init: float) -> dict:
    dim = d_in + d_out
    blocks = tuple({
        "A": jax.random.normal(k, (dim, rank), jnp.float32),
        "B": jnp.zeros((rank, dim), jnp.float32),
        "b": jnp.zeros((dim,), jnp.float32),
        "scale": jnp.ones((n_layers, dim), jnp.float32),
        "shift": jnp.zeros((n_layers, dim), jnp.float32),
    } for k in jax.random.split(key, n_blocks))
    return {
        "blocks": blocks,
        "lr": jnp.full((n_layers,), lr_init, jnp.float32),          # eta_k
        "lamda": jnp.full((n_layers,), lamda_init, jnp.float32),    # log ridge strength
    }


def relu_open(x: Array) -> Array:
    """max(x, 0) with derivative 1 at x = 0 (like torch.clamp(min=0)). At initialisation
    B = 0 and b = 0 make every pre-activation exactly 0; with jax.nn.relu's derivative
    of 0 there, no gradient would ever reach A, B, b or scale."""
    return jnp.where(x >= 0, x, 0.0)


def _block(h: Array, blk: dict) -> Array:
    z = jnp.einsum("knd,dr->knr", h, blk["A"])
    z = relu_open(jnp.einsum("knr,re->kne", z, blk["B"]) + blk["b"])
    return h + blk["scale"][:, None, :] * z + blk["shift"][:, None, :]


def apply_net(net: dict, h: Array, scanned: bool = False) -> Array:
    """h (K, N, D): rows of the K layers sharing this net -> (K, N, D). `scanned`: the
    blocks stacked and run as one `lax.scan` (the layout for GPU / TPU, see
    `backend.hypernet`) instead of one after the other; the same function."""
    if scanned and len(net["blocks"]) > 1:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *net["blocks"])
        return jax.lax.scan(lambda h, blk: (_block(h, blk), None), h, stacked)[0]
    for blk in net["blocks"]:
        h = _block(h, blk)
    return h
