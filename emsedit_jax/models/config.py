"""Model configuration: one frozen dataclass for every supported family.

`ModelConfig.from_hf(dict)` reads a Hugging Face `config.json` as it is on the Hub.
Fields that do not change the forward computation (dropout probabilities, `use_cache`,
`output_past`, `task_specific_params`, `summary_*`, GPT-J's `rotary: true`, generation
and tokenizer hints, ...) are accepted. A field that would change the computation and
that this code does not implement is an error naming it, and so is a field it has never
heard of (`strict=False`, from Python, only warns about those). The config is
hashable, so jitted functions take it as a static argument.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

from ..errors import ConfigError, UserError  # noqa: F401  (ConfigError is re-exported)

# HF `model_type` -> the block layout implemented in this package.
FAMILIES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gpt2": "gpt2",
    "gptj": "gptj",
}

ACTIVATIONS = ("silu", "gelu_new", "gelu", "gelu_pytorch_tanh", "relu")


# Fields that never change the forward computation of a causal LM.
_HARMLESS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "_name_or_path",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "attention_dropout",
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj",
    "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
    "task_specific_params", "tokenizer_class", "model_type", "max_position_embeddings",
    "n_positions", "n_ctx", "pretraining_tp", "reorder_and_upcast_attn", "auto_map",
    "quantization_config_ignored", "tf_legacy_loss", "use_bfloat16", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
    "prefix", "finetuning_task", "pruned_heads", "torchscript", "decoder_start_token_id",
    "sep_token_id", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "typical_p", "diversity_penalty", "num_beam_groups",
    "encoder_no_repeat_ngram_size", "bad_word_ids", "gradient_checkpointing",
    "max_window_layers", "rope_scaling_ignored", "unk_token_id", "vocab_size",
    # dropout (inference and editing run without it), caching and output switches
    "output_past", "use_return_dict", "dropout", "hidden_dropout", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "classifier_dropout", "summary_proj_dropout", "mlp_dropout",
    "keys_to_ignore_at_inference", "transformers.js_config",
}

_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only LM. Shapes use these names in docstrings:
    B batch, S sequence, D hidden_size, F intermediate_size, V vocab_size,
    H num_heads, K num_kv_heads, Dh head_dim, L num_layers."""

    family: str                      # "llama" | "gpt2" | "gptj"
    model_type: str                  # the HF model_type it was read from
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    max_position_embeddings: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    rope_theta: float = 10000.0
    rope_type: str = "default"       # default | linear | llama3 (llama family)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rotary_dim: int | None = None    # gptj: rotary on the first rotary_dim dims
    sliding_window: int | None = None
    # Not from config.json: the dtype of the residual stream (the running sum of the
    # layers' outputs). None: the parameters' dtype, as in transformers. "float32" with
    # bfloat16 parameters keeps that sum in float32 while every matmul still runs in
    # bfloat16 (see hf_io.load_model's `residual`).
    residual_dtype: str | None = None

    @property
    def layer_prefix(self) -> str:
        """Hugging Face name prefix of the decoder layers."""
        return "model.layers" if self.family == "llama" else "transformer.h"

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_hf(cls, cfg: dict[str, Any], *, strict: bool = True, source: str = "config.json") -> "ModelConfig":
        cfg = dict(cfg)
        _check_types(cfg, source)
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; supported: "
                f"{', '.join(sorted(FAMILIES))}")
        family = FAMILIES[model_type]
        parse = {"llama": _parse_llama, "gpt2": _parse_gpt2, "gptj": _parse_gptj}[family]
        fields, used = parse(cfg, model_type, source)
        unknown = sorted(k for k in cfg if k not in used and k not in _HARMLESS)
        if unknown:
            msg = (f"{source}: unrecognised config field(s) {unknown} for model_type "
                   f"{model_type!r}: emsedit-jax does not know whether they change the "
                   "model; if they do not, delete them from config.json")
            if strict:
                raise ConfigError(msg)
            warnings.warn(msg, stacklevel=2)
        if fields["activation"] not in ACTIVATIONS:
            raise ConfigError(f"{source}: activation {fields['activation']!r} is not implemented "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        return cls(family=family, model_type=model_type, **fields)


def _need(cfg, key, source):
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{source}: required field {key!r} is missing")
    return cfg[key]


def _rope_fields(cfg: dict, source: str) -> dict:
    """Reads RoPE settings from either `rope_parameters` (transformers>=5) or the
    older `rope_theta` + `rope_scaling` pair."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not implemented "
                          f"(supported: {', '.join(_ROPE_TYPES)})")
    known = {"rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "rope_theta"}
    extra = sorted(set(merged) - known)
    if extra:
        raise ConfigError(f"{source}: rope setting(s) {extra} are not implemented")
    out = {"rope_theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(_need(merged, "factor", source + " rope"))
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(merged.get("low_freq_factor", 1.0))
        out["rope_high_freq_factor"] = float(merged.get("high_freq_factor", 4.0))
        out["rope_original_max_position"] = int(merged.get("original_max_position_embeddings", 8192))
    return out


def _parse_llama(cfg, model_type, source):
    used = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "hidden_act",
            "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling",
            "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window",
            "layer_types", "max_position_embeddings"}
    d = int(_need(cfg, "hidden_size", source))
    h = int(_need(cfg, "num_attention_heads", source))
    head_dim = cfg.get("head_dim") or d // h
    sliding = None
    if model_type == "mistral":
        sliding = cfg.get("sliding_window")
    elif model_type == "qwen2":
        if cfg.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 use_sliding_window=true (per-layer sliding "
                              "windows) is not implemented")
    elif cfg.get("sliding_window") is not None:
        raise ConfigError(f"{source}: sliding_window is not implemented for {model_type}")
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types) and sliding is None:
        raise ConfigError(f"{source}: layer_types {sorted(set(layer_types))} are not implemented")
    qkv_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    fields = dict(
        vocab_size=int(_need(cfg, "vocab_size", source)),
        hidden_size=d,
        intermediate_size=int(_need(cfg, "intermediate_size", source)),
        num_layers=int(_need(cfg, "num_hidden_layers", source)),
        num_heads=h,
        num_kv_heads=int(cfg.get("num_key_value_heads") or h),
        head_dim=int(head_dim),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        activation=cfg.get("hidden_act", "silu"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        qkv_bias=qkv_bias,
        # Llama's attention_bias also adds a bias to o_proj; Qwen2 has none there.
        o_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        **_rope_fields(cfg, source),
    )
    return fields, used


def _gpt_common(cfg, source):
    act = cfg.get("activation_function", "gelu_new")
    d = int(_need(cfg, "n_embd", source))
    h = int(_need(cfg, "n_head", source))
    return dict(
        vocab_size=int(_need(cfg, "vocab_size", source)),
        hidden_size=d,
        intermediate_size=int(cfg.get("n_inner") or 4 * d),
        num_layers=int(_need(cfg, "n_layer", source)),
        num_heads=h,
        num_kv_heads=h,
        head_dim=d // h,
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
        activation=act,
        max_position_embeddings=int(cfg.get("n_positions", 1024)),
    )


def _parse_gpt2(cfg, model_type, source):
    used = {"n_embd", "n_head", "n_inner", "n_layer", "activation_function",
            "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
            "tie_word_embeddings", "n_positions"}
    if not cfg.get("scale_attn_weights", True):
        raise ConfigError(f"{source}: scale_attn_weights=false is not implemented")
    if cfg.get("scale_attn_by_inverse_layer_idx", False):
        raise ConfigError(f"{source}: scale_attn_by_inverse_layer_idx=true is not implemented")
    if cfg.get("add_cross_attention", False):
        raise ConfigError(f"{source}: add_cross_attention=true is not implemented")
    if cfg.get("tie_word_embeddings") is False:
        raise ConfigError(f"{source}: untied GPT-2 heads are not implemented")
    fields = _gpt_common(cfg, source)
    fields.update(tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True)
    return fields, used


def _parse_gptj(cfg, model_type, source):
    used = {"n_embd", "n_head", "n_inner", "n_layer", "activation_function",
            "layer_norm_epsilon", "rotary_dim", "tie_word_embeddings", "n_positions",
            "rope_theta", "rotary", "scale_attn_weights"}
    # transformers' GPT-J always applies rotary embeddings and scales the attention
    # logits; these two fields only say so.
    if not cfg.get("rotary", True):
        raise ConfigError(f"{source}: rotary=false (GPT-J without rotary embeddings) is not implemented")
    if not cfg.get("scale_attn_weights", True):
        raise ConfigError(f"{source}: scale_attn_weights=false is not implemented")
    if cfg.get("tie_word_embeddings", False):
        raise ConfigError(f"{source}: tied GPT-J heads are not implemented")
    fields = _gpt_common(cfg, source)
    rotary = cfg.get("rotary_dim") or fields["head_dim"]
    fields.update(tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=True,
                  lm_head_bias=True, rotary_dim=int(rotary),
                  rope_theta=float(cfg.get("rope_theta", 10000.0)))
    if fields["rotary_dim"] % 2 or fields["rotary_dim"] > fields["head_dim"]:
        raise ConfigError(f"{source}: rotary_dim {rotary} must be even and <= head_dim")
    return fields, used


def rope_inv_freq(cfg: ModelConfig, dim: int):
    """Inverse frequencies (dim/2,) as Python floats, with Llama-3 / linear scaling."""
    inv = [1.0 / (cfg.rope_theta ** (2 * i / dim)) for i in range(dim // 2)]
    if cfg.rope_type == "linear":
        inv = [f / cfg.rope_factor for f in inv]
    elif cfg.rope_type == "llama3":
        low_wavelen = cfg.rope_original_max_position / cfg.rope_low_freq_factor
        high_wavelen = cfg.rope_original_max_position / cfg.rope_high_freq_factor
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen > low_wavelen:
                out.append(f / cfg.rope_factor)
            elif wavelen < high_wavelen:
                out.append(f)
            else:
                smooth = (cfg.rope_original_max_position / wavelen - cfg.rope_low_freq_factor) / (
                    cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
                out.append((1 - smooth) * f / cfg.rope_factor + smooth * f)
        inv = out
    return inv


# Numeric config.json fields and what they must be: sizes are whole numbers > 0, the
# others finite numbers (None: absent).
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_head", "n_inner", "n_layer",
          "n_positions", "rotary_dim", "sliding_window")
_NUMBERS = ("rms_norm_eps", "layer_norm_epsilon", "rope_theta")


def _check_types(cfg: dict, source: str) -> None:
    """A ConfigError naming the field for a size that is not a whole number > 0 or a
    number that is not finite (e.g. hidden_size: "thirty-two")."""
    for key in _SIZES:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"{source}: {key} must be a whole number > 0, got {v!r}")
    for key in _NUMBERS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ConfigError(f"{source}: {key} must be a finite number, got {v!r}")
