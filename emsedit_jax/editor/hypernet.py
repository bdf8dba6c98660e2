"""The residual low-rank hypernetwork, one per distinct kernel shape.

Input h = normalised [u; g] of width D = d_in + d_out. Each of `n_blocks` blocks computes
    h <- h + scale_k * relu(h A B + b) + shift_k
with A ~ N(0, 1) (D, r), B = 0 (r, D), b = 0, and per-layer scale_k = 1, shift_k = 0 for
the k-th layer sharing the network, so the network starts as the identity. The output
splits into (u~, g~). Parameters of several steps are stacked on a leading axis P, each
with the largest step's rank; step t uses the first rank_t columns of A (rows of B).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def init_net(key: Array, d_in: int, d_out: int, n_layers: int, rank: int, n_blocks: int,
             lr_init: float, lamda_init: float) -> dict[str, Array]:
    dim = d_in + d_out
    return {
        "A": jax.random.normal(key, (n_blocks, dim, rank), jnp.float32),
        "B": jnp.zeros((n_blocks, rank, dim), jnp.float32),
        "b": jnp.zeros((n_blocks, dim), jnp.float32),
        "scale": jnp.ones((n_blocks, n_layers, dim), jnp.float32),
        "shift": jnp.zeros((n_blocks, n_layers, dim), jnp.float32),
        "lr": jnp.full((n_layers,), lr_init, jnp.float32),          # eta_k
        "lamda": jnp.full((n_layers,), lamda_init, jnp.float32),    # log ridge strength
    }


def relu_open(x: Array) -> Array:
    """max(x, 0) with derivative 1 at x = 0 (like torch.clamp(min=0)). At initialisation
    B = 0 and b = 0 make every pre-activation exactly 0; with jax.nn.relu's derivative
    of 0 there, no gradient would ever reach A, B, b or scale."""
    return jnp.where(x >= 0, x, 0.0)


def apply_net(net: dict[str, Array], h: Array, rank: int | None = None) -> Array:
    """h (K, N, D): rows of the K layers sharing this net -> (K, N, D). `rank` (static):
    use only the first `rank` columns of A (rows of B), a step's own rank; None: all.
    The blocks are unrolled (n_blocks is small), so every slice is static."""
    rank = net["A"].shape[-1] if rank is None else rank
    for i in range(net["A"].shape[0]):
        z = jnp.einsum("knd,dr->knr", h, net["A"][i, :, :rank])
        z = relu_open(jnp.einsum("knr,re->kne", z, net["B"][i, :rank]) + net["b"][i])
        h = h + net["scale"][i][:, None, :] * z + net["shift"][i][:, None, :]
    return h
