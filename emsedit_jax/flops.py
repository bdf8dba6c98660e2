"""Matrix-multiply FLOPs of a JAX function, counted on its jaxpr.

XLA's `cost_analysis()` counts the body of a loop once, so it undercounts anything
written as a `lax.scan` (our layer stack and the T edit steps). This walks the jaxpr
instead: every `dot_general` costs 2 * batch * M * N * K, and the body of a scan is
multiplied by its length; nested jaxprs (jit, remat, custom derivatives, cond branches:
the most expensive one, or their mean) are entered. Elementwise work is not counted: on
the models edited here the matmuls are the cost that a roofline compares with.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
from jax.extend import core as jcore


def _dot_flops(eqn) -> int:
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    batch = math.prod(lhs[d] for d in lb)
    contract = math.prod(lhs[d] for d in lc)
    m = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    n = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in eqn.params["dimension_numbers"][1][1])
    return 2 * batch * m * n * contract


def _sub_jaxprs(value: Any):
    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def iter_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in it (scan and cond bodies,
    jit calls, ...), each once, depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from iter_eqns(sub)


def jaxpr_flops(jaxpr, cond: str = "max") -> float:
    """`cond`: how a cond/switch is charged: "max" (its most expensive branch, an upper
    bound) or "mean" (the mean over its branches: exact for a switch on a scan's step
    index that takes every branch equally often, like the T-step edit's)."""
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr, cond)
        elif name == "cond":
            costs = [jaxpr_flops(b.jaxpr, cond) for b in eqn.params["branches"]]
            total += max(costs) if cond == "max" else sum(costs) / len(costs)
        elif name == "while":
            raise ValueError("while loops have no static trip count; FLOPs cannot be counted")
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += jaxpr_flops(sub, cond)
    return total


def count_flops(fn: Callable, *args, cond: str = "max", **kwargs) -> float:
    """Matmul FLOPs of one call of `fn(*args, **kwargs)` (traced, not run). Keyword
    arguments are bound as constants, so static configuration goes there. `cond`: see
    `jaxpr_flops`."""
    if cond not in ("max", "mean"):
        raise ValueError(f"cond must be 'max' or 'mean', not {cond!r}")
    return jaxpr_flops(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr, cond)
