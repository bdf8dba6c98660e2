"""Read a llama.cpp GGUF file and turn it into a Hugging Face checkpoint folder.

No torch is needed: tensors are dequantized with ``gguf.quants.dequantize`` into numpy,
written with the package's safetensors writer (``safetensors_io.write``), and the
tokenizer is rebuilt with the ``tokenizers`` library from the vocabulary and merges
stored in the GGUF metadata.

Public API
----------
``read_gguf(path) -> (hf_config, tensors, tokenizer_files)``
    Hugging Face Llama config (a plain dict), HF-named float32 numpy tensors in HF layout,
    and the tokenizer files (``tokenizer.json`` text, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` dicts).
``tokenizer_from_gguf(reader_or_path) -> tokenizers.Tokenizer``
``gguf_to_hf_folder(gguf_path, out_dir, dtype="float32") -> Path``
``unpermute_rotary(weight, n_head)``
    Undo llama.cpp's row permutation of ``attn_q`` / ``attn_k``.

Layout notes
------------
GGUF lists a tensor's dimensions fastest-first (``ne0, ne1, ...``), i.e. reversed relative
to numpy.  A GGUF linear weight with ``ne = [in, out]`` is therefore a numpy array of shape
``(out, in)``, which already is the ``torch.nn.Linear`` layout Hugging Face uses; the token
embedding ``ne = [hidden, vocab]`` is ``(vocab, hidden)``.  No transpose is needed.

llama.cpp's converter reorders the rows of the query/key projections of each head from the
"rotate-half" layout used by HF (first half of the head = x, second half = y of each rotary
pair) to an interleaved one (x0, y0, x1, y1, ...).  ``unpermute_rotary`` puts them back.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import UserError

__all__ = [
    "GGUFError",
    "SUPPORTED_ARCHITECTURES",
    "CONVERTER_FORMAT_VERSION",
    "SOURCE_MARKER",
    "open_gguf",
    "read_gguf_metadata",
    "read_gguf",
    "llama_config_from_metadata",
    "tokenizer_from_gguf",
    "tokenizer_files_from_gguf",
    "unpermute_rotary",
    "gguf_to_hf_folder",
    "source_marker",
]

#: Architectures ``read_gguf`` can convert.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama",)

#: Bumped whenever the output of ``gguf_to_hf_folder`` changes, so cached folders are redone.
CONVERTER_FORMAT_VERSION = 1

#: Name of the small JSON file recording which GGUF a folder was converted from.
SOURCE_MARKER = "emsedit_gguf_source.json"

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32",
           "float16": "float16", "f16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


class GGUFError(UserError):
    """A GGUF file cannot be read or converted; the message names the file."""


# --------------------------------------------------------------------------------------
# Opening and metadata
# --------------------------------------------------------------------------------------

def _reader_path(reader) -> str:
    data = getattr(reader, "data", None)
    name = getattr(data, "filename", None)
    return str(name) if name is not None else "<GGUF reader>"


def open_gguf(path: str | os.PathLike):
    """Open ``path`` with ``gguf.GGUFReader``; any failure becomes a ``GGUFError``."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: GGUF file not found")
    # The reader makes ~200k small numpy views for the vocabulary arrays; with a large heap
    # (torch/transformers imported) the cyclic GC scans slow this down noticeably.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises bare ValueError/IndexError/struct errors
        raise GGUFError(f"{path}: unreadable GGUF file, truncated or not GGUF "
                        f"({type(exc).__name__}: {exc})") from exc
    finally:
        if gc_was_enabled:
            gc.enable()
    # A truncated file can still parse when the cut falls on a tensor boundary; check that
    # every tensor's bytes lie inside the file.
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(
                f"{path}: unreadable GGUF file: tensor {t.name!r} needs bytes up to {end} "
                f"but the file has only {size} bytes (truncated?)")
    return reader


def _as_reader(reader_or_path):
    if isinstance(reader_or_path, (str, os.PathLike)):
        return open_gguf(reader_or_path), str(reader_or_path)
    return reader_or_path, _reader_path(reader_or_path)


def read_gguf_metadata(reader_or_path) -> dict[str, Any]:
    """All key/value fields of the file as Python values (``GGUF.*`` header fields excluded)."""
    reader, where = _as_reader(reader_or_path)
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as exc:
            raise GGUFError(f"{where}: cannot decode metadata field {key!r} ({exc})") from exc
    return meta


def _require(meta: Mapping[str, Any], key: str, where: str):
    if key not in meta:
        raise GGUFError(f"{where}: missing metadata field {key!r}")
    return meta[key]


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------

def _check_architecture(meta: Mapping[str, Any], where: str) -> str:
    arch = _require(meta, "general.architecture", where)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{where}: unsupported architecture {arch!r} (field 'general.architecture'); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def llama_config_from_metadata(meta: Mapping[str, Any], where: str = "<GGUF>",
                               *, has_output: bool = True, n_vocab: int | None = None) -> dict:
    """Hugging Face ``LlamaConfig`` dict for a GGUF whose architecture is ``llama``."""
    arch = _check_architecture(meta, where)
    p = f"{arch}."

    def get(key, default=None, required=True):
        if required and p + key not in meta:
            raise GGUFError(f"{where}: missing metadata field {p + key!r}")
        return meta.get(p + key, default)

    n_embd = int(get("embedding_length"))
    n_layer = int(get("block_count"))
    n_ff = int(get("feed_forward_length"))
    n_head = int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head, required=False))
    head_dim = int(get("attention.key_length", n_embd // n_head, required=False))
    if int(get("attention.value_length", head_dim, required=False)) != head_dim:
        raise GGUFError(f"{where}: attention.key_length != attention.value_length is not supported")
    rope_dim = int(get("rope.dimension_count", head_dim, required=False))
    if rope_dim != head_dim:
        raise GGUFError(f"{where}: partial rotary embeddings ({p}rope.dimension_count={rope_dim}, "
                        f"head_dim={head_dim}) are not supported")
    if int(get("expert_count", 0, required=False) or 0) > 0:
        raise GGUFError(f"{where}: mixture-of-experts llama files ({p}expert_count) are not supported")
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in (None, "none"):
        raise GGUFError(f"{where}: rope scaling {scaling!r} ({p}rope.scaling.type) is not supported")
    if n_head % n_head_kv:
        raise GGUFError(f"{where}: head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")

    rope_theta = float(get("rope.freq_base", 10000.0, required=False))
    rms_eps = float(get("attention.layer_norm_rms_epsilon"))
    # stored as float32 in the file: 1e-5 reads back as 9.9999997e-06; round to a clean decimal
    rms_eps = float(f"{np.float32(rms_eps):.7g}")
    rope_theta = float(f"{np.float32(rope_theta):.7g}")
    ctx = int(get("context_length", 2048, required=False))

    vocab = meta.get(p + "vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else n_vocab
    if vocab is None:
        raise GGUFError(f"{where}: cannot determine the vocabulary size")

    def tok_id(key):
        v = meta.get(f"tokenizer.ggml.{key}")
        return None if v is None else int(v)

    bos, eos, pad = tok_id("bos_token_id"), tok_id("eos_token_id"), tok_id("padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": n_embd,
        "intermediate_size": n_ff,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": rms_eps,
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": ctx,
        "vocab_size": int(vocab),
        "tie_word_embeddings": not has_output,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": "float32",
    }


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{int(m.group(1))}.{_BLOCK_NAMES[m.group(2)]}.weight"
    return None


def _expected_shapes(cfg: dict, has_output: bool) -> dict[str, tuple[int, ...]]:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if has_output:
        shapes["lm_head.weight"] = (v, d)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes.update({
            pre + "self_attn.q_proj.weight": (q, d),
            pre + "self_attn.k_proj.weight": (kv, d),
            pre + "self_attn.v_proj.weight": (kv, d),
            pre + "self_attn.o_proj.weight": (d, q),
            pre + "mlp.gate_proj.weight": (f, d),
            pre + "mlp.up_proj.weight": (f, d),
            pre + "mlp.down_proj.weight": (d, f),
            pre + "input_layernorm.weight": (d,),
            pre + "post_attention_layernorm.weight": (d,),
        })
    return shapes


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's rotary row permutation of a q/k projection.

    llama.cpp (``convert_hf_to_gguf.py``) stores, inside each head of ``head_dim`` rows,
    row ``2*i + j`` := HF row ``j*head_dim/2 + i`` (``j`` in {0, 1}, ``i < head_dim/2``),
    i.e. it interleaves the two rotate-half halves.  This returns the HF order.
    ``n_head`` is the number of heads of *this* projection (``num_key_value_heads`` for k).
    """
    rows = weight.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads of even size")
    head_dim = rows // n_head
    return (weight.reshape(n_head, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2)
            .reshape(weight.shape))


def _dequantize(t, where: str) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        arr = dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError as exc:
        raise GGUFError(f"{where}: tensor {t.name!r}: unsupported quantization "
                        f"{t.tensor_type.name} ({exc})") from exc
    except Exception as exc:
        raise GGUFError(f"{where}: tensor {t.name!r}: cannot dequantize ({exc})") from exc
    # GGUF dims are fastest-first; the numpy shape is the reverse.
    shape = tuple(int(s) for s in reversed(list(t.shape)))
    if arr.size != int(np.prod(shape)):
        raise GGUFError(f"{where}: tensor {t.name!r}: {arr.size} values for shape {shape}")
    return np.array(arr.reshape(shape), dtype=np.float32, copy=True)  # copy: detach from the mmap


def read_gguf(path: str | os.PathLike, *, with_tokenizer: bool = True,
              reader=None) -> tuple[dict, dict[str, np.ndarray], dict[str, Any]]:
    """Read a llama GGUF.

    Returns ``(hf_config, tensors, tokenizer_files)``: the HF ``LlamaConfig`` as a dict,
    ``{hf_name: float32 ndarray}`` in Hugging Face layout (q/k rows un-permuted), and
    ``{"tokenizer.json": str, "tokenizer_config.json": dict, "special_tokens_map.json": dict}``
    (empty when ``with_tokenizer`` is false).
    """
    where = str(path)
    reader = reader if reader is not None else open_gguf(path)
    meta = read_gguf_metadata(reader)
    _check_architecture(meta, where)

    by_name = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            raise GGUFError(f"{where}: unsupported tensor {t.name!r} for a llama model")
        by_name[hf] = t
    has_output = "lm_head.weight" in by_name
    emb = by_name.get("model.embed_tokens.weight")
    n_vocab = int(emb.shape[-1]) if emb is not None else None
    cfg = llama_config_from_metadata(meta, where, has_output=has_output, n_vocab=n_vocab)

    expected = _expected_shapes(cfg, has_output)
    missing = [n for n in expected if n not in by_name]
    if missing:
        inv = {v: k for k, v in _GLOBAL_NAMES.items()}
        def gguf_name(n):
            m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", n)
            if m:
                blk = {v: k for k, v in _BLOCK_NAMES.items()}[m.group(2)]
                return f"blk.{m.group(1)}.{blk}.weight"
            return inv[n]
        shown = ", ".join(repr(gguf_name(n)) for n in missing[:8])
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise GGUFError(f"{where}: missing tensors {shown}{more}")
    extra = [n for n in by_name if n not in expected]
    if extra:
        raise GGUFError(f"{where}: unexpected tensor {by_name[extra[0]].name!r} "
                        f"(block_count={cfg['num_hidden_layers']})")

    tensors: dict[str, np.ndarray] = {}
    for hf, t in by_name.items():
        shape = tuple(int(s) for s in reversed(list(t.shape)))
        if shape != expected[hf]:
            raise GGUFError(f"{where}: tensor {t.name!r} has shape {shape} (numpy order), "
                            f"expected {expected[hf]} from the metadata")
        arr = _dequantize(t, where)
        if hf.endswith("q_proj.weight"):
            arr = unpermute_rotary(arr, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            arr = unpermute_rotary(arr, cfg["num_key_value_heads"])
        tensors[hf] = arr

    tok_files = tokenizer_files_from_gguf(reader, meta=meta, where=where) if with_tokenizer else {}
    if with_tokenizer:
        tok_files["tokenizer_config.json"]["model_max_length"] = cfg["max_position_embeddings"]
    return cfg, tensors, tok_files


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

def _pre_tokenizer(pre: str, add_prefix_space: bool, where: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    if pre in ("smollm",):
        # llama.cpp's "smollm" pre-type: every digit on its own, then the GPT-2 split regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "gpt-2", "default"):
        return byte_level
    raise GGUFError(f"{where}: unsupported tokenizer pre-type {pre!r} (field 'tokenizer.ggml.pre'); "
                    "supported: smollm, gpt-2")


def tokenizer_from_gguf(reader_or_path, *, meta: Mapping[str, Any] | None = None):
    """Byte-level BPE ``tokenizers.Tokenizer`` built from the GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    reader, where = _as_reader(reader_or_path)
    if meta is None:
        meta = read_gguf_metadata(reader)
    kind = _require(meta, "tokenizer.ggml.model", where)
    if kind != "gpt2":
        raise GGUFError(f"{where}: unsupported tokenizer model {kind!r} (field 'tokenizer.ggml.model'); "
                        "supported: gpt2 (byte-level BPE)")
    tokens = list(_require(meta, "tokenizer.ggml.tokens", where))
    merges_raw = _require(meta, "tokenizer.ggml.merges", where)
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(f"{where}: 'tokenizer.ggml.token_type' has {len(types)} entries for "
                        f"{len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise GGUFError(f"{where}: duplicate token {tok!r} in 'tokenizer.ggml.tokens' (ids "
                            f"{vocab[tok]} and {i})")
        vocab[tok] = i
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{where}: malformed merge {m!r} in 'tokenizer.ggml.merges'")
        merges.append((parts[0], parts[1]))

    add_prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "gpt2")), add_prefix_space, where)
    tok.decoder = decoders.ByteLevel()

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[int(bos_id)]
        single, pair = f"{bos}:0 $A:0", f"{bos}:0 $A:0 {bos}:1 $B:1"
        if meta.get("tokenizer.ggml.add_eos_token", False) and eos_id is not None:
            eos = tokens[int(eos_id)]
            single, pair = f"{bos}:0 $A:0 {eos}:0", f"{bos}:0 $A:0 {eos}:0 {bos}:1 $B:1 {eos}:1"
        specials = {(bos, int(bos_id))}
        if eos_id is not None:
            specials.add((tokens[int(eos_id)], int(eos_id)))
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=sorted(specials))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if int(ty) == _TOKEN_TYPE_CONTROL]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if int(ty) == _TOKEN_TYPE_USER_DEFINED]
    if user:
        tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise GGUFError(f"{where}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} "
                        f"tokens, metadata lists {len(tokens)}")
    return tok


def tokenizer_files_from_gguf(reader_or_path, *, meta: Mapping[str, Any] | None = None,
                              where: str | None = None) -> dict[str, Any]:
    """``tokenizer.json`` (str), ``tokenizer_config.json`` and ``special_tokens_map.json`` (dicts)."""
    reader, where0 = _as_reader(reader_or_path)
    where = where or where0
    if meta is None:
        meta = read_gguf_metadata(reader)
    tok = tokenizer_from_gguf(reader, meta=meta)
    tokens = meta["tokenizer.ggml.tokens"]
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise GGUFError(f"{where}: 'tokenizer.ggml.{key}' = {i} is out of range")
        return tokens[int(i)]

    special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
               "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
    special = {k: v for k, v in special.items() if v is not None}
    named = set(special.values())
    extra = [t for t, ty in zip(tokens, types) if int(ty) == _TOKEN_TYPE_CONTROL and t not in named]

    added_decoder = {}
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if int(ty) in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED):
            added_decoder[str(i)] = {"content": t, "lstrip": False, "normalized": False,
                                     "rstrip": False, "single_word": False,
                                     "special": int(ty) == _TOKEN_TYPE_CONTROL}
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": bool(meta.get("tokenizer.ggml.add_space_prefix", False)),
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": extra,
    }
    if "tokenizer.chat_template" in meta:
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    special_map = {**special}
    if extra:
        special_map["additional_special_tokens"] = extra
    return {"tokenizer.json": tok.to_str(pretty=False),
            "tokenizer_config.json": tok_cfg,
            "special_tokens_map.json": special_map}


# --------------------------------------------------------------------------------------
# Folder writer
# --------------------------------------------------------------------------------------

def _cast(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "float16":
        return np.ascontiguousarray(arr.astype(np.float16))
    import ml_dtypes
    return np.ascontiguousarray(arr.astype(ml_dtypes.bfloat16))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def source_marker(gguf_path: str | os.PathLike, dtype: str = "float32") -> dict[str, Any]:
    """What ``gguf_to_hf_folder`` records about its input, for cache validation."""
    p = Path(gguf_path).resolve()
    st = p.stat()
    return {"converter": "emsedit_jax.models.gguf_io",
            "format_version": CONVERTER_FORMAT_VERSION,
            "source": str(p), "source_size": st.st_size, "source_mtime_ns": st.st_mtime_ns,
            "dtype": _DTYPES.get(dtype, dtype)}


def gguf_to_hf_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                      dtype: str = "float32", *, overwrite: bool = True) -> Path:
    """Convert a llama GGUF into a Hugging Face checkpoint folder and return its path.

    Everything is written into a temporary sibling folder that is renamed to ``out_dir`` at
    the end, so an interrupted conversion never leaves a half-written ``out_dir``.  An
    existing ``out_dir`` is replaced when ``overwrite`` is true (the default), otherwise
    ``FileExistsError`` is raised.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of float32/float16/bfloat16, got {dtype!r}")
    dtype = _DTYPES[dtype]
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists")

    cfg, tensors, tok_files = read_gguf(gguf_path)
    cfg["dtype"] = dtype
    gen_cfg = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}

    from .safetensors_io import write as write_safetensors

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", gen_cfg)
        names = sorted(tensors)
        write_safetensors(tmp / "model.safetensors", {n: _cast(tensors.pop(n), dtype) for n in names})
        (tmp / "tokenizer.json").write_text(tok_files["tokenizer.json"], encoding="utf-8")
        _write_json(tmp / "tokenizer_config.json", tok_files["tokenizer_config.json"])
        _write_json(tmp / "special_tokens_map.json", tok_files["special_tokens_map.json"])
        _write_json(tmp / SOURCE_MARKER, source_marker(gguf_path, dtype))
        # mkdtemp makes the folder 0700: use the usual modes
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)

        old = None
        if out_dir.exists() or out_dir.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        try:
            os.replace(tmp, out_dir)
        except BaseException:
            if old is not None and not out_dir.exists():
                os.replace(old / out_dir.name, out_dir)  # put the previous folder back
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
