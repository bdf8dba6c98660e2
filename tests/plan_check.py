"""`plan`'s abstract compile against a real run, on a 2x2 mesh of 4 host devices.
tests/test_plan.py runs it in a subprocess (conftest.run_on_host_devices):

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/plan_check.py MODEL_DIR OUT.json

The plan of the tiny test model (from its config.json, nothing allocated) and the same
jitted steps run on the real model, read straight into its shards, with real arrays of
the plan's shapes placed on the same shardings: XLA's memory analysis of both
executables, the real run's outputs, and the shards of the real inputs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np

from emsedit_jax import plan as planning
from emsedit_jax import sharding
from emsedit_jax.models import load_model

MODULES = ("model.layers.3.mlp.up_proj",)
FIELDS = ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes")


def main(model_dir: str, out: str) -> None:
    assert jax.device_count() >= 4, f"needs 4 devices, has {jax.devices()}"
    mesh = sharding.make_mesh(2, 2)
    kw = {"mesh": mesh, "model_name": "tiny", "dtype": "float32", "n_edits": 6, "rank": 8, "modules": MODULES,
          "stacked": False}
    model = load_model(model_dir, tokenizer=False, mesh=mesh)
    plan = planning.make_plan(model.config, **kw)

    # The same inputs, real: zeros of the plan's shapes on the plan's shardings, the
    # model's real (sharded) parameters; batch rows of random tokens, every other one an answer.
    from emsedit_jax.editor.config import method_config
    from emsedit_jax.train import TrainConfig
    ecfg = method_config("emsedit", MODULES, step_specific=True, rank=8)
    inputs = planning.step_inputs(model.config, ecfg, TrainConfig(n_edits=6), mesh, dtype="float32", n_edits=6,
                                  stacked=False)
    rng = np.random.default_rng(0)

    def real(x, path=""):
        if x.dtype == np.int32:          # token ids, segment ids (1), labels, positions
            host = rng.integers(1, model.config.vocab_size, x.shape).astype(np.int32)
        else:
            host = np.zeros(x.shape, x.dtype)
        return jax.device_put(host, x.sharding)

    results = {"plan": plan.to_json(), "real": {}}
    fns = planning.step_functions()
    for step in ("edit", "train"):
        args, static = inputs[step]
        args = jax.tree.map(real, args)
        args = list(args)
        args[3 if step == "train" else 1] = model.params            # the real weights
        measured = planning.analyse(step, fns[step], args, static, 6)
        outputs = fns[step](*args, **static)
        results["real"][step] = {**{f: getattr(measured, f) for f in FIELDS},
                                 "finite": bool(all(np.isfinite(np.asarray(x)).all()
                                                    for x in jax.tree.leaves(outputs)))}
    kernel = model.params["layers"][3]["mlp"]["up_proj"]["kernel"]
    results["kernel_shards"] = sorted({tuple(s.data.shape) for s in kernel.addressable_shards})
    results["config"] = dataclasses.asdict(model.config)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
