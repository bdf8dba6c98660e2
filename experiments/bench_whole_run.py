"""The whole run, as a user meets it: `emsedit-jax train` then `emsedit-jax evaluate`,
each a fresh process (model load, data, compiling, the work), timed from outside, first
with an empty compilation cache and then again with the cache the first pass filled.

Each pass trains a new editor into a fresh folder (same command, same data, same split)
and evaluates it, so the second pass differs from the first only by the warm cache. Each
round then runs a warm pass as two processes and one as one process, `emsedit-jax train
... --evaluate` (the model loaded once). The table gives each process's wall seconds, the
ratio to the first pass, and the seconds per edit the CLI reports for training and
editing.

    python experiments/bench_whole_run.py                                  # the authors' setting
    python experiments/bench_whole_run.py --args "--layers 21-29"          # other train flags
    python experiments/bench_whole_run.py --n-train 100 --n-test 100 --rounds 3
    python experiments/bench_whole_run.py --args "--preset faithful --layers 18-23 --n-edits 10 --num-seq 10 \
        --dtype bfloat16" --eval-args "--dtype bfloat16"                   # the LLM in bfloat16
    python experiments/bench_whole_run.py --rounds 3 --xla-flags ";--xla_cpu_experimental_ynn_fusion_type="

With `--xla-flags "A;B"` ('' for none) the passes run under each of those XLA_FLAGS
settings: the empty-cache pass once per setting, then each round a warm one-process pass
per setting, alternating.

Writes experiments/results/bench_whole_run.{json,md} (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

from report import flags_label, write_report
from report import run_timed as run

HERE = Path(__file__).resolve().parent
# The authors' setting on the embedded model: the faithful preset (T = 2, rank 1024, their
# step size, regulariser and schedule) on up_proj of layers 18-23, 10 x 10 edits.
DEFAULT_ARGS = "--preset faithful --layers 18-23 --n-edits 10 --num-seq 10"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--dataset", default="zsre")
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--args", default=DEFAULT_ARGS, help="further flags of `emsedit-jax train`")
    ap.add_argument("--eval-args", default="", help="further flags of `emsedit-jax evaluate` (say --dtype bfloat16)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="after the first pass (empty cache, two processes): this many rounds of a warm pass as "
                         "two processes, then one as one process (alternating, as the machine's speed drifts)")
    ap.add_argument("--xla-flags", help="';'-separated XLA_FLAGS settings to compare ('' for none): an empty-cache "
                                        "pass under each, then each round a warm one-process pass under each")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_whole_run"), help="output path without suffix")
    args = ap.parse_args()

    exe = [sys.executable, "-m", "emsedit_jax.cli"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        base = {**os.environ, "HF_HUB_OFFLINE": "1"}
        settings = [None] if args.xla_flags is None else args.xla_flags.split(";")
        if args.xla_flags is None:
            passes = [(False, None)] + [(False, None), (True, None)] * args.rounds
        else:
            passes = [(False, f) for f in settings] + [(True, f) for _ in range(args.rounds) for f in settings]
        for i, (one, flags) in enumerate(passes):
            env = base if flags is None else {**base, "XLA_FLAGS": flags}
            cold = i < len(settings)            # each setting's first pass fills the cache
            run_dir = Path(tmp) / f"run{i}"
            train = exe + ["train", "--dataset", args.dataset, "--data", args.data, "--n-train", str(args.n_train),
                           "--n-test", str(args.n_test), "--skip-invalid", "--quiet", "--out", str(run_dir),
                           "--compile-cache-dir", str(cache), *shlex.split(args.args)] + (["--evaluate"] if one else [])
            evaluate = exe + ["evaluate", "--editor", str(run_dir / "editor"), "--out", str(run_dir / "results.json"),
                              "--quiet", "--compile-cache-dir", str(cache), *shlex.split(args.eval_args)]
            train_s, _ = run(train, env)
            eval_s = None if one else run(evaluate, env)[0]
            editor = json.loads((run_dir / "editor" / "editor.json").read_text())
            results = json.loads((run_dir / "results.json").read_text())
            row = {"pass": i, "cache": "empty" if cold else "warm", "processes": 1 if one else 2, "xla_flags": flags,
                   "train_wall_s": train_s, "eval_wall_s": eval_s, "total_s": train_s + (eval_s or 0.0),
                   "train_s_per_edit": editor.get("train_seconds_per_edit"),
                   "edit_s_per_edit": results.get("timing", {}).get("edit_seconds_per_edit"),
                   "metrics": results.get("metrics")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    first = {r["xla_flags"]: r["total_s"] for r in reversed(rows)}      # each setting's empty-cache pass
    lines = ["| pass | XLA_FLAGS | cache | processes | train process s | evaluate process s | whole run s | "
             "vs first | train s/edit | edit s/edit |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ev = "-" if r["eval_wall_s"] is None else f"{r['eval_wall_s']:.1f}"
        lines.append(f"| {r['pass']} | {flags_label(r['xla_flags'])} | {r['cache']} | {r['processes']} | "
                     f"{r['train_wall_s']:.1f} | {ev} | {r['total_s']:.1f} | "
                     f"{first[r['xla_flags']] / r['total_s']:.2f}x | "
                     f"{r['train_s_per_edit'] or float('nan'):.3f} | {r['edit_s_per_edit'] or float('nan'):.3f} |")
    env_line = (f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
                f"{args.dataset} {args.n_train} train / {args.n_test} test requests; train flags: {args.args}"
                + (f"; evaluate flags: {args.eval_args}" if args.eval_args else ""))
    text = "\n".join([f"## The whole run, train + evaluate processes ({env_line})", "", *lines])
    write_report(args.out, text, {"env": env_line, "rows": rows})


if __name__ == "__main__":
    main()
