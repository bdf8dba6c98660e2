"""GPT-J: one LayerNorm feeding attention and MLP in parallel, interleaved rotary
embeddings on the first `rotary_dim` dims of each head, untied head with bias.

Module names inside a layer: `attn.{q,k,v,out}_proj`, `mlp.fc_in`, `mlp.fc_out`;
full names are `transformer.h.<i>.<suffix>`.
"""

from __future__ import annotations

import math


from .config import ModelConfig
from .layers import (Tap, TensorSpec, activation, attention, attention_bias, head_matmul, layer_norm,
                     linear_specs, norm_specs, rope_interleaved, rope_tables)


def tensor_specs(cfg: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    d, f = cfg.hidden_size, cfg.intermediate_size
    specs = {("wte", "embedding"): TensorSpec("transformer.wte.weight", (cfg.vocab_size, d), role="embedding"),
             ("lm_head", "kernel"): TensorSpec("lm_head.weight", (d, cfg.vocab_size), transpose=True,
                                               role="lm_head"),
             ("lm_head", "bias"): TensorSpec("lm_head.bias", (cfg.vocab_size,), init="zeros", role="lm_head")}
    specs |= norm_specs("ln_f", d, bias=True, stacked=False, hf_name="transformer.ln_f")
    specs |= norm_specs("ln_1", d, bias=True, stacked=True)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        specs |= linear_specs(f"attn.{name}", d, d, bias=False, hf_transposed=True, role=f"attn_{name[0]}")
    specs |= linear_specs("mlp.fc_in", d, f, bias=True, hf_transposed=True, role="mlp_in")
    specs |= linear_specs("mlp.fc_out", f, d, bias=True, hf_transposed=True, role="mlp_out")
    return specs


def context(cfg: ModelConfig, attention_mask, positions):
    cos, sin = rope_tables([1.0 / (cfg.rope_theta ** (i / cfg.rotary_dim))
                            for i in range(0, cfg.rotary_dim, 2)], positions)
    return {"bias": attention_bias(attention_mask), "cos": cos, "sin": sin}


def embed(cfg: ModelConfig, params, input_ids, positions):
    return params["wte"]["embedding"][input_ids]


def block(cfg: ModelConfig, lp, h, ctx, tap: Tap):
    b, s, _ = h.shape
    x = layer_norm(h, lp["ln_1"]["weight"], lp["ln_1"]["bias"], cfg.norm_eps)
    shape = (b, s, cfg.num_heads, cfg.head_dim)
    q = rope_interleaved(tap.dense("attn.q_proj", x).reshape(shape), ctx["cos"], ctx["sin"], cfg.rotary_dim)
    k = rope_interleaved(tap.dense("attn.k_proj", x).reshape(shape), ctx["cos"], ctx["sin"], cfg.rotary_dim)
    v = tap.dense("attn.v_proj", x).reshape(shape)
    a = tap.dense("attn.out_proj", attention(q, k, v, ctx["bias"], 1.0 / math.sqrt(cfg.head_dim)))
    m = tap.dense("mlp.fc_out", activation(cfg.activation, tap.dense("mlp.fc_in", x)))
    return h + a + m


def head(cfg: ModelConfig, params, h):
    x = layer_norm(h, params["ln_f"]["weight"], params["ln_f"]["bias"], cfg.norm_eps)
    y = head_matmul("...d,dv->...v", x, params["lm_head"]["kernel"])
    return y + params["lm_head"]["bias"].astype(y.dtype)
