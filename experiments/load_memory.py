"""Peak host memory while loading a checkpoint: whole tensors vs straight into shards.

Writes a synthetic LLaMA-shaped bfloat16 checkpoint (random weights, several files with an
index; about 170 MB), then loads it in a fresh process per mode, on 4 host devices:

- `whole`:  load_params onto the default device (every tensor whole), the old way;
- `whole+place`: the same, then `sharding.place_params` onto a 1x4 mesh;
- `shards`: load_params with the mesh's shardings (each device's slice read on its own).

For each it prints the process's peak resident memory (ru_maxrss) above the resident
memory just before loading, the resident memory after loading, the peak above the
model's own size, and the bytes on the fullest device. On CPU the devices' buffers are
host memory, so the loaded model itself is part of the peak; what the loading path adds
on top of it is the "peak - before - model" column.

    python experiments/load_memory.py [--out experiments/results/load_memory.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = {"model_type": "llama", "vocab_size": 16384, "hidden_size": 1024, "intermediate_size": 2816,
          "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
          "max_position_embeddings": 512, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
MODES = ("whole", "whole+place", "shards")


def write_checkpoint(folder: Path, shard_bytes: int = 48 << 20) -> dict:
    import ml_dtypes
    import numpy as np

    from emsedit_jax.models import ModelConfig, safetensors_io
    from emsedit_jax.models.hf_io import hf_shapes
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    shapes = hf_shapes(ModelConfig.from_hf(CONFIG))
    rng = np.random.default_rng(0)
    files, current, size = [], {}, 0

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        safetensors_io.write(folder / name, current)
        files.append((name, list(current)))

    for name, shape in shapes.items():
        arr = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
        if current and size + arr.nbytes > shard_bytes:
            flush()
            current, size = {}, 0
        current[name] = arr
        size += arr.nbytes
    flush()
    weight_map = {t: f for f, names in files for t in names}
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    largest = max(math.prod(s) * 2 for s in shapes.values())
    return {"files": len(files), "model_bytes": total, "largest_tensor_bytes": largest}


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def measure(folder: str, mode: str) -> dict:
    """Runs in the child process (4 host devices)."""
    import resource

    import jax
    import jax.numpy as jnp

    from emsedit_jax import sharding
    from emsedit_jax.models import abstract_params
    from emsedit_jax.models.hf_io import load_params, read_config

    cfg, _ = read_config(Path(folder))
    mesh = sharding.make_mesh(1, 4)
    shardings = sharding.param_shardings(cfg, abstract_params(cfg, jnp.bfloat16, stacked=False), mesh)
    jax.block_until_ready(jax.device_put(jnp.zeros((4, 4)), shardings["embed_tokens"]["embedding"]))  # start the runtime
    before = _rss()
    if mode == "shards":
        params = load_params(Path(folder), cfg, jnp.bfloat16, shardings=shardings)
    else:
        params = load_params(Path(folder), cfg, jnp.bfloat16)
        if mode == "whole+place":
            params = sharding.place(params, shardings)
    jax.block_until_ready(params)
    after = _rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_device: dict[int, int] = {}
    for x in jax.tree.leaves(params):
        for s in x.addressable_shards:
            per_device[s.device.id] = per_device.get(s.device.id, 0) + s.data.nbytes
    return {"mode": mode, "rss_before": before, "rss_after": after, "peak_above_before": peak - before,
            "after_above_before": after - before,
            "max_device_bytes": max(per_device.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        info = write_checkpoint(Path(tmp) / "ckpt")
        rows = []
        for mode in MODES:
            proc = subprocess.run([sys.executable, __file__, "--child", str(Path(tmp) / "ckpt"), mode], env=env,
                                  check=False, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{mode}: {proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mb = 1 / 2 ** 20
    print(f"checkpoint: {info['model_bytes'] * mb:.0f} MiB bfloat16 in {info['files']} files, "
          f"largest tensor {info['largest_tensor_bytes'] * mb:.0f} MiB; mesh 1x4 of host devices")
    print("| mode | peak - before (MiB) | after - before (MiB) | peak - before - model (MiB) | largest device (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_above_before'] * mb:.0f} | {r['after_above_before'] * mb:.0f} | "
              f"{(r['peak_above_before'] - info['model_bytes']) * mb:.0f} | {r['max_device_bytes'] * mb:.0f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"checkpoint": info, "config": CONFIG, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
