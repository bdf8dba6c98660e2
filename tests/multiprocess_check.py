"""One process, or one of several JAX processes on this machine (a 127.0.0.1
coordinator, CPU collectives over gloo), running on the tiny test model: a sequential
edit of two batches, a meta-training step, the evaluation's scoring, and an Orbax save /
restore of the editor. tests/test_multiprocess.py starts it:

    python tests/multiprocess_check.py MODEL_DIR OUT_DIR PROCESS_ID NUM_PROCESSES PORT

With NUM_PROCESSES = 1 it runs on one device without a mesh (the reference); otherwise
each process must see 2 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=2)
and the steps run on a (data 2, fsdp 2) mesh over all of them: batch rows split over the
4 devices of both processes, LLM parameters over the 2 of each. Every process writes
OUT_DIR/result_<PROCESS_ID>.json with the numbers, as every process sees them.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax


def main(model_dir: str, out_dir: str, process_id: int, n_processes: int, port: int) -> None:
    from emsedit_jax import sharding
    if n_processes > 1:
        sharding.maybe_initialize_distributed(True, coordinator_address=f"127.0.0.1:{port}",
                                              num_processes=n_processes, process_id=process_id,
                                              initialization_timeout=120)
    import numpy as np
    import optax
    from sharding_check import MODULES, random_view

    from emsedit_jax.checkpoint import load_editor, save_editor
    from emsedit_jax.editor.config import EditorConfig
    from emsedit_jax.editor.steps import EditorState, init_editor, zero_deltas
    from emsedit_jax.evaluate import edit_batch, score_requests
    from emsedit_jax.models import load_model
    from emsedit_jax.pipeline import VIEWS, EncodedSplit
    from emsedit_jax.train import train_step

    mesh = sharding.make_mesh(2, 2) if n_processes > 1 else None
    model = load_model(model_dir, tokenizer=False)
    lcfg = model.config
    rng = np.random.default_rng(0)
    split = EncodedSplit([None] * 16, {v: random_view(rng, 16, lcfg.vocab_size) for v in VIEWS})
    rows = [np.arange(0, 8), np.arange(8, 16)]
    layout = split.layout(rows, max_row_len=16)
    data = [split.batch(r, layout) for r in rows]
    ecfg = EditorConfig(key_memory=0.0, modules=MODULES, rank=16, n_blocks=1, lr_init=0.1, steps=2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    out = {"process_count": jax.process_count(), "device_count": jax.device_count(),
           "local_devices": jax.local_device_count()}
    with sharding.use_mesh(mesh):
        params = sharding.place_params(lcfg, model.params, mesh)
        model = dataclasses.replace(model, params=params)
        state = sharding.place_editor(init_editor(ecfg, lcfg, jax.random.key(0)), mesh)
        deltas = sharding.place_deltas(lcfg, zero_deltas(ecfg, lcfg), mesh)
        for batch in data:
            deltas, state = edit_batch(state, params, sharding.place_batch(batch.edit, mesh), deltas, ecfg=ecfg,
                                       lcfg=lcfg, n_answer=layout.edit.n_answer)
        out["edit_deltas"] = {k: v.tolist() for k, v in sharding.to_host(deltas).items()}
        out["edit_stats"] = [x.tolist() for x in jax.tree.leaves(sharding.to_host(state.stats))]

        nets, stats, opt = sharding.place_editor((state.nets, state.stats, tx.init(state.nets)), mesh)
        nets, stats, opt, new_deltas, metrics, _ = train_step(
            nets, stats, opt, params, sharding.place_batch(data[0], mesh), deltas, ecfg=ecfg, lcfg=lcfg, tx=tx,
            n_answer=layout.n_answer)
        out["train_metrics"] = {k: np.asarray(v).tolist() for k, v in sharding.to_host(metrics).items()}
        out["train_nets"] = [x.tolist() for x in jax.tree.leaves(sharding.to_host(nets))]
        out["train_deltas"] = {k: v.tolist() for k, v in sharding.to_host(new_deltas).items()}

        scores = score_requests(model, split, np.arange(16), deltas, "zsre", chunk=8, mesh=mesh)
        out["scores"] = {k: v.tolist() for k, v in scores.items()}

        trained = EditorState(nets, stats)
        folder = Path(out_dir) / "editor"
        save_editor(folder, ecfg, trained, {"note": "multiprocess check"})
        _, restored, _ = load_editor(folder, lcfg, mesh=mesh)
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), sharding.to_host((restored.nets, restored.stats)),
                            sharding.to_host((trained.nets, trained.stats)))
        out["restored_equal"] = all(jax.tree.leaves(same))
        out["restored_sharding"] = str(jax.tree.leaves(restored.nets)[0].sharding)
    (Path(out_dir) / f"result_{process_id}.json").write_text(json.dumps(out))
    if n_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:6]))
