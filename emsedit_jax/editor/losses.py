"""Meta-training losses.

EMSEdit: L = CE(y | x'; W_T) + beta * sum_l ||W_l,T - W_l,0||^2   (no locality prompts).
Baselines: L = CE(y | x'; W') + loc_coef * KL(p_W0(.|x_loc) || p_W'(.|x_loc))
               + delta_coef * sum_l ||dW_l||^2, the KL over the locality answer slots.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from ..models.config import ModelConfig
from ..models.layers import Array, Params
from .capture import Batch, Prefix, edited_logits, token_nll


def sq_norm(deltas: Mapping[str, Array]) -> Array:
    return sum(jnp.sum(jnp.square(d)) for d in deltas.values())


def kl_locality(lcfg: ModelConfig, params: Params, batch: Batch, deltas: Mapping[str, Array], *,
                n_answer: int, prefix: Prefix | None = None) -> Array:
    """Mean over locality answer slots of KL(p_original || p_edited)."""
    base, _, mask = edited_logits(lcfg, params, batch, None, n_answer=n_answer, prefix=prefix)
    new, _, _ = edited_logits(lcfg, params, batch, deltas, n_answer=n_answer, prefix=prefix)
    logp0 = jax.nn.log_softmax(jax.lax.stop_gradient(base), axis=-1)
    logp1 = jax.nn.log_softmax(new, axis=-1)
    kl = jnp.sum(jnp.exp(logp0) * (logp0 - logp1), axis=-1)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1)


def generalisation_loss(lcfg: ModelConfig, params: Params, batch: Batch, deltas: Mapping[str, Array], *,
                        n_answer: int, prefix: Prefix | None = None) -> Array:
    return token_nll(*edited_logits(lcfg, params, batch, deltas, n_answer=n_answer, prefix=prefix))
