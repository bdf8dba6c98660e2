"""The largest edit batch that fits one device, from `plan` alone (no weights, no accelerator).

For each model config and mesh: plans (plan.make_plan: the edit and training steps
compiled for abstract sharded inputs on simulated CPU devices) at two batch sizes
(`--points`, default 42 and 336 requests of 24 tokens, packed as a run packs them), fits
each step's peak per device as a + b * rows, predicts the largest batch within 90% of
each device's memory, and checks the prediction with one more plan (a
batch one row smaller when the prediction does not fit). Each plan compiles both steps:
minutes on 2 cores.

    python experiments/plan_sizes.py --configs tests/hub_configs/meta-llama--Meta-Llama-3-8B.json,\\
        tests/hub_configs/EleutherAI--gpt-j-6b.json --meshes 1x8,2x4 --devices v5e,a100-80
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path


def run_one(config: str, mesh_spec: str, devices: list[str], points: list[int], out: Path) -> list[dict]:
    import jax

    from emsedit_jax import plan as planning
    from emsedit_jax.models.config import ModelConfig
    from emsedit_jax.sharding import make_mesh, parse_mesh

    cfg = ModelConfig.from_hf(json.loads(Path(config).read_text()), source=config)
    d, m = parse_mesh(mesh_spec)
    mesh = make_mesh(d, m, devices=jax.devices()[:d * m])
    name = Path(config).stem
    rows_out = []

    def plan_at(n: int) -> dict:
        t0 = time.perf_counter()
        p = planning.make_plan(cfg, mesh, model_name=name, dtype="bfloat16", n_edits=n)
        print(p.table(), f"\n({time.perf_counter() - t0:.0f} s)", flush=True)
        row = {"config": name, "mesh": mesh_spec, **p.to_json()}
        rows_out.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    fitted = [plan_at(n) for n in points]
    per_row = points[-1] // fitted[-1]["rows"]       # requests a row holds as the run packs them
    xs = [r["rows"] for r in fitted]
    for device in devices:
        budget = planning.USABLE * planning.DEVICE_MEMORY[device]
        best = math.inf
        for i in range(len(fitted[0]["steps"])):
            ys = [r["steps"][i]["peak_bytes"] for r in fitted]
            slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
            best = min(best, (budget - (ys[0] - slope * xs[0])) / slope)
        rows = int(best) // d * d
        verdict = None
        for _ in range(3):                  # the prediction, then 10% fewer rows while it does not fit
            if rows < d:
                break
            check = plan_at(rows * per_row)
            verdict = max(s["peak_bytes"] for s in check["steps"]) <= budget
            if verdict:
                break
            rows = min(rows - d, int(rows * 0.9) // d * d)
        summary = {"config": name, "mesh": mesh_spec, "device": device, "predicted_rows": int(best),
                   "largest_n_edits": rows * per_row if verdict else 0, "verified": bool(verdict)}
        print(json.dumps(summary), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(summary) + "\n")
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="tests/hub_configs/meta-llama--Meta-Llama-3-8B.json,"
                    "tests/hub_configs/EleutherAI--gpt-j-6b.json", help="comma-separated config.json files")
    ap.add_argument("--meshes", default="1x8,2x4")
    ap.add_argument("--devices", default="v5e,a100-80")
    ap.add_argument("--points", default="42,336")
    ap.add_argument("--out", default="experiments/results/plan_sizes.jsonl")
    ap.add_argument("--child", nargs=2, metavar=("CONFIG", "MESH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    devices, points = args.devices.split(","), [int(p) for p in args.points.split(",")]
    if args.child:
        run_one(*args.child, devices, points, out)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    for config in args.configs.split(","):
        for mesh in args.meshes.split(","):
            n = math.prod(int(x) for x in mesh.replace(",", "x").split("x"))
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}")
            subprocess.run([sys.executable, __file__, "--child", config, mesh, "--devices", args.devices,
                            "--points", args.points, "--out", str(out)], env=env, check=True)


if __name__ == "__main__":
    main()
