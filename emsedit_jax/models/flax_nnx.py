"""Flax NNX causal language models as editable models.

`from_nnx(module, tokenizer, edit_paths)` turns an `nnx.Module` into a `Model` that
every editor trains, edits and evaluates unchanged. The module is split once into its
graph definition and its parameters (`nnx.split`); `Model.params` is the parameters
as a plain nested dict (`nnx.to_pure_dict`) and `Model.config` an `NNXModel`, which
stands where a `ModelConfig` stands in the editor core (a static argument of every
jitted function). Each forward pass merges graph and parameters into a fresh module
(`nnx.merge`) inside the traced function, so the caller's module is never touched:

- weight deltas: the merged state is the parameters plus the deltas (W + dW on each
  edited kernel; for kernels narrower than float32 the delta is instead applied as a
  separate product x dW in its own precision, as the built-in families do);
- keys and value gradients: each edited linear module of the merged copy is replaced
  by an interceptor that records its input at the answer positions with `Module.sow`
  (collected by `nnx.capture`) and adds the editor's zero probe to its output there;
  the gradient with respect to that probe is the value gradient. (`Module.perturb`
  would give the same gradients, but with a zero array of the module's whole output,
  (B, S, d_out), per edited module, where the probe holds only the answer slots.)

Module paths name attributes and list items of the module tree: `layers[18].mlp.up_proj`
or `layers.18.mlp.up_proj` (the canonical spelling). An edited module must hold a 2-D
`kernel` Param of shape (d_in, d_out) and map (..., d_in) to (..., d_out) with it, as
`nnx.Linear` does, and be called once per forward pass.

The forward pass of the module is `apply(module, input_ids, attention_mask, positions)
-> logits (B, S, V)`; the default calls `module(input_ids, attention_mask, positions)`.
Batches are packed: `attention_mask` (B, S) is 0 on padding and a distinct positive
segment id per packed sequence (a query attends causally to keys of its own segment
only), and `positions` (B, S) restart at 0 in each segment. A model that reads the
mask as 0/1 would let packed sequences see each other. The forward pass must be
deterministic (no dropout); variables other than Params (caches, RNG state) are kept
as they were when `from_nnx` was called. Layers below the edited ones are recomputed in
every pass (the built-in families cache them), and `remat` has no effect here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import UserError
from .layers import Array, ModuleEdit, Params, is_low_precision

ApplyFn = Callable[[nnx.Module, Array, Array, Array], Array]
ModulePath = tuple[str | int, ...]


def default_apply(module: nnx.Module, input_ids: Array, attention_mask: Array, positions: Array) -> Array:
    return module(input_ids, attention_mask, positions)


def module_path(name: str) -> ModulePath:
    """'layers[18].mlp.up_proj' or 'layers.18.mlp.up_proj' -> ('layers', 18, 'mlp', 'up_proj')."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_]\w*(\[\d+\]|\.\w+)*", name):
        raise UserError(f"module path {name!r}: expected attribute names and list indices, "
                        "like 'layers[18].mlp.up_proj' or 'layers.18.mlp.up_proj'")
    parts = re.findall(r"\[(\d+)\]|\.?(\w+)", name)
    return tuple(int(i) if i else (int(a) if a.isdigit() else a) for i, a in parts)


def path_name(path: Sequence[str | int]) -> str:
    """The canonical spelling of a module path: 'layers.18.mlp.up_proj'."""
    return ".".join(str(p) for p in path)


def _child(node, key):
    return node[key] if isinstance(key, int) else getattr(node, key)


def _lookup(module: nnx.Module, path: ModulePath):
    node = module
    for key in path:
        try:
            node = _child(node, key)
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
    return node


def _get(tree: Mapping, path: tuple) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _replace(tree: Mapping, path: tuple, value) -> dict:
    """A copy of the nested dict `tree` with the leaf at `path` replaced."""
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def edited_output(name: str, shape: tuple[int, int], edit: ModuleEdit, delta_apart: bool, x: Array, y: Array
                  ) -> tuple[Array, Array | None]:
    """What an interceptor does around one call y = module(x) of an edited linear
    module: adds x dW when the delta is not in the kernel, adds the probe to the output
    at the answer positions, and returns (new output, key = x at those positions or None)."""
    d_in, d_out = shape
    if x.shape[-1] != d_in:
        raise UserError(f"module {name}: called on inputs of width {x.shape[-1]}, but its kernel "
                        f"is ({d_in}, {d_out}); an edited module must be a linear map of its last axis")
    chex.assert_shape(y, (*x.shape[:-1], d_out))
    if delta_apart and edit.delta is not None:
        y = y + jnp.einsum("...i,io->...o", x.astype(edit.delta.dtype), edit.delta).astype(y.dtype)
    if edit.positions is None:
        return y, None
    chex.assert_rank(x, 3)
    key = jnp.take_along_axis(x, edit.positions[..., None], axis=1)
    if edit.probe is not None:
        rows = jnp.arange(y.shape[0])[:, None]
        y = y.at[rows, edit.positions].add(edit.probe.astype(y.dtype))
    return y, key


class _Intercept(nnx.Module):
    """Stands in for one edited linear module of a merged copy: `edited_output` around
    the module's call, the key recorded with `sow` (collected by `nnx.capture`)."""

    def __init__(self, inner: nnx.Module, name: str, shape: tuple[int, int], edit: ModuleEdit, delta_apart: bool):
        self.inner = inner
        self.name = name
        self.shape = shape
        self.edit = nnx.data(edit)
        self.delta_apart = delta_apart

    def __call__(self, x, *args, **kwargs):
        y, key = edited_output(self.name, self.shape, self.edit, self.delta_apart, x, self.inner(x, *args, **kwargs))
        if key is not None:
            self.sow(nnx.Intermediate, "key", key)
        return y


@dataclasses.dataclass(frozen=True, eq=False)
class FlaxModel:
    """What the editor core needs of a Flax model, in place of a `ModelConfig`: the
    editable modules and their shapes, the parameter template, the forward function.
    Compared and hashed by identity, so jitted functions compile once per model.
    Subclasses (NNXModel here, flax_linen.LinenModel) add `run`."""
    template: Any                                # the Params' tree, ShapeDtypeStruct leaves
    shapes: Mapping[str, tuple[int, int]]        # every module with a 2-D kernel (canonical name) -> (d_in, d_out)
    kernel_dtypes: Mapping[str, Any]
    modules: tuple[str, ...]                     # the default modules to edit (the edit paths)
    apply: Callable
    name: str
    residual_dtype: None = None
    family = "flax"

    def architecture(self) -> dict:
        """A JSON description (for the editor's model check): the name, and every
        parameter's path, shape and dtype."""
        leaves = jax.tree_util.tree_flatten_with_path(self.template)[0]
        return {"family": self.family, "name": self.name,
                "params": sorted([jax.tree_util.keystr(p), list(x.shape), str(x.dtype)] for p, x in leaves)}

    # ------------------------------------------------------------ module names
    def canonical(self, name: str) -> str:
        """The canonical name of an editable module; a UserError naming the editable
        ones if `name` is not one of them."""
        canon = path_name(module_path(name))
        if canon not in self.shapes:
            some = ", ".join(list(self.shapes)[:6]) + (", ..." if len(self.shapes) > 6 else "")
            raise UserError(f"module {name!r} is not a linear module of the {self.name} model (no 2-D kernel "
                            f"there; its {len(self.shapes)} linear modules: {some})")
        return canon

    def parse_module(self, name: str) -> tuple[int, str]:
        """(0, canonical name): a Flax model is one unit, with no layer split."""
        return 0, self.canonical(name)

    def module_shape(self, name: str) -> tuple[int, int]:
        return self.shapes[self.canonical(name)]

    def _kernel_path(self, name: str) -> ModulePath:
        return (*module_path(self.canonical(name)), "kernel")

    # ------------------------------------------------------------ parameters
    def get_kernel(self, params: Params, name: str) -> Array:
        return _get(params, self._kernel_path(name))

    def apply_deltas(self, params: Params, deltas: Mapping[str, Array]) -> Params:
        """params with W + dW on each named module's kernel (a new dict; params untouched)."""
        for name, delta in deltas.items():
            path = self._kernel_path(name)
            kernel = _get(params, path)
            chex.assert_shape(delta, kernel.shape)
            params = _replace(params, path, kernel + delta.astype(kernel.dtype))
        return params

    def _split_edits(self, params: Params, edits: Mapping[str, ModuleEdit]):
        """(params with the deltas that go into kernels, {name: canonical}, names whose
        delta is applied apart: kernels narrower than float32)."""
        names = {name: self.canonical(name) for name in edits}
        apart = {n for n in edits if is_low_precision(self.kernel_dtypes[names[n]])}
        params = self.apply_deltas(params, {n: e.delta for n, e in edits.items()
                                            if e.delta is not None and n not in apart})
        return params, names, apart


def _finish(logits: Array, input_ids: Array, logit_positions: Array | None) -> Array:
    chex.assert_shape(logits, (*input_ids.shape, None))
    if logit_positions is not None:
        logits = jnp.take_along_axis(logits, logit_positions[..., None], axis=1)
    return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel(FlaxModel):
    """An NNX model: graph definition and non-Param state (`nnx.split`); `template`
    is an nnx.State of the Params. Build it with `from_nnx`."""
    graphdef: Any = None                         # nnx.GraphDef
    rest: Any = None                             # nnx.State of every other variable
    family = "nnx"

    def merge(self, params: Params) -> nnx.Module:
        """A fresh module holding `params` (works on traced arrays)."""
        state = jax.tree.map(lambda x: x, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.rest)

    # ------------------------------------------------------------ forward
    def run(self, params: Params, input_ids: Array, attention_mask: Array, positions: Array,
            edits: Mapping[str, ModuleEdit], logit_positions: Array | None = None
            ) -> tuple[Array, dict[str, Array]]:
        """Logits of params + edits (float32 or wider; at `logit_positions` (B, A) if
        given) and the keys {module: (B, A, d_in)} of the edits that have positions."""
        params, names, apart = self._split_edits(params, edits)
        module = self.merge(params)
        for n, edit in edits.items():
            if edit.positions is None and n not in apart:
                continue
            path = module_path(names[n])
            parent = _lookup(module, path[:-1])
            inner = _child(parent, path[-1])
            wrapper = _Intercept(inner, n, self.shapes[names[n]], edit, n in apart)
            if isinstance(path[-1], int):
                parent[path[-1]] = wrapper
            else:
                setattr(parent, path[-1], wrapper)
        logits, sown = nnx.capture(self.apply, nnx.Intermediate)(module, input_ids, attention_mask, positions)
        sown = nnx.to_pure_dict(sown)
        keys = {}
        for n, edit in edits.items():
            if edit.positions is None:
                continue
            path = module_path(names[n])
            found = _get(sown, path).get("key", ()) if _has(sown, path) else ()
            if len(found) != 1:
                raise UserError(f"module {n}: called {len(found)} times in one forward pass of the {self.name} "
                                "model; an edited module must be called exactly once")
            keys[n] = found[0]
        return _finish(logits, input_ids, logit_positions), keys


def linear_kernels(params: Params) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """({canonical name: (d_in, d_out)}, {name: dtype}) of every 2-D "kernel" leaf of a
    nested dict of parameters (arrays or ShapeDtypeStructs)."""
    shapes, dtypes = {}, {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        parts = [getattr(k, "key", getattr(k, "idx", None)) for k in keys]
        if parts and parts[-1] == "kernel" and len(leaf.shape) == 2:
            shapes[path_name(parts[:-1])] = tuple(leaf.shape)
            dtypes[path_name(parts[:-1])] = leaf.dtype
    return shapes, dtypes


def _has(tree, path) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError, IndexError):
        return False


def _kernel_of(module: nnx.Module, path: ModulePath, spelled: str):
    node = _lookup(module, path)
    if node is None:
        raise UserError(f"edit path {spelled!r}: the model ({type(module).__name__}) has no module there")
    kernel = getattr(node, "kernel", None)
    if not isinstance(node, nnx.Module) or not isinstance(kernel, nnx.Param) or kernel.ndim != 2:
        raise UserError(f"edit path {spelled!r}: {type(node).__name__} is not a linear module "
                        "(expected an nnx.Module with a 2-D `kernel` Param of shape (d_in, d_out), like nnx.Linear)")
    return kernel


def from_nnx(module: nnx.Module, tokenizer: Any, edit_paths: Sequence[str], *, apply: ApplyFn = default_apply,
             name: str | None = None):
    """A `Model` for the editors from a Flax NNX causal LM.

    module:     the nnx.Module (not modified; its Params are copied into Model.params).
    tokenizer:  a Hugging Face tokenizer (used to encode the edit requests).
    edit_paths: the linear modules to edit when none are named (the CLI's and the
                API's default modules), e.g. ['layers[18].mlp.up_proj']; any module
                with a 2-D kernel can be named instead (--modules, EditorConfig.modules).
    apply:      (module, input_ids, attention_mask, positions) -> logits (B, S, V); see
                the module docstring for the packed-batch conventions.
    """
    from .hf_io import Model
    if not isinstance(module, nnx.Module):
        raise UserError(f"from_nnx expects a flax.nnx.Module, got {type(module).__name__}")
    if isinstance(edit_paths, str) or not edit_paths:
        raise UserError("from_nnx: edit_paths must be a non-empty list of module paths, e.g. ['layers[18].mlp.up_proj']")
    for spelled in edit_paths:
        _kernel_of(module, module_path(spelled), spelled)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    pure = nnx.to_pure_dict(params)
    shapes, dtypes = linear_kernels(pure)
    label = name or type(module).__name__
    modules = tuple(path_name(module_path(p)) for p in edit_paths)
    cfg = NNXModel(template, shapes, dtypes, modules, apply, label, graphdef=graphdef, rest=rest)
    return Model(cfg, pure, tokenizer, Path(f"<nnx model {label}>"), {})

