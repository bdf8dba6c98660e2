"""Parity with transformers' PyTorch models on tiny random configs of every family:
logits on right-padded batches, the gradient with respect to an edited kernel, and the
key / value-gradient capture against PyTorch forward and backward hooks."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from emsedit_jax.editor.capture import IGNORE, Batch, capture, edited_loss, first_layer, prefix_hidden  # noqa: E402
from emsedit_jax.models import load_model, logits, module_shape  # noqa: E402

TINY = dict(vocab_size=101, max_position_embeddings=64)
LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, **TINY)
GPT = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=3, n_head=4)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA, rms_norm_eps=1e-5),
              ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.down_proj"]),
    "llama3_rope_untied_bias": ("LlamaConfig", "LlamaForCausalLM",
                                dict(LLAMA, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                      "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16}),
                                ["model.layers.0.self_attn.o_proj", "model.layers.2.mlp.gate_proj"]),
    "smollm_like_tied": ("LlamaConfig", "LlamaForCausalLM",
                         dict(LLAMA, tie_word_embeddings=True, num_key_value_heads=1, head_dim=16),
                         ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]),
    "mistral_sliding": ("MistralConfig", "MistralForCausalLM", dict(LLAMA, sliding_window=4),
                        ["model.layers.1.mlp.up_proj"]),
    "qwen2_bias": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA, num_key_value_heads=4),
                   ["model.layers.1.self_attn.q_proj", "model.layers.2.mlp.down_proj"]),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(GPT, activation_function="gelu_new"),
             ["transformer.h.1.mlp.c_proj", "transformer.h.2.mlp.c_fc"]),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(GPT, rotary_dim=4),
             ["transformer.h.1.mlp.fc_out", "transformer.h.2.attn.v_proj"]),
}


def hf_module(model, name):
    return model.get_submodule(name)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    cfg_cls, model_cls, kwargs, modules = CASES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(**kwargs)
    model = getattr(transformers, model_cls)(config).eval()
    # Random biases and norms so that every parameter matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    ours = load_model(folder, tokenizer=False)
    return request.param, model, ours, modules


def padded_batch(seed=0, b=3, s=10):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 101, size=(b, s)).astype(np.int32)
    lengths = np.array([s, s - 3, s - 5])[:b]
    mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    labels = np.full((b, s), IGNORE, np.int32)
    for r, n in enumerate(lengths):   # the last 3 real positions are answer positions
        labels[r, n - 3:n] = rng.integers(0, 101, size=3)
    ids = np.where(mask > 0, ids, 0)
    return ids, mask, labels


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


def test_parity_logits_padded(pair):
    name, model, ours, _ = pair
    ids, mask, _ = padded_batch()
    ref = torch_logits(model, ids, mask)
    got = np.asarray(jax.jit(lambda p, i, m: logits(ours.config, p, i, m))(ours.params, ids, mask))
    real = mask.astype(bool)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got[real], ref[real], atol=1e-4, rtol=0, err_msg=name)


def test_parity_kernel_gradient(pair):
    name, model, ours, modules = pair
    ids, mask, labels = padded_batch(seed=1)
    model.zero_grad()
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    loss_t = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                               torch.tensor(labels, dtype=torch.long).reshape(-1),
                                               ignore_index=IGNORE)
    loss_t.backward()
    cfg = ours.config
    batch = Batch(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))
    zeros = {m: jnp.zeros(module_shape(cfg, m)) for m in modules}
    loss, grads = jax.value_and_grad(lambda d: edited_loss(cfg, ours.params, batch, d, n_answer=4))(zeros)
    assert abs(float(loss) - loss_t.item()) < 1e-5
    for m in modules:
        w = hf_module(model, m).weight
        ref = w.grad.numpy()
        ref = ref if cfg.family == "gpt2" else ref.T        # ours is (d_in, d_out)
        got = np.asarray(grads[m])
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < 1e-4, (name, m, rel)


def test_parity_capture_against_hooks(pair):
    name, model, ours, modules = pair
    ids, mask, labels = padded_batch(seed=2)
    inputs, outputs = {}, {}
    handles = []
    for m in modules:
        mod = hf_module(model, m)

        def fwd_hook(module, args, output, m=m):
            inputs[m] = args[0].detach().numpy().copy()
            output.retain_grad()
            outputs[m] = output
        handles.append(mod.register_forward_hook(fwd_hook))
    out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    loss_t = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                               torch.tensor(labels, dtype=torch.long).reshape(-1),
                                               ignore_index=IGNORE)
    loss_t.backward()
    for h in handles:
        h.remove()

    cfg = ours.config
    batch = Batch(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels))
    cap = jax.jit(lambda p, b: capture(cfg, p, b, modules, n_answer=4))(ours.params, batch)
    # Same capture from a cached prefix hidden state.
    hid = prefix_hidden(cfg, ours.params, batch, first_layer(cfg, modules))
    cap2 = capture(cfg, ours.params, batch, modules, n_answer=4, prefix=hid)
    assert abs(float(cap.loss) - loss_t.item()) < 1e-5
    rows, cols = np.nonzero(labels != IGNORE)
    m_np = np.asarray(cap.mask)
    assert m_np.sum() == len(rows)
    for m in modules:
        ref_keys = inputs[m][rows, cols]
        ref_grads = outputs[m].grad.numpy()[rows, cols]
        for c in (cap, cap2):
            np.testing.assert_allclose(np.asarray(c.keys[m])[m_np], ref_keys, atol=1e-5, err_msg=m)
            got = np.asarray(c.grads[m])[m_np]
            assert np.linalg.norm(got - ref_grads) / np.linalg.norm(ref_grads) < 1e-4, (name, m)
