"""GPT-2: learned positions, pre-LayerNorm, fused c_attn, gelu MLP, tied head.

Module names inside a layer: `attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`;
full names are `transformer.h.<i>.<suffix>`. HF stores these Conv1D kernels as
(d_in, d_out) already, so nothing is transposed.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from .config import ModelConfig
from .layers import (Tap, TensorSpec, activation, attention, attention_bias, head_matmul, layer_norm,
                     linear_specs, norm_specs)


def tensor_specs(cfg: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    specs = {("wte", "embedding"): TensorSpec("transformer.wte.weight", (cfg.vocab_size, d), role="embedding"),
             ("wpe", "embedding"): TensorSpec("transformer.wpe.weight", (cfg.max_position_embeddings, d),
                                              role="position_embedding")}
    specs |= norm_specs("ln_f", d, bias=True, stacked=False, hf_name="transformer.ln_f")
    specs |= norm_specs("ln_1", d, bias=True, stacked=True)
    specs |= norm_specs("ln_2", d, bias=True, stacked=True)
    specs |= linear_specs("attn.c_attn", d, 3 * d, bias=True, hf_transposed=False, role="attn_qkv")
    specs |= linear_specs("attn.c_proj", d, d, bias=True, hf_transposed=False, role="attn_o")
    specs |= linear_specs("mlp.c_fc", d, f, bias=True, hf_transposed=False, role="mlp_in")
    specs |= linear_specs("mlp.c_proj", f, d, bias=True, hf_transposed=False, role="mlp_out")
    return specs


def context(cfg: ModelConfig, attention_mask, positions):
    return {"bias": attention_bias(attention_mask)}


def embed(cfg: ModelConfig, params, input_ids, positions):
    return params["wte"]["embedding"][input_ids] + params["wpe"]["embedding"][positions]


def block(cfg: ModelConfig, lp, h, ctx, tap: Tap):
    b, s, d = h.shape
    x = layer_norm(h, lp["ln_1"]["weight"], lp["ln_1"]["bias"], cfg.norm_eps)
    q, k, v = jnp.split(tap.dense("attn.c_attn", x), 3, axis=-1)
    shape = (b, s, cfg.num_heads, cfg.head_dim)
    a = attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), ctx["bias"],
                  1.0 / math.sqrt(cfg.head_dim))
    h = h + tap.dense("attn.c_proj", a)
    x = layer_norm(h, lp["ln_2"]["weight"], lp["ln_2"]["bias"], cfg.norm_eps)
    return h + tap.dense("mlp.c_proj", activation(cfg.activation, tap.dense("mlp.c_fc", x)))


def head(cfg: ModelConfig, params, h):
    x = layer_norm(h, params["ln_f"]["weight"], params["ln_f"]["bias"], cfg.norm_eps)
    return head_matmul("...d,vd->...v", x, params["wte"]["embedding"])
