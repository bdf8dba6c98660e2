"""A small Llama-style decoder written as Flax NNX modules (the test model of the Flax
adapter), and a factory that loads it with the weights of a Hugging Face Llama folder;
the same decoder in Flax Linen.

`factory()` is what `--model nnx_llama:factory` imports: it reads the folder named by
the EMSEDIT_NNX_LLAMA environment variable (tests set it to the tiny checkpoint)."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
from flax import linen, nnx

EDIT_PATHS = ("layers[2].mlp.up_proj", "layers[3].mlp.up_proj", "layers[3].self_attn.o_proj")


def rotate_half(x, positions, theta):
    """Llama rotary embedding: the two halves of the head dim are (re, im). x (B, S, N, Dh)."""
    dh = x.shape[-1]
    inv = 1.0 / theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh)
    ang = positions.astype(jnp.float32)[..., None] * inv                  # (B, S, Dh/2)
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[:, :, None, :]
    rot = jnp.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], axis=-1)
    return x * cos + rot * sin


class Attention(nnx.Module):
    def __init__(self, d, heads, kv_heads, theta, rngs):
        self.heads, self.kv_heads, self.head_dim, self.theta = heads, kv_heads, d // heads, theta
        self.q_proj = nnx.Linear(d, heads * self.head_dim, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(d, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(d, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(heads * self.head_dim, d, use_bias=False, rngs=rngs)

    def __call__(self, x, segments, positions):
        b, s, _ = x.shape
        q = rotate_half(self.q_proj(x).reshape(b, s, self.heads, self.head_dim), positions, self.theta)
        k = rotate_half(self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim), positions, self.theta)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim)
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
        scores = jnp.where((causal[None] & same)[:, None], scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.o_proj(out.reshape(b, s, -1))


class MLP(nnx.Module):
    def __init__(self, d, f, rngs):
        self.gate_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(f, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, d, f, heads, kv_heads, eps, theta, rngs):
        self.input_layernorm = nnx.RMSNorm(d, epsilon=eps, rngs=rngs)
        self.self_attn = Attention(d, heads, kv_heads, theta, rngs)
        self.post_attention_layernorm = nnx.RMSNorm(d, epsilon=eps, rngs=rngs)
        self.mlp = MLP(d, f, rngs)

    def __call__(self, h, segments, positions):
        h = h + self.self_attn(self.input_layernorm(h), segments, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama(nnx.Module):
    """Tied-embedding Llama. __call__(input_ids, segments, positions) -> logits (B, S, V):
    `segments` is 0 on padding and a segment id per packed sequence."""

    def __init__(self, vocab, d, f, n_layers, heads, kv_heads, eps=1e-6, theta=10000.0, *, rngs):
        self.embed_tokens = nnx.Embed(vocab, d, rngs=rngs)
        self.layers = nnx.List([Block(d, f, heads, kv_heads, eps, theta, rngs) for _ in range(n_layers)])
        self.norm = nnx.RMSNorm(d, epsilon=eps, rngs=rngs)

    def __call__(self, input_ids, segments, positions):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, segments, positions)
        return self.embed_tokens.attend(self.norm(h))


def from_project(model) -> Llama:
    """The NNX Llama holding the weights of a project `Model` (llama family, tied
    embeddings, list layout)."""
    c = model.config
    nnx_model = Llama(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
                      c.num_kv_heads, c.norm_eps, c.rope_theta, rngs=nnx.Rngs(0))
    p = model.params
    pure = {"embed_tokens": {"embedding": p["embed_tokens"]["embedding"]}, "norm": {"scale": p["norm"]["weight"]},
            "layers": {i: {"input_layernorm": {"scale": lp["input_layernorm"]["weight"]},
                           "post_attention_layernorm": {"scale": lp["post_attention_layernorm"]["weight"]},
                           "self_attn": lp["self_attn"], "mlp": lp["mlp"]}
                       for i, lp in enumerate(p["layers"])}}
    state = nnx.state(nnx_model, nnx.Param)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(nnx_model, state)
    return nnx_model


def factory():
    """The tiny checkpoint in $EMSEDIT_NNX_LLAMA as an editable NNX model."""
    from emsedit_jax.models import load_model
    from emsedit_jax.models.flax_nnx import from_nnx
    model = load_model(os.environ["EMSEDIT_NNX_LLAMA"])
    return from_nnx(from_project(model), model.tokenizer, EDIT_PATHS, name="nnx-llama")


# ---------------------------------------------------------------- the same model in Linen
class LinenAttention(linen.Module):
    heads: int
    kv_heads: int
    theta: float

    @linen.compact
    def __call__(self, x, segments, positions):
        b, s, d = x.shape
        dh = d // self.heads
        dense = functools.partial(linen.Dense, use_bias=False)
        q = rotate_half(dense(self.heads * dh, name="q_proj")(x).reshape(b, s, self.heads, dh), positions, self.theta)
        k = rotate_half(dense(self.kv_heads * dh, name="k_proj")(x).reshape(b, s, self.kv_heads, dh), positions,
                        self.theta)
        v = dense(self.kv_heads * dh, name="v_proj")(x).reshape(b, s, self.kv_heads, dh)
        rep = self.heads // self.kv_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
        causal = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)
        scores = jnp.where((causal[None] & same)[:, None], scores, jnp.finfo(scores.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return dense(d, name="o_proj")(out.reshape(b, s, -1))


class LinenBlock(linen.Module):
    f: int
    heads: int
    kv_heads: int
    eps: float
    theta: float

    @linen.compact
    def __call__(self, h, segments, positions):
        d = h.shape[-1]
        dense = functools.partial(linen.Dense, use_bias=False)
        x = linen.RMSNorm(epsilon=self.eps, name="input_layernorm")(h)
        h = h + LinenAttention(self.heads, self.kv_heads, self.theta, name="self_attn")(x, segments, positions)
        x = linen.RMSNorm(epsilon=self.eps, name="post_attention_layernorm")(h)
        m = jax.nn.silu(dense(self.f, name="gate_proj")(x)) * dense(self.f, name="up_proj")(x)
        return h + dense(d, name="down_proj")(m)


class LinenLlama(linen.Module):
    vocab: int
    d: int
    f: int
    n_layers: int
    heads: int
    kv_heads: int
    eps: float = 1e-6
    theta: float = 10000.0

    @linen.compact
    def __call__(self, input_ids, segments, positions):
        embed = linen.Embed(self.vocab, self.d, name="embed_tokens")
        h = embed(input_ids)
        for i in range(self.n_layers):
            h = LinenBlock(self.f, self.heads, self.kv_heads, self.eps, self.theta, name=f"layers_{i}")(
                h, segments, positions)
        return embed.attend(linen.RMSNorm(epsilon=self.eps, name="norm")(h))


def linen_from_project(model):
    """(LinenLlama, variables) holding the weights of a project `Model` (as from_project).
    Its MLP sits directly in the block: paths like 'layers_2.up_proj'."""
    c = model.config
    module = LinenLlama(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
                        c.num_kv_heads, c.norm_eps, c.rope_theta)
    p = model.params
    params = {"embed_tokens": {"embedding": p["embed_tokens"]["embedding"]}, "norm": {"scale": p["norm"]["weight"]}}
    for i, lp in enumerate(p["layers"]):
        params[f"layers_{i}"] = {"input_layernorm": {"scale": lp["input_layernorm"]["weight"]},
                                 "post_attention_layernorm": {"scale": lp["post_attention_layernorm"]["weight"]},
                                 "self_attn": lp["self_attn"], **lp["mlp"]}
    return module, {"params": params}
