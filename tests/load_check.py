"""Loading a checkpoint straight into its shards, on meshes of 4 host devices.
tests/test_load_shards.py runs it in a subprocess (conftest.run_on_host_devices), because
the number of host devices is fixed when JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/load_check.py MODEL_DIR WORK_DIR OUT.json

The tiny test model is saved as a bfloat16 checkpoint sharded over several files with an
index, then loaded in both layer layouts on meshes 1x4 and 2x2, and once without
shardings. For each it writes every array whose sharding, shard shapes or shard values
differ from the unsharded load (expected: none), how many arrays are split, the bytes
on each device, and, from a record of every read, the largest fraction of a split
tensor that one read returned.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from emsedit_jax import sharding
from emsedit_jax.models import abstract_params, hf_io, load_model, safetensors_io, save_hf

MIN_SIZE = 256          # small enough that the tiny model's kernels and embedding are split
MESHES = [(1, 4), (2, 2)]


def bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


def main(model_dir: str, work: str, out: str) -> None:
    assert jax.device_count() >= 4, f"needs 4 devices, has {jax.devices()}"
    model = load_model(model_dir, tokenizer=False)
    cfg = model.config
    ckpt = save_hf(model, Path(work) / "bf16", dtype=ml_dtypes.bfloat16, max_shard_bytes=20_000)
    full_size = {k: math.prod(s) for k, s in hf_io.hf_shapes(cfg).items()}

    reads: list[tuple[str, int]] = []
    original = safetensors_io.read

    def recording(path, name, index=None):
        arr = original(path, name, index)
        reads.append((name, arr.size))
        return arr

    safetensors_io.read = recording
    results = {"n_files": len(list(ckpt.glob("*.safetensors"))),
               "has_index": (ckpt / "model.safetensors.index.json").is_file(), "runs": {}}
    for stacked in (False, True):
        ref = hf_io.load_params(ckpt, cfg, jnp.bfloat16, stacked=stacked)
        ref_leaves = jax.tree.leaves_with_path(ref)
        for d, m in MESHES:
            mesh = sharding.make_mesh(d, m)
            want = sharding.param_shardings(cfg, abstract_params(cfg, jnp.bfloat16, stacked=stacked), mesh,
                                            min_size=MIN_SIZE)
            reads.clear()
            got = hf_io.load_params(ckpt, cfg, jnp.bfloat16, stacked=stacked, shardings=want)
            mismatches, n_split = [], 0
            device_bytes = {dev.id: 0 for dev in mesh.devices.flat}
            for (path, r), g, w in zip(ref_leaves, jax.tree.leaves(got), jax.tree.leaves(want)):
                name = jax.tree_util.keystr(path)
                if g.dtype != jnp.bfloat16 or not g.sharding.is_equivalent_to(w, g.ndim):
                    mismatches.append(f"{name}: sharding {g.sharding} dtype {g.dtype}")
                shard_shape = w.shard_shape(r.shape)
                n_split += shard_shape != r.shape
                for s in g.addressable_shards:
                    device_bytes[s.device.id] += s.data.nbytes
                    if s.data.shape != shard_shape or not np.array_equal(bits(s.data), bits(r)[s.index]):
                        mismatches.append(f"{name}: shard on device {s.device.id} ({s.data.shape})")
                if not np.array_equal(bits(g), bits(r)):
                    mismatches.append(f"{name}: values")
            split_names = {n for n, size in reads if size < full_size[n]}
            results["runs"][f"{'stacked' if stacked else 'list'} {d}x{m}"] = {
                "mismatches": mismatches, "n_arrays": len(ref_leaves), "n_split": n_split,
                "device_bytes": sorted(device_bytes.values()),
                "total_bytes": sum(x.nbytes for x in jax.tree.leaves(ref)),
                "largest_read_of_split": max(size / full_size[n] for n, size in reads if n in split_names),
                "n_tensors_read_in_slices": len(split_names),
            }
    # The public entry point: load_model(mesh=) with the default partition rule.
    mesh = sharding.make_mesh(1, 4)
    placed = load_model(ckpt, dtype=jnp.bfloat16, tokenizer=False, mesh=mesh)
    ref = hf_io.load_params(ckpt, cfg, jnp.bfloat16)
    results["load_model_mesh_equal"] = all(
        np.array_equal(bits(a), bits(b)) and a.sharding.mesh.shape == mesh.shape
        for a, b in zip(jax.tree.leaves(placed.params), jax.tree.leaves(ref)))
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:4])
