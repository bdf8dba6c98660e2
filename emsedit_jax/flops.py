"""Matrix-multiply FLOPs of a JAX function, counted on its jaxpr.

XLA's `cost_analysis()` counts the body of a loop once, so it undercounts anything
written as a `lax.scan` (our layer stack and the T edit steps). This walks the jaxpr
instead: every `dot_general` costs 2 * batch * M * N * K, and the body of a scan is
multiplied by its length; nested jaxprs (jit, remat, custom derivatives, cond branches:
the most expensive one, or their mean) are entered. Elementwise work is not counted: on
the models edited here the matmuls are the cost that a roofline compares with.
`dot_census` lists the same matmuls by shape, so that a benchmark can time each shape
alone and add up what the step's matmuls cost at their own sizes.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from typing import Any, Callable, NamedTuple

import jax
from jax.extend import core as jcore


class DotSpec(NamedTuple):
    """One `dot_general` as the step runs it: operand shapes and dtypes, its dimension
    numbers and result type: enough to run the same matmul alone."""
    lhs_shape: tuple
    rhs_shape: tuple
    lhs_dtype: str
    rhs_dtype: str
    dimension_numbers: tuple
    preferred_element_type: Any

    @property
    def flops(self) -> int:
        (lc, rc), (lb, rb) = self.dimension_numbers
        lhs, rhs = self.lhs_shape, self.rhs_shape
        batch = math.prod(lhs[d] for d in lb)
        contract = math.prod(lhs[d] for d in lc)
        m = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
        n = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
        return 2 * batch * m * n * contract


def _spec(eqn) -> DotSpec:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
    return DotSpec(tuple(lhs.shape), tuple(rhs.shape), str(lhs.dtype), str(rhs.dtype),
                   ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))), eqn.params.get("preferred_element_type"))


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


def census_flops(census: Counter) -> float:
    """Matmul FLOPs of a `dot_census`: each matmul's FLOPs times how often it runs."""
    return sum(spec.flops * n for spec, n in census.items())


def _weighted_dots(jaxpr, cond: str) -> Counter:
    """DotSpec -> how many times one call runs it (a scan's body times its length; a
    cond's dearest branch once, or each branch 1/n times for "mean")."""
    out: Counter = Counter()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            out[_spec(eqn)] += 1
        elif name == "scan":
            for spec, w in _weighted_dots(eqn.params["jaxpr"].jaxpr, cond).items():
                out[spec] += eqn.params["length"] * w
        elif name == "cond":
            branches = [_weighted_dots(b.jaxpr, cond) for b in eqn.params["branches"]]
            if cond == "max":
                branches = [max(branches, key=census_flops)]
            for branch in branches:
                for spec, w in branch.items():
                    out[spec] += w / len(branches)
        elif name == "while":
            raise ValueError("while loops have no static trip count; FLOPs cannot be counted")
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    out.update(_weighted_dots(sub, cond))
    return out


def _check_cond(cond: str) -> None:
    if cond not in ("max", "mean"):
        raise ValueError(f"cond must be 'max' or 'mean', not {cond!r}")


def jaxpr_flops(jaxpr, cond: str = "max") -> float:
    """`cond`: how a cond/switch is charged: "max" (its most expensive branch, an upper
    bound) or "mean" (the mean over its branches: exact for a switch on a scan's step
    index that takes every branch equally often)."""
    _check_cond(cond)
    return census_flops(_weighted_dots(jaxpr, cond))


def dot_census(fn: Callable, *args, cond: str = "max", **kwargs) -> Counter:
    """The matmuls of one call of `fn(*args, **kwargs)` (traced, not run): DotSpec -> how
    many times it runs. Arguments as for `count_flops`."""
    _check_cond(cond)
    return _weighted_dots(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr, cond)


def count_flops(fn: Callable, *args, cond: str = "max", **kwargs) -> float:
    """Matmul FLOPs of one call of `fn(*args, **kwargs)` (traced, not run). Keyword
    arguments are bound as constants, so static configuration goes there. `cond`: see
    `jaxpr_flops`."""
    return census_flops(dot_census(fn, *args, cond=cond, **kwargs))
