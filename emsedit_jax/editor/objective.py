"""The meta-training objective of every method, as one pure function.

    edit batch --T-step edit (scan)--> deltas --> CE on the paraphrases
                                              + regulariser (norm or KL)
                                              [+ RLEdit: the weighted losses of the
                                                 stream's earlier batches]

`meta_loss` returns the loss and, as auxiliary output, the new deltas and normaliser
statistics, so a training step is `jax.value_and_grad(meta_loss, has_aux=True)` with
respect to the hypernetwork parameters only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

from ..models.config import ModelConfig
from ..models.layers import Array, Params
from .capture import Batch, first_layer, prefix_hidden
from .config import EditorConfig
from .losses import generalisation_loss, kl_locality, sq_norm
from .steps import Deltas, EditorState, multi_step_edit

if TYPE_CHECKING:
    from .memory import Memory


class EditBatch(NamedTuple):
    """The three teacher-forced views of one batch of edit requests."""
    edit: Batch      # prompt -> new target
    gen: Batch       # paraphrase -> new target
    loc: Batch       # unrelated prompt -> its own answer


class NAnswer(NamedTuple):
    """Static answer-slot counts of the three views."""
    edit: int
    gen: int
    loc: int


class LossAux(NamedTuple):
    deltas: Deltas           # params + deltas is the model after this batch
    stats: dict              # updated normaliser statistics
    gen_loss: Array
    reg_loss: Array
    step_norms: Array        # (T,) Frobenius norm of each step's update, summed over modules
    memory_loss: Array       # RLEdit: weighted losses of the earlier batches (0 without memory)
    key_gram: dict           # the key memory after this batch ({} without it)


def batch_terms(ecfg: EditorConfig, lcfg: ModelConfig, params: Params, gen: Batch, loc: Batch, deltas: Deltas,
                n_answer: NAnswer, start: int, remat: bool = False) -> tuple[Array, Array]:
    """The two per-batch terms at params + deltas: CE(y | x') on the paraphrase view and,
    for the KL regulariser, loc_coef * KL(p_W0 || p_W) on the locality view (0 for the
    norm regulariser or loc_coef == 0, and then the locality prompts are not run)."""
    gen_loss = generalisation_loss(lcfg, params, gen, deltas, n_answer=n_answer.gen,
                                   prefix=prefix_hidden(lcfg, params, gen, start, remat))
    if ecfg.regulariser != "kl" or ecfg.loc_coef == 0:
        return gen_loss, jnp.zeros((), gen_loss.dtype)
    kl = kl_locality(lcfg, params, loc, deltas, n_answer=n_answer.loc,
                     prefix=prefix_hidden(lcfg, params, loc, start, remat))
    return gen_loss, ecfg.loc_coef * kl


def memory_loss(ecfg: EditorConfig, lcfg: ModelConfig, params: Params, memory: Memory, deltas: Deltas,
                n_answer: NAnswer, start: int, remat: bool = False) -> Array:
    """RLEdit's memory backtracking: sum over the buffered earlier batches of the stream of
    weight * (paraphrase CE + locality term) at params + deltas (the current weights).
    All slots are evaluated together (`vmap`); an empty slot holds real token data and
    weighs 0, so it adds exactly nothing to the loss or its gradient. (Skipping empty
    slots with a `cond` inside a `lax.map` would save their compute, but JAX then keeps
    a copy of the loop-invariant parameters the branch reads, e.g. the embedding, as a
    per-slot residual for the backward pass.)"""
    def slot(gen, loc):
        return sum(batch_terms(ecfg, lcfg, params, gen, loc, deltas, n_answer, start, remat))

    losses = jax.vmap(slot)(memory.gen, memory.loc)
    return jnp.sum(memory.weights.astype(losses.dtype) * losses)


def meta_loss(nets, stats, ecfg: EditorConfig, lcfg: ModelConfig, params: Params,
              batch: EditBatch, deltas: Deltas, n_answer: NAnswer, *, beta_power: int = 1,
              only_step: int | None = None, memory: Memory | None = None,
              key_gram: dict | None = None, remat: bool = False, protect: dict | None = None
              ) -> tuple[Array, LossAux]:
    """Loss of editing `batch` onto params + deltas with hypernetworks `nets`.

    EMSEdit ("norm"): CE(y | x'; W_T) + beta**beta_power * sum ||W_T - W_0||^2, where
    W_T - W_0 is the cumulative drift (previous deltas included).
    Baselines ("kl"): CE(y | x'; W_T) + loc_coef * KL(p_W0 || p_WT on x_loc)
    + delta_coef * sum ||W_T - W_before||^2.
    `only_step=t` scores W_before + dW_t alone (the authors' batch schedule).
    `memory` (RLEdit) adds the weighted losses of the stream's earlier batches at W_T;
    the gradient reaches only this batch's update (earlier deltas are constants).
    `key_gram`: the key memory of the stream's earlier batches (EditorConfig.key_memory);
    `protect`: the null-space projections (EditorConfig.null_space; None or {}: none).
    """
    start = first_layer(lcfg, ecfg.modules)
    state = EditorState(nets, stats, key_gram or {}, protect or {})
    pre_edit = prefix_hidden(lcfg, params, batch.edit, start, remat)
    new, state, per_step = multi_step_edit(ecfg, lcfg, params, state, batch.edit, deltas,
                                           n_answer=n_answer.edit, prefix=pre_edit, remat=remat)
    if only_step is not None:
        new = {m: deltas[m] + per_step[m][only_step] for m in deltas}
    gen, loc = batch_terms(ecfg, lcfg, params, batch.gen, batch.loc, new, n_answer, start, remat)
    if ecfg.regulariser == "norm":
        reg = (ecfg.beta ** beta_power) * sq_norm(new)
    else:
        reg = loc + ecfg.delta_coef * sq_norm({m: new[m] - deltas[m] for m in new})
    mem = jnp.zeros_like(gen) if memory is None else memory_loss(ecfg, lcfg, params, memory, new, n_answer,
                                                                 start, remat)
    norms = sum(jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))) for d in per_step.values())
    return gen + reg + mem, LossAux(jax.lax.stop_gradient(new), state.stats, gen, reg, norms, mem, state.key_gram)
