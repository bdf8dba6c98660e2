"""The jaxpr FLOP counter against hand counts and XLA's own count on loop-free code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from emsedit_jax.flops import count_flops


def _layers(x, w):
    def body(c, _):
        return jnp.tanh(c @ w), None
    return jax.lax.scan(body, x, None, length=5)[0].sum()


def test_scan_body_is_counted_once_per_iteration():
    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
    assert count_flops(_layers, x, w) == 5 * 2 * 8 * 16 * 16
    # Backward: two more matmuls of the same size per layer.
    assert count_flops(jax.grad(_layers, argnums=1), x, w) == 3 * 5 * 2 * 8 * 16 * 16
    # Rematerialised and jitted: the same forward count.
    assert count_flops(jax.jit(jax.checkpoint(_layers)), x, w) == 5 * 2 * 8 * 16 * 16


def test_matches_xla_on_loop_free_code():
    def f(a, b, c):
        return jnp.einsum("bij,bjk->bik", a, b) @ c
    args = jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6)), jnp.ones((6, 7))
    ours = count_flops(f, *args)
    assert ours == 2 * 3 * 4 * 5 * 6 + 2 * 3 * 4 * 6 * 7
    xla = jax.jit(f).lower(*args).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert ours == pytest.approx(xla["flops"], rel=0.05)


def test_keyword_arguments_are_static():
    def f(x, *, k):
        return x @ jnp.ones((x.shape[1], k))
    assert count_flops(f, jnp.ones((2, 3)), k=4) == 2 * 2 * 3 * 4


def test_switch_on_the_step_index_is_charged_by_its_branches():
    """A switch on a scan's step index: "max" charges every step the dearest branch (a
    bound), "mean" the exact total here."""
    def steps(x):
        def body(c, t):
            y = jax.lax.switch(t, [lambda v: (v @ jnp.ones((8, 16))).sum(), lambda v: (v @ jnp.ones((8, 4))).sum()], x)
            return c + y, None
        return jax.lax.scan(body, 0.0, jnp.arange(2))[0]

    x = jnp.ones((2, 8))
    assert count_flops(steps, x) == 2 * (2 * 2 * 8 * 16)
    assert count_flops(steps, x, cond="mean") == 2 * 2 * 8 * 16 + 2 * 2 * 8 * 4
    with pytest.raises(ValueError, match="cond"):
        count_flops(steps, x, cond="min")


def test_census_lists_each_matmul_shape_with_its_count():
    """dot_census: the scan body's one matmul, run 5 times; the backward pass adds the two
    transposed products; its FLOPs add up to count_flops."""
    from emsedit_jax.flops import dot_census
    x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
    census = dot_census(_layers, x, w)
    (spec, n), = census.items()
    assert n == 5 and spec.lhs_shape == (8, 16) and spec.rhs_shape == (16, 16) and spec.flops == 2 * 8 * 16 * 16
    grad = dot_census(jax.grad(_layers, argnums=1), x, w)
    assert sum(grad.values()) == 15 and len(grad) >= 2
    assert sum(s.flops * n for s, n in grad.items()) == count_flops(jax.grad(_layers, argnums=1), x, w)
    # a spec is enough to run the same matmul alone
    out = jax.lax.dot_general(jnp.ones(spec.lhs_shape), jnp.ones(spec.rhs_shape), spec.dimension_numbers,
                              preferred_element_type=spec.preferred_element_type)
    assert out.shape == (8, 16)
