"""The float32 matmul rate at the embedded model's layer shapes, in XLA (what a jitted
step runs), NumPy (its BLAS) and PyTorch (what the authors' code runs), in one process.

A step's speed on CPU is bound by its matmuls at their own shapes (`bench_edit_speed.py`,
"of floor"): a few hundred token rows against the layer's 576- and 1536-wide kernels. If
another library ran those shapes much faster, the floor would be XLA's, not the
machine's; this measures it. Each shape is timed in every library in turn (threads: the
machine's cores), the fastest quarter's slowest call of `--reps` kept, and given as
GFLOP/s. PyTorch is skipped when it is not installed.

    python experiments/bench_matmul.py
    python experiments/bench_matmul.py --rows 160,368,512 --reps 50

Writes experiments/results/bench_matmul.{json,md} (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from report import write_report

HERE = Path(__file__).resolve().parent


def timed(f, reps: int) -> float:
    """Seconds of one call of `f`: the 25th percentile of `reps` calls after a first."""
    f()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 4]


def libraries(threads: int) -> dict:
    """name -> prepare(a, b), which takes two numpy arrays and returns a call that
    computes a @ b to completion in that library (inputs converted beforehand)."""
    import jax
    import jax.numpy as jnp
    xla = jax.jit(lambda a, b: a @ b)

    def with_xla(a, b):
        a, b = jnp.asarray(a), jnp.asarray(b)
        return lambda: xla(a, b).block_until_ready()

    libs = {"XLA (jax.jit)": with_xla, "NumPy": lambda a, b: lambda: a @ b}
    try:
        import torch
    except ImportError:
        return libs
    torch.set_num_threads(threads)

    def with_torch(a, b):
        a, b = torch.from_numpy(a), torch.from_numpy(b)
        return lambda: a @ b

    libs["PyTorch"] = with_torch
    return libs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="160,368,512", help="comma-separated token-row counts")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_matmul"), help="output path without suffix")
    args = ap.parse_args()

    from emsedit_jax.models import load_model
    cfg = load_model("smollm2").config
    d, f, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    kernels = {"attention q / o": (d, d), "attention k / v": (d, kv), "MLP gate / up": (d, f), "MLP down": (f, d)}
    shapes = [(f"{name}, {m} rows", m, k, n) for m in (int(r) for r in args.rows.split(","))
              for name, (k, n) in kernels.items()] + [("2048^3", 2048, 2048, 2048)]
    threads = os.cpu_count() or 1
    libs = libraries(threads)
    rng = np.random.default_rng(0)
    rows = []
    for label, m, k, n in shapes:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        gflops = {name: 2 * m * k * n / timed(prepare(a, b), args.reps) / 1e9 for name, prepare in libs.items()}
        rows.append({"shape": label, "m": m, "k": k, "n": n, "gflops": gflops})
        print(rows[-1], flush=True)
    names = list(libs)
    lines = ["| shape (rows x in x out) | " + " | ".join(f"{n} GFLOP/s" for n in names) + " | best other / XLA |",
             "|---|" + "---:|" * (len(names) + 1)]
    for r in rows:
        other = max((v for n, v in r["gflops"].items() if n != names[0]), default=float("nan"))
        lines.append(f"| {r['shape']} ({r['m']} x {r['k']} x {r['n']}) | "
                     + " | ".join(f"{r['gflops'][n]:.0f}" for n in names) + f" | {other / r['gflops'][names[0]]:.2f} |")
    env = f"{platform.machine()}, {threads} CPUs, python {platform.python_version()}; float32; {args.reps} calls each"
    write_report(args.out, f"## Matmul rate at the embedded model's shapes ({env})\n\n" + "\n".join(lines),
                 {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
