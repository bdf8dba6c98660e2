"""Turning pseudo keys and value gradients into weight updates.

ridge: dW = (U^T U + e^lamda I)^-1 U^T D   (EMSEdit, MALMEN, RLEdit)
       dW = (U^T U + e^lamda I + P)^-1 U^T D with a prior P (d_in, d_in): the key memory
       P = mu * G, G the Gram matrix of the stream's earlier keys (an extension)
rank1: dW = sum_i u~_i d_iᵀ                 (MEND; d_i already carries -eta)

Masked (padding) rows must be zero in U and D: they then contribute nothing. When
there are fewer rows than input dimensions the same solution is computed in its dual
form dW = U^T (U U^T + e^lamda I)^-1 D, which is cheaper and has the same gradient.
Both Gram matrices are symmetric positive definite (e^lamda > 0, the prior positive
semi-definite), so they are solved by Cholesky (`spd_solve`), not LU.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_vjp
def spd_solve(g: Array, b: Array) -> Array:
    """G^-1 B for a symmetric positive definite G (n, n), B (n, m), by Cholesky.
    Against `jnp.linalg.solve` (LU): half the factorisation's FLOPs and no pivots; on CPU
    XLA turns LU's pivots into a row permutation with a loop of n tiny steps, which took
    about 8% of the threads' busy time in a training step of the embedded model (576-wide
    key memory; experiments/README.md, "Edit speed"). The
    backward pass reuses the factor: B̄ = G^-1 X̄ and Ḡ = -B̄ Xᵀ (G = Gᵀ); JAX's own
    Cholesky derivative differentiates the factorisation and is slower than LU's."""
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(g), True), b)


def _spd_solve_fwd(g, b):
    factor = jnp.linalg.cholesky(g)
    x = jax.scipy.linalg.cho_solve((factor, True), b)
    return x, (factor, x)


def _spd_solve_bwd(res, x_bar):
    factor, x = res
    b_bar = jax.scipy.linalg.cho_solve((factor, True), x_bar)
    return -b_bar @ x.T, b_bar


spd_solve.defvjp(_spd_solve_fwd, _spd_solve_bwd)


def ridge(u: Array, d: Array, lamda: Array, prior: Array | None = None) -> Array:
    """u (N, d_in), d (N, d_out), lamda (), prior (d_in, d_in) or None -> dW (d_in, d_out).
    The solves take min(N, d_out) right-hand sides: with N answer slots well below
    d_out, (G^-1 U^T) D is cheaper than G^-1 (U^T D) on CPU LAPACK (same gradient)."""
    chex.assert_rank([u, d, lamda], [2, 2, 0])        # trace-time: free under jit
    chex.assert_equal_shape_prefix([u, d], 1)
    n, d_in = u.shape
    d_out = d.shape[1]
    if prior is not None:
        chex.assert_shape(prior, (d_in, d_in))
    reg = jnp.exp(lamda)
    if prior is None and n < d_in:
        gram = u @ u.T + reg * jnp.eye(n, dtype=u.dtype)
        return u.T @ (spd_solve(gram, jnp.eye(n, dtype=u.dtype)) @ d) if n < d_out else u.T @ spd_solve(gram, d)
    gram = u.T @ u + reg * jnp.eye(d_in, dtype=u.dtype)
    if prior is not None:
        gram = gram + prior
    return spd_solve(gram, u.T) @ d if n < d_out else spd_solve(gram, u.T @ d)


def ridge_each(u: Array, d: Array, lamda: Array, prior: Array | None = None) -> list[Array]:
    """`ridge` for K modules: u (K, N, d_in), d (K, N, d_out), lamda (K,), prior
    (K, d_in, d_in) or None -> K arrays (d_in, d_out), one per module.
    One unbatched solve per module rather than a vmap: jaxlib's CPU LAPACK kernels split
    a batched factorisation into tasks on the intra-op thread pool and block until they
    finish, which deadlocks when several host devices of a mesh factorise at the same
    time and occupy every pool thread (e.g. 2 cores, 2 devices). The updates are
    returned separately, not stacked: the gradient of taking module k out of a stack is
    a zero-padded (K, d_in, d_out) array per module, which XLA on CPU materialises
    (K x 21 MB per step for the embedded model's up_proj). The default on CPU;
    `ridge_batched` elsewhere (backend.solve)."""
    chex.assert_rank([u, d, lamda], [3, 3, 1])
    chex.assert_equal_shape_prefix([u, d], 2)
    chex.assert_equal_shape_prefix([u, lamda], 1)
    return [ridge(u[k], d[k], lamda[k], None if prior is None else prior[k]) for k in range(u.shape[0])]


def ridge_batched(u: Array, d: Array, lamda: Array, prior: Array | None = None) -> list[Array]:
    """`ridge_each` as one vmapped (batched) solve; the same K updates."""
    if prior is None:
        stack = jax.vmap(ridge)(u, d, lamda)
    else:
        stack = jax.vmap(ridge)(u, d, lamda, prior)
    return [stack[k] for k in range(u.shape[0])]


def ridge_from_sums(uu: Array, ud: Array, lamda: Array, prior: Array | None = None) -> list[Array]:
    """`ridge_each` from the sums it needs: uu (K, d_in, d_in) = UᵀU and ud (K, d_in, d_out)
    = UᵀD per module, accumulated over any number of slots (steps.slot_sums), lamda (K,),
    prior (K, d_in, d_in) or None -> K arrays (d_in, d_out). The primal form only."""
    chex.assert_rank([uu, ud, lamda], [3, 3, 1])
    eye = jnp.eye(uu.shape[-1], dtype=uu.dtype)
    out = []
    for k in range(uu.shape[0]):
        gram = uu[k] + jnp.exp(lamda[k]) * eye
        if prior is not None:
            gram = gram + prior[k]
        out.append(spd_solve(gram, ud[k]))
    return out


def ridge_primal(u: Array, d: Array, lamda: Array) -> Array:
    """The (d_in x d_in) normal-equation form, whatever the shapes (for tests)."""
    gram = u.T @ u + jnp.exp(lamda) * jnp.eye(u.shape[1], dtype=u.dtype)
    return jnp.linalg.solve(gram, u.T @ d)


def rank1(u_tilde: Array, d: Array) -> Array:
    """u~ (N, d_in), d (N, d_out) -> sum of outer products (d_in, d_out)."""
    chex.assert_rank([u_tilde, d], 2)
    chex.assert_equal_shape_prefix([u_tilde, d], 1)
    return u_tilde.T @ d
