"""Parity with transformers' PyTorch models on real weights and on packed rows.

* The embedded SmolLM2-135M-Instruct (``load_model("smollm2")``): logits on a right-padded
  batch of real prompts against ``LlamaForCausalLM`` loaded from the same folder, the
  greedy next token of every prompt, and a greedy continuation that names Paris.
* Packed rows (several sequences end to end in one row, segment ids 1, 2, 3 in the
  attention mask, positions restarting at 0, trailing padding with segment 0) on tiny
  random Llama and GPT-2 (learned positions) models: each segment's logits equal those of
  the sequence run alone, and ``edited_loss`` on the packed batch equals the loss of the
  same sequences as an ordinary right-padded batch.

Every test name contains "parity" (``pytest -k parity``).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"      # everything here is local; never reach the hub

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from emsedit_jax.editor.capture import IGNORE, Batch, edited_loss  # noqa: E402
from emsedit_jax.models import forward, greedy_generate, load_model, logits, module_shape  # noqa: E402
from emsedit_jax.models.embedded import EmbeddedModelError, embedded_gguf_path  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "Water is made of hydrogen and",
    "The author of Romeo and Juliet is",
    "The largest planet in the solar system is",
]


# ---------------------------------------------------------------- embedded SmolLM2
@pytest.fixture(scope="module")
def smollm2():
    try:
        embedded_gguf_path("smollm2")
    except EmbeddedModelError as e:
        pytest.skip(str(e))
    ours = load_model("smollm2")
    ref = transformers.LlamaForCausalLM.from_pretrained(ours.path, dtype=torch.float32).eval()
    return ours, ref


def right_padded(tok, prompts, pad_id):
    rows = [tok(p)["input_ids"] for p in prompts]
    s = max(map(len, rows))
    ids = np.full((len(rows), s), pad_id, np.int32)
    mask = np.zeros((len(rows), s), np.int32)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    return ids, mask


def test_parity_embedded_smollm2_logits_and_next_tokens(smollm2):
    ours, ref = smollm2
    ids, mask = right_padded(ours.tokenizer, PROMPTS, ours.tokenizer.pad_token_id)
    assert len(set(mask.sum(1))) > 1, "the prompts should have different lengths (padding is tested)"
    got = np.asarray(jax.jit(lambda p, i, m: logits(ours.config, p, i, m))(ours.params, ids, mask))
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    assert got.shape == want.shape == (*ids.shape, ours.config.vocab_size)
    real = mask.astype(bool)
    diff = np.abs(got[real] - want[real]).max()
    assert diff < 1e-3, f"max |logit difference| over real positions = {diff:.3g}"
    last = mask.sum(1) - 1
    rows = np.arange(len(PROMPTS))
    ours_next = got[rows, last].argmax(-1)
    ref_next = want[rows, last].argmax(-1)
    np.testing.assert_array_equal(ours_next, ref_next)


def test_parity_embedded_smollm2_greedy_paris(smollm2):
    ours, _ = smollm2
    tok = ours.tokenizer
    ids, mask = right_padded(tok, PROMPTS[:1], tok.pad_token_id)
    new = greedy_generate(ours.config, ours.params, ids, mask, max_new_tokens=6, pad_id=tok.pad_token_id)
    text = tok.decode(new[0], skip_special_tokens=True)
    assert "Paris" in text, f"greedy continuation of {PROMPTS[0]!r} was {text!r}"


def test_parity_embedded_smollm2_tokenizer_equals_autotokenizer(smollm2):
    """The embedded model's tokenizer, loaded as the generic fast tokenizer its
    tokenizer_config.json names (without AutoTokenizer's detour through the model
    config), is the one AutoTokenizer gives: same class, special tokens, ids with and
    without special tokens, and chat template rendering."""
    ours, _ = smollm2
    tok, ref = ours.tokenizer, transformers.AutoTokenizer.from_pretrained(ours.path)
    assert type(tok) is type(ref)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == (ref.bos_token, ref.eos_token, ref.unk_token)
    texts = PROMPTS + [" leading space", "émigré naïve 東京 123", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok(text, add_special_tokens=False)["input_ids"] == ref(text, add_special_tokens=False)["input_ids"]
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # ... and loading it reads no model code: PyTorch, installed here, is not imported.
    import subprocess
    import sys
    code = ("import sys; from emsedit_jax.models.hf_io import load_tokenizer; "
            f"load_tokenizer({str(ours.path)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


# ---------------------------------------------------------------- packed rows
VOCAB = 101
TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, intermediate_size=48,
                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
              "model.layers.1.mlp.up_proj"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=4,
                  activation_function="gelu_new"),
             "transformer.h.1.mlp.c_fc"),
}
LENGTHS = (7, 4, 9)     # three sequences packed in one row of PACKED_LEN
PACKED_LEN = 24         # 20 real tokens + 4 padding (segment 0)
N_ANSWER = 3            # the last 3 tokens of every sequence are answer positions


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny(request, tmp_path_factory):
    cfg_cls, model_cls, kwargs, module = TINY[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kwargs)).eval()
    with torch.no_grad():     # random biases and norms so that every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(f"packed_{request.param}")
    model.save_pretrained(folder)
    return request.param, model, load_model(folder, tokenizer=False), module


def sequences(seed=0):
    """Three (ids, labels) pairs of different lengths; labels -100 except the last N_ANSWER."""
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(0, VOCAB, size=n).astype(np.int32)
        labels = np.full(n, IGNORE, np.int32)
        labels[-N_ANSWER:] = rng.integers(0, VOCAB, size=N_ANSWER)
        out.append((ids, labels))
    return out


def packed_row(seqs):
    """One row (1, PACKED_LEN): ids, segment ids, positions, labels, and each segment's slice."""
    ids = np.zeros((1, PACKED_LEN), np.int32)
    seg = np.zeros((1, PACKED_LEN), np.int32)
    pos = np.zeros((1, PACKED_LEN), np.int32)
    labels = np.full((1, PACKED_LEN), IGNORE, np.int32)
    slices, start = [], 0
    for k, (x, y) in enumerate(seqs):
        sl = slice(start, start + len(x))
        ids[0, sl], seg[0, sl], pos[0, sl], labels[0, sl] = x, k + 1, np.arange(len(x)), y
        slices.append(sl)
        start += len(x)
    assert start < PACKED_LEN, "the packed row should end in padding"
    return ids, seg, pos, labels, slices


def padded_rows(seqs):
    s = max(len(x) for x, _ in seqs)
    ids = np.zeros((len(seqs), s), np.int32)
    mask = np.zeros((len(seqs), s), np.int32)
    labels = np.full((len(seqs), s), IGNORE, np.int32)
    for r, (x, y) in enumerate(seqs):
        ids[r, :len(x)], mask[r, :len(x)], labels[r, :len(x)] = x, 1, y
    return ids, mask, labels


def test_parity_packed_rows_logits(tiny):
    name, model, ours, _ = tiny
    seqs = sequences(seed=1)
    ids, seg, pos, _, slices = packed_row(seqs)
    run = jax.jit(lambda p, i, m, q: forward(ours.config, p, i, m, positions=q)[0])
    got = np.asarray(run(ours.params, ids, seg, pos))
    assert np.isfinite(got).all()      # padding rows (segment 0) see no key at all
    for (x, _), sl in zip(seqs, slices):
        with torch.no_grad():
            want = model(input_ids=torch.tensor(x[None], dtype=torch.long)).logits.numpy()[0]
        np.testing.assert_allclose(got[0, sl], want, atol=1e-4, rtol=0, err_msg=f"{name} segment {sl}")
    # The test has teeth: without the segment ids the later segments would attend to the
    # earlier ones; GPT-2's learned positions also need the restarted positions (RoPE is
    # shift-invariant, so for Llama default positions give the same logits).
    one_segment = np.asarray(run(ours.params, ids, (seg > 0).astype(np.int32), pos))
    assert np.abs(one_segment[0, slices[1]] - got[0, slices[1]]).max() > 1e-3
    if name == "gpt2":
        plain = np.asarray(logits(ours.config, ours.params, jnp.asarray(ids), jnp.asarray(seg)))
        assert np.abs(plain[0, slices[1]] - got[0, slices[1]]).max() > 1e-3


def test_parity_packed_rows_edited_loss(tiny):
    name, _, ours, module = tiny
    cfg = ours.config
    seqs = sequences(seed=2)
    ids, seg, pos, labels, _ = packed_row(seqs)
    packed = Batch(jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(labels), jnp.asarray(pos))
    p_ids, p_mask, p_labels = padded_rows(seqs)
    padded = Batch(jnp.asarray(p_ids), jnp.asarray(p_mask), jnp.asarray(p_labels))
    rng = np.random.default_rng(3)
    loss = jax.jit(lambda b, d, n: edited_loss(cfg, ours.params, b, d, n_answer=n), static_argnums=2)
    for deltas in (None, {module: jnp.asarray(0.05 * rng.standard_normal(module_shape(cfg, module)),
                                              jnp.float32)}):
        got = float(loss(packed, deltas, N_ANSWER * len(seqs)))
        want = float(loss(padded, deltas, N_ANSWER))
        assert abs(got - want) < 1e-5, (name, deltas is not None, got, want)
