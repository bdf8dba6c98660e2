"""The jitted edit and meta-training steps (`evaluate.edit_batch`, `train.train_step`)
on one device and, the same functions, with their inputs placed on meshes of 4 host
devices, on the tiny test model. tests/test_sharding.py runs it in a subprocess, because
the number of host devices is fixed when JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_check.py MODEL_DIR OUT.json

For each mesh it writes the largest relative difference of every result from the
single-device run, the shard shapes of LLM parameters, deltas, hypernetwork and batch
arrays, and how many times each step compiled for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

from emsedit_jax import sharding
from emsedit_jax.data import TeacherForced
from emsedit_jax.editor.capture import IGNORE
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.evaluate import edit_batch
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import VIEWS, EncodedSplit
from emsedit_jax.train import train_step

# One edited layer, two kernel shapes: up_proj (32, 64) is split on its output
# dimension, down_proj (64, 32) on its input dimension.
MODULES = ("model.layers.3.mlp.up_proj", "model.layers.3.mlp.down_proj")
# (data, model, strategy)
MESHES = [(4, 1, "fsdp"), (2, 2, "fsdp"), (1, 4, "fsdp"), (1, 4, "tp")]


def random_view(rng, n: int, vocab: int) -> TeacherForced:
    """n teacher-forced sequences: a 3-5 token prompt and a 1-2 token target."""
    p_len, t_len = rng.integers(3, 6, n), rng.integers(1, 3, n)
    s = int((p_len + t_len - 1).max())
    ids = np.zeros((n, s), np.int32)
    labels = np.full((n, s), IGNORE, np.int32)
    for i, (p, t) in enumerate(zip(p_len, t_len)):
        prompt, target = rng.integers(2, vocab, p), rng.integers(2, vocab, t)
        ids[i, :p + t - 1] = np.concatenate([prompt, target[:-1]])
        labels[i, p - 1:p + t - 1] = target
    mask = (labels != IGNORE) | (np.arange(s) < (p_len - 1)[:, None])
    return TeacherForced(ids, mask.astype(np.int32), labels, np.full_like(labels, IGNORE), 2, p_len - 1, t_len)


def rel_err(a, b) -> float:
    """Largest |a - b| over all leaves, relative to the largest |b| of that leaf."""
    errs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
                  / max(float(np.max(np.abs(np.asarray(y, np.float64)))), 1e-12))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]
    return max(errs)


def shard_shapes(x) -> list[list[int]]:
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


def main(model_dir: str, out: str) -> None:
    assert jax.device_count() >= 4, f"needs 4 devices, has {jax.devices()}"
    model = load_model(model_dir, tokenizer=False)
    lcfg = model.config
    rng = np.random.default_rng(0)
    split = EncodedSplit([None] * 16, {v: random_view(rng, 16, lcfg.vocab_size) for v in VIEWS})
    rows = [np.arange(0, 8), np.arange(8, 16)]
    layout = split.layout(rows, max_row_len=16)      # 3 rows per view: divisible by neither 2 nor 4
    data = [split.batch(r, layout) for r in rows]
    # No trust region: with lr_init 0.1 it would bind on every update, and the gradient of
    # a capped update (its component along dW cancelled) carries the summation-order noise
    # of the sharded reductions at ~1e-3; the cap itself is checked in test_editor. Two
    # steps (the paper's T) exercise the chained steps at two thirds of the default's compile time.
    ecfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=16, n_blocks=1, lr_init=0.1, max_update=0.0,
                        steps=2)
    # SGD keeps the comparison linear in the gradients; Adam would blow float noise in
    # (near-)zero gradient components up to +-lr.
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    key = jax.random.key(0)

    def run_train(mesh):
        """Two batches of one sequential stream; inputs placed, outputs fed back as they are."""
        state = init_editor(ecfg, lcfg, key)
        nets, stats, opt = sharding.place_editor((state.nets, state.stats, tx.init(state.nets)), mesh)
        deltas = sharding.place_deltas(lcfg, zero_deltas(ecfg, lcfg), mesh)
        metrics = []
        for batch in data:
            nets, stats, opt, deltas, m, _ = train_step(nets, stats, opt, params, sharding.place_batch(batch, mesh),
                                                        deltas, ecfg=ecfg, lcfg=lcfg, tx=tx, n_answer=layout.n_answer)
            metrics.append(m)
        return {"nets": nets, "stats": stats, "deltas": deltas, "metrics": metrics}

    def run_edit(mesh):
        """Sequential editing: the second batch edits the edited model."""
        state = sharding.place_editor(init_editor(ecfg, lcfg, key), mesh)
        deltas = sharding.place_deltas(lcfg, zero_deltas(ecfg, lcfg), mesh)
        for batch in data:
            deltas, state = edit_batch(state, params, sharding.place_batch(batch.edit, mesh), deltas, ecfg=ecfg,
                                       lcfg=lcfg, n_answer=layout.edit.n_answer)
        return {"deltas": deltas, "stats": state.stats, "nets": state.nets}

    params = sharding.place_params(lcfg, model.params, None)
    ref_train, ref_edit = run_train(None), run_edit(None)
    results = {"rows_per_view": layout.edit.n_rows, "meshes": {},
               "single_device_compilations": [train_step._cache_size(), edit_batch._cache_size()]}
    for d, m, strategy in MESHES:
        mesh = sharding.make_mesh(d, m, strategy=strategy)
        before = [train_step._cache_size(), edit_batch._cache_size()]
        with sharding.use_mesh(mesh):
            params = sharding.place_params(lcfg, model.params, mesh)
            train_out, edit_out = run_train(mesh), run_edit(mesh)
        after = [train_step._cache_size(), edit_batch._cache_size()]
        layer = params["layers"][3]            # the list layout (load_model's default); layer 3 is edited
        kernel = layer["mlp"]["up_proj"]["kernel"]
        results["meshes"][f"{d}x{m} {strategy}"] = {
            "data": d, "model": m,
            "train_err": {k: rel_err(train_out[k], ref_train[k]) for k in ref_train},
            "edit_err": {k: rel_err(edit_out[k], ref_edit[k]) for k in ("deltas", "stats")},
            "compilations": [a - b for a, b in zip(after, before)],
            "delta_specs": sorted({str(x.sharding.spec) for x in edit_out["deltas"].values()}
                                  | {str(x.sharding.spec) for x in train_out["deltas"].values()}),
            "kernel_spec": str(kernel.sharding.spec),
            "n_kernel_shards": len(kernel.addressable_shards),
            "shards": {
                "up_proj_kernel": shard_shapes(kernel),
                "down_proj_kernel": shard_shapes(layer["mlp"]["down_proj"]["kernel"]),
                "embedding": shard_shapes(params["embed_tokens"]["embedding"]),
                "norm": shard_shapes(layer["input_layernorm"]["weight"]),
                "q_proj_kernel": shard_shapes(layer["self_attn"]["q_proj"]["kernel"]),
                "o_proj_kernel": shard_shapes(layer["self_attn"]["o_proj"]["kernel"]),
                "up_proj_delta": shard_shapes(edit_out["deltas"][MODULES[0]]),
                "down_proj_delta": shard_shapes(train_out["deltas"][MODULES[1]]),
                "hypernet_A": shard_shapes(edit_out["nets"]["32x64"][0]["blocks"][0]["A"]),   # step 0's
                "batch_rows": shard_shapes(sharding.place_batch(data[0], mesh).edit.input_ids),
            },
        }
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
