"""Running mean / standard deviation of the hypernetwork inputs [u; g].

Kept per hypernetwork, updated with every batch (also at evaluation time) by the
parallel-variance merge of (count, mean, M2), and never differentiated.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Stats(NamedTuple):
    count: Array   # ()
    mean: Array    # (D,)
    m2: Array      # (D,) sum of squared deviations


def init_stats(dim: int) -> Stats:
    return Stats(jnp.zeros((), jnp.float32), jnp.zeros((dim,), jnp.float32), jnp.zeros((dim,), jnp.float32))


def update(stats: Stats, x: Array | tuple[Array, ...], mask: Array) -> Stats:
    """Merge the rows of x (N, D) where mask (N,) is True into stats. x may also be given
    as its column blocks side by side, a tuple of (N, D_i) arrays (never concatenated)."""
    w = mask.astype(stats.mean.dtype)[:, None]
    n_b = jnp.sum(w)
    means, m2s = [], []
    for block in (x if isinstance(x, tuple) else (x,)):
        block = jax.lax.stop_gradient(block.astype(stats.mean.dtype))
        means.append(jnp.sum(block * w, axis=0) / jnp.maximum(n_b, 1.0))
        m2s.append(jnp.sum(jnp.square(block - means[-1]) * w, axis=0))
    mean_b, m2_b = jnp.concatenate(means), jnp.concatenate(m2s)
    n = stats.count + n_b
    delta = mean_b - stats.mean
    frac = n_b / jnp.maximum(n, 1.0)
    mean = stats.mean + delta * frac
    m2 = stats.m2 + m2_b + jnp.square(delta) * stats.count * frac
    return Stats(n, mean, m2)


def normalise(stats: Stats, x: Array, eps: float = 1e-5) -> Array:
    """(x - mean) / std with the unbiased variance; constants for autodiff. Statistics of
    fewer than two rows have no spread to standardise by (one row minus its own mean is
    zero: an editor with fresh statistics editing a single answer token in a single
    module would make no update), so x passes unchanged."""
    stats = jax.lax.stop_gradient(stats)
    var = stats.m2 / jnp.maximum(stats.count - 1.0, 1.0)
    return jnp.where(stats.count >= 2, (x - stats.mean) / (jnp.sqrt(var) + eps), x)
