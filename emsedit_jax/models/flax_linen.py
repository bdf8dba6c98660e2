"""Flax Linen causal language models as editable models.

`from_linen(module, variables, tokenizer, edit_paths)` is the Linen counterpart of
`flax_nnx.from_nnx`, with the same conventions (packed batches, canonical module paths,
deltas in the kernels or apart for narrow kernels; see flax_nnx). `Model.params` is the
"params" collection; the other collections are kept as given. Each forward pass is
`module.apply` on params + deltas inside `nn.intercept_methods`, whose interceptor, on
the `__call__` of each edited module (matched by its path, e.g. ('layers_2', 'mlp',
'up_proj')), records the input at the answer positions and adds the editor's probe to
the output there. Paths are spelled with Linen's names: 'layers_2.mlp.up_proj'. Layers
under `nn.scan` (kernels stacked on a layer axis) are not editable here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
from flax.core import unfreeze

from ..errors import UserError
from .flax_nnx import FlaxModel, _finish, edited_output, linear_kernels, module_path, path_name
from .layers import Array, ModuleEdit, Params

LinenApplyFn = Callable[[nn.Module, Mapping, Array, Array, Array], Array]


def default_linen_apply(module: nn.Module, variables: Mapping, input_ids: Array, attention_mask: Array,
                        positions: Array) -> Array:
    return module.apply(variables, input_ids, attention_mask, positions)


@dataclasses.dataclass(frozen=True, eq=False)
class LinenModel(FlaxModel):
    """A Linen model: the module and its non-params collections. Build it with `from_linen`."""
    module: Any = None                           # nn.Module (unbound)
    rest: Any = None                             # {collection: tree} other than "params"
    family = "linen"

    def run(self, params: Params, input_ids: Array, attention_mask: Array, positions: Array,
            edits: Mapping[str, ModuleEdit], logit_positions: Array | None = None
            ) -> tuple[Array, dict[str, Array]]:
        """As NNXModel.run: logits of params + edits and the keys of the edits with positions."""
        params, names, apart = self._split_edits(params, edits)
        hooked = {module_path(names[n]): n for n, e in edits.items() if e.positions is not None or n in apart}
        keys: dict[str, list[Array]] = {n: [] for n, e in edits.items() if e.positions is not None}

        def intercept(next_fun, args, kwargs, context):
            n = hooked.get(tuple(context.module.path)) if context.method_name == "__call__" else None
            if n is None:
                return next_fun(*args, **kwargs)
            y, key = edited_output(n, self.shapes[names[n]], edits[n], n in apart, args[0], next_fun(*args, **kwargs))
            if key is not None:
                keys[n].append(key)
            return y

        with nn.intercept_methods(intercept):
            logits = self.apply(self.module, {**self.rest, "params": params}, input_ids, attention_mask, positions)
        for n, found in keys.items():
            if len(found) != 1:
                raise UserError(f"module {n}: called {len(found)} times in one forward pass of the {self.name} "
                                "model; an edited module must be called exactly once")
        return _finish(logits, input_ids, logit_positions), {n: found[0] for n, found in keys.items()}


def from_linen(module: nn.Module, variables: Mapping, tokenizer: Any, edit_paths: Sequence[str], *,
               apply: LinenApplyFn = default_linen_apply, name: str | None = None):
    """A `Model` for the editors from a Flax Linen causal LM.

    module:     the nn.Module (unbound); variables: its variables ({"params": ...}).
    tokenizer:  a Hugging Face tokenizer.
    edit_paths: the default modules to edit, e.g. ['layers_18.mlp.up_proj'] (any
                module with a 2-D "kernel" (d_in, d_out), as nn.Dense holds, can be named).
    apply:      (module, variables, input_ids, attention_mask, positions) -> logits (B, S, V).
    """
    from .hf_io import Model
    if not isinstance(module, nn.Module) or "params" not in variables:
        raise UserError("from_linen expects a flax.linen Module and its variables with a 'params' collection")
    if isinstance(edit_paths, str) or not edit_paths:
        raise UserError("from_linen: edit_paths must be a non-empty list of module paths, e.g. ['layers_18.mlp.up_proj']")
    params = unfreeze(variables["params"])
    shapes, dtypes = linear_kernels(params)
    for spelled in edit_paths:
        path = module_path(spelled)
        if path_name(path) not in shapes:
            raise UserError(f"edit path {spelled!r}: the model ({type(module).__name__}) has no 2-D parameter "
                            f"{path_name(path)}.kernel (expected (d_in, d_out) as nn.Dense holds)")
    template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    rest = {k: v for k, v in variables.items() if k != "params"}
    label = name or type(module).__name__
    modules = tuple(path_name(module_path(p)) for p in edit_paths)
    cfg = LinenModel(template, shapes, dtypes, modules, apply, label, module=module, rest=rest)
    return Model(cfg, params, tokenizer, Path(f"<linen model {label}>"), {})
