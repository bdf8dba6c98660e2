"""Shared fixtures: a tiny random LLaMA-style model with a word-level tokenizer, saved as
a Hugging Face folder, and synthetic edit requests over its vocabulary."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The CLI switches JAX's persistent compilation cache on; tests never write to the
# user's cache folder (tests/test_compile_cache.py uses its own temporary one).
os.environ["EMSEDIT_JAX_COMPILE_CACHE"] = "off"
# The suite's programs are small and its time goes to XLA compiling them: without LLVM's
# optimisation passes they compile 30-50% faster (the whole suite: about 10 min 20 s
# against 12 min 50 s on 2 cores). Results are compared within one run, at one
# setting; EMSEDIT_TEST_XLA_OPT=1 keeps XLA's default optimisation.
if os.environ.get("EMSEDIT_TEST_XLA_OPT") != "1":
    os.environ["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                               + os.environ.get("XLA_FLAGS", "")).strip()

WORDS = [f"w{i}" for i in range(150)]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops each test module's compiled programs when it ends. Every XLA CPU executable
    keeps memory maps of its own until it is freed; the whole suite's would pass the
    kernel's per-process limit (vm.max_map_count, 65530 by default), where XLA's
    compiler aborts the process (measured: 18,000 maps after the first 20 tests)."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()


def run_on_host_devices(script, *args: str, n_devices: int = 4, timeout: int = 900):
    """Runs `python script args...` in a subprocess with `n_devices` host (CPU) devices,
    a number JAX fixes when it starts, and the suite's XLA flags. Fails the test with
    the script's stderr if it exits non-zero."""
    import subprocess
    import sys
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n_devices} --xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=env, check=False,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return proc


def make_word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[PAD]")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer LLaMA-style checkpoint folder with a word-level tokenizer."""
    torch = pytest.importorskip("torch")
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS) + 2, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=True,
                                   initializer_range=0.2)  # 0.02 leaves the MLPs almost no effect on the logits
    folder = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    make_word_tokenizer().save_pretrained(folder)
    return folder


def synthetic_requests(n: int, seed: int = 0, ragged: bool = False):
    """Edit requests over the tiny vocabulary: 'wA wB wC' -> 'wD', with a paraphrase
    'wB wA wC' and an unrelated locality prompt. `ragged`: prompts of 3-6 words and
    targets of 1-3 words instead."""
    from emsedit_jax.data import EditRequest
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        n_prompt, n_target = (int(rng.integers(3, 7)), int(rng.integers(1, 4))) if ragged else (3, 1)
        w = [WORDS[j] for j in rng.choice(len(WORDS), n_prompt + n_target + 3, replace=False)]
        prompt, target, (e, f, g) = w[:n_prompt], w[n_prompt:n_prompt + n_target], w[-3:]
        out.append(EditRequest(prompt=" ".join(prompt), target_new=" ".join(target),
                               rephrase=" ".join([prompt[1], prompt[0], *prompt[2:]]),
                               loc_prompt=f"{e} {f}", loc_answer=g,
                               target_true=" ".join(WORDS[(WORDS.index(t) + 1) % 150] for t in target),
                               case_id=i, source=f"synthetic#{i}"))
    return out


@pytest.fixture(scope="session")
def tiny_editor_dir(tiny_model_dir, tmp_path_factory):
    """An EMSEdit editor for the tiny model (one module, rank 8), meta-trained for one
    epoch of 4 batches through the Python API and saved as an editor folder."""
    import emsedit_jax as ej
    model = ej.load_model(tiny_model_dir)
    ecfg = ej.EditorConfig(modules=("model.layers.3.mlp.up_proj",), rank=8, n_blocks=1, lr_init=0.1)
    editor = ej.train_editor(model, synthetic_requests(16, seed=3), ej.TrainConfig(n_edits=4, num_seq=2, meta_lr=1e-3),
                      editor_config=ecfg)
    return editor.save(tmp_path_factory.mktemp("tiny_editor"))
