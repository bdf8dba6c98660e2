"""The meta-training objective of every method, as one pure function.

    edit batch --T-step edit (scan)--> deltas --> CE on the paraphrases
                                              + regulariser (norm or KL)

`meta_loss` returns the loss and, as auxiliary output, the new deltas and normaliser
statistics, so a training step is `jax.value_and_grad(meta_loss, has_aux=True)` with
respect to the hypernetwork parameters only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..models.config import ModelConfig
from ..models.layers import Array, Params
from .capture import Batch, first_layer, prefix_hidden
from .config import EditorConfig
from .losses import generalisation_loss, kl_locality, sq_norm
from .steps import Deltas, EditorState, multi_step_edit


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


def meta_loss(nets, stats, ecfg: EditorConfig, lcfg: ModelConfig, params: Params,
              batch: EditBatch, deltas: Deltas, n_answer: NAnswer, *, beta_power: int = 1,
              only_step: int | None = None, remat: bool = False) -> tuple[Array, LossAux]:
    """Loss of editing `batch` onto params + deltas with hypernetworks `nets`.

    EMSEdit ("norm"): CE(y | x'; W_T) + beta**beta_power * sum ||W_T - W_0||^2, where
    W_T - W_0 is the cumulative drift (previous deltas included).
    Baselines ("kl"): CE(y | x'; W_T) + loc_coef * KL(p_W0 || p_WT on x_loc)
    + delta_coef * sum ||W_T - W_before||^2.
    `only_step=t` scores W_before + dW_t alone (the authors' batch schedule).
    """
    start = first_layer(lcfg, ecfg.modules)
    state = EditorState(nets, stats)
    pre_edit = prefix_hidden(lcfg, params, batch.edit, start, remat)
    new, state, per_step = multi_step_edit(ecfg, lcfg, params, state, batch.edit, deltas,
                                           n_answer=n_answer.edit, prefix=pre_edit, remat=remat)
    if only_step is not None:
        new = {m: deltas[m] + per_step[m][only_step] for m in deltas}
    pre_gen = prefix_hidden(lcfg, params, batch.gen, start, remat)
    gen = generalisation_loss(lcfg, params, batch.gen, new, n_answer=n_answer.gen, prefix=pre_gen)
    if ecfg.regulariser == "norm":
        reg = (ecfg.beta ** beta_power) * sq_norm(new)
    else:
        pre_loc = prefix_hidden(lcfg, params, batch.loc, start, remat)
        reg = ecfg.loc_coef * kl_locality(lcfg, params, batch.loc, new, n_answer=n_answer.loc, prefix=pre_loc)
        reg = reg + ecfg.delta_coef * sq_norm({m: new[m] - deltas[m] for m in new})
    norms = sum(jnp.sqrt(jnp.sum(jnp.square(d), axis=tuple(range(1, d.ndim)))) for d in per_step.values())
    return gen + reg, LossAux(jax.lax.stop_gradient(new), state.stats, gen, reg, norms)
