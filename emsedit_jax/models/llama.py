"""LLaMA-style decoder (Llama-3, Mistral, Qwen2, SmolLM2): RMSNorm, rotate-half RoPE
with optional Llama-3/linear scaling, grouped-query attention, SwiGLU MLP.

Module names inside a layer follow Hugging Face: `self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`; full names are `model.layers.<i>.<suffix>`.
"""

from __future__ import annotations

import math


from .config import ModelConfig, rope_inv_freq
from .layers import (Tap, TensorSpec, activation, attention, attention_bias, head_matmul, linear_specs,
                     norm_specs, rms_norm, rope_rotate_half, rope_tables)


def tensor_specs(cfg: ModelConfig) -> dict[tuple[str, ...], TensorSpec]:
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_heads * dh, cfg.num_kv_heads * dh
    specs = {("embed_tokens", "embedding"): TensorSpec("model.embed_tokens.weight", (cfg.vocab_size, d),
                                                                 role="embedding")}
    specs |= norm_specs("norm", d, bias=False, stacked=False, hf_name="model.norm")
    if not cfg.tie_word_embeddings:
        specs[("lm_head", "kernel")] = TensorSpec("lm_head.weight", (d, cfg.vocab_size), transpose=True,
                                                      role="lm_head")
    specs |= norm_specs("input_layernorm", d, bias=False, stacked=True)
    specs |= norm_specs("post_attention_layernorm", d, bias=False, stacked=True)
    for name, d_in, d_out, bias in [("q_proj", d, hq, cfg.qkv_bias), ("k_proj", d, hkv, cfg.qkv_bias),
                                    ("v_proj", d, hkv, cfg.qkv_bias), ("o_proj", hq, d, cfg.o_bias)]:
        specs |= linear_specs(f"self_attn.{name}", d_in, d_out, bias=bias, hf_transposed=True,
                              role=f"attn_{name[0]}")
    for name, d_in, d_out, role in [("gate_proj", d, f, "mlp_in"), ("up_proj", d, f, "mlp_in"),
                                    ("down_proj", f, d, "mlp_out")]:
        specs |= linear_specs(f"mlp.{name}", d_in, d_out, bias=cfg.mlp_bias, hf_transposed=True, role=role)
    return specs


def context(cfg: ModelConfig, attention_mask, positions):
    cos, sin = rope_tables(rope_inv_freq(cfg, cfg.head_dim), positions)
    return {"bias": attention_bias(attention_mask, cfg.sliding_window), "cos": cos, "sin": sin}


def embed(cfg: ModelConfig, params, input_ids, positions):
    return params["embed_tokens"]["embedding"][input_ids]


def block(cfg: ModelConfig, lp, h, ctx, tap: Tap):
    """One decoder layer. h (B, S, D) -> (B, S, D)."""
    b, s, _ = h.shape
    x = rms_norm(h, lp["input_layernorm"]["weight"], cfg.norm_eps)
    q = tap.dense("self_attn.q_proj", x).reshape(b, s, cfg.num_heads, cfg.head_dim)
    k = tap.dense("self_attn.k_proj", x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = tap.dense("self_attn.v_proj", x).reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    q = rope_rotate_half(q, ctx["cos"], ctx["sin"])
    k = rope_rotate_half(k, ctx["cos"], ctx["sin"])
    a = attention(q, k, v, ctx["bias"], 1.0 / math.sqrt(cfg.head_dim))
    h = h + tap.dense("self_attn.o_proj", a)
    x = rms_norm(h, lp["post_attention_layernorm"]["weight"], cfg.norm_eps)
    m = activation(cfg.activation, tap.dense("mlp.gate_proj", x)) * tap.dense("mlp.up_proj", x)
    return h + tap.dense("mlp.down_proj", m)


def head(cfg: ModelConfig, params, h):
    """Final norm and LM head; logits in float32. h (..., D) -> (..., V)."""
    x = rms_norm(h, params["norm"]["weight"], cfg.norm_eps)
    if cfg.tie_word_embeddings:
        w = params["embed_tokens"]["embedding"]
        return head_matmul("...d,vd->...v", x, w)
    return head_matmul("...d,dv->...v", x, params["lm_head"]["kernel"])
