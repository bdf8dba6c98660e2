"""Seconds per edit with jaxlib's CPU LAPACK (SciPy's OpenBLAS) at different thread counts.

The command line and the experiments limit that library to one thread at start
(emsedit_jax/lapack_threads.py).
Changing the count back and forth inside one process gave contradictory rows (threads
started for a larger count may stay behind), so each measurement runs
`bench_edit_speed.py` (default editor, ZsRE protocol batches, fastest of `--reps` calls)
in a fresh process with EMSEDIT_JAX_LAPACK_THREADS set, alternating the settings for
`--rounds` rounds so that slow phases of a shared machine hit every setting alike.

    python experiments/bench_lapack_threads.py --threads 2,1 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from report import write_report

HERE = Path(__file__).resolve().parent


def run_once(threads: int, args, tmp: Path, tag: str) -> dict:
    out = tmp / tag
    cmd = [sys.executable, str(HERE / "bench_edit_speed.py"), "--data", args.data, "--reps", str(args.reps),
           "--buckets", "1", "--configs", args.config, "--out", str(out)]
    env = {**os.environ, "EMSEDIT_JAX_LAPACK_THREADS": str(threads)}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    row = json.loads(out.with_suffix(".json").read_text())["rows"][0]
    print(f"threads {threads} ({tag}): train {row['train_s_per_edit']:.3f} s/edit, edit {row['edit_s_per_edit']:.3f}",
          flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--threads", default="2,1", help="comma-separated LAPACK thread counts to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--config", default="default: layers 18-23 rank 1024")
    ap.add_argument("--out", default="results/bench_lapack_threads")
    args = ap.parse_args()
    settings = [int(t) for t in args.threads.split(",")]
    rows = {t: [] for t in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for t in settings:
                rows[t].append(run_once(t, args, Path(tmp), f"r{r}_t{t}"))
    lines = []
    for t in settings:
        tr = [row["train_s_per_edit"] for row in rows[t]]
        ed = [row["edit_s_per_edit"] for row in rows[t]]
        lines.append(f"| {t} | {', '.join(f'{x:.3f}' for x in tr)} | {np.mean(tr):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in ed)} | {np.mean(ed):.3f} |")
    head = ("| LAPACK threads | train s/edit per round | mean | edit s/edit per round | mean |\n"
            "|---:|---|---:|---|---:|")
    env = (f"{os.cpu_count()} CPUs; config {args.config!r}; {args.rounds} alternating rounds, one fresh process "
           f"per cell; each cell: bench_edit_speed.py, fastest of {args.reps} calls per batch layout")
    table = "\n".join([f"## EMSEdit s/edit against jaxlib's LAPACK thread count ({env})", "", head, *lines])
    write_report(args.out, table, {"env": env, "rows": {str(t): v for t, v in rows.items()}})


if __name__ == "__main__":
    main()
