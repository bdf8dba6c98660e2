"""Backend-aware layouts: the defaults by backend, and that the GPU / TPU choices (stacked
LLM layers, one batched ridge solve, scanned hypernetwork blocks) give the numbers of
the CPU ones (list layout, looped solves, unrolled blocks) for an edit and a training step."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
import pytest

from emsedit_jax import backend
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.evaluate import edit_batch
from emsedit_jax.models import load_model
from emsedit_jax.models.transformer import is_layer_list, stack_layers
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import train_step

from conftest import synthetic_requests

# Two modules of one kernel shape (the solve is batched over them), two blocks (scanned).
MODULES = ("model.layers.2.mlp.up_proj", "model.layers.3.mlp.up_proj")


def test_defaults_by_backend():
    assert (backend.layer_layout("cpu"), backend.solve("cpu"), backend.hypernet("cpu")) == \
        ("list", "looped", "unrolled")
    for name in ("gpu", "cuda", "rocm", "tpu"):
        assert (backend.layer_layout(name), backend.solve(name), backend.hypernet(name)) == \
            ("stacked", "batched", "scanned")
    ecfg = EditorConfig(modules=MODULES)
    assert (ecfg.solve_mode(), ecfg.hypernet_mode()) == (backend.solve(), backend.hypernet())
    assert dataclasses.replace(ecfg, solve="batched").solve_mode() == "batched"
    with pytest.raises(ValueError, match="EditorConfig.solve: expected one of"):
        EditorConfig(modules=MODULES, solve="vmap")


def test_gpu_layouts_give_the_cpu_numbers(tiny_model_dir):
    model = load_model(tiny_model_dir, stacked=None)
    assert is_layer_list(model.params) == (jax.default_backend() == "cpu")
    split = encode_split(model.tokenizer, synthetic_requests(6, seed=3))
    rows = np.arange(6)
    layout = split.layout([rows])
    batch = split.batch(rows, layout)
    cpu = EditorConfig(modules=MODULES, rank=8, n_blocks=2, lr_init=0.1, key_memory=0.5, steps=2,
                       solve="looped", hypernet="unrolled")
    gpu = dataclasses.replace(cpu, solve="batched", hypernet="scanned")
    tx = optax.sgd(0.1)
    out = {}
    for name, ecfg, params in (("cpu", cpu, model.params), ("gpu", gpu, stack_layers(model.params))):
        state = init_editor(cpu, model.config, jax.random.key(0))
        deltas, new_state = edit_batch(state, params, batch.edit, zero_deltas(cpu, model.config), ecfg=ecfg,
                                       lcfg=model.config, n_answer=layout.edit.n_answer)
        nets, _, _, train_deltas, metrics, _ = train_step(
            state.nets, state.stats, tx.init(state.nets), params, batch, zero_deltas(cpu, model.config), None,
            new_state.key_gram, ecfg=ecfg, lcfg=model.config, tx=tx, n_answer=layout.n_answer)
        out[name] = jax.device_get((deltas, new_state.key_gram, train_deltas, metrics["loss"], nets))
    for a, b in zip(jax.tree.leaves(out["gpu"]), jax.tree.leaves(out["cpu"])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6 * max(1.0, float(np.abs(b).max())))
    assert float(np.abs(out["cpu"][0][MODULES[0]]).max()) > 0
