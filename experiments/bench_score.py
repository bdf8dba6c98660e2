"""Scoring, as an `evaluate` process ends: ES / GS / LS of an edited model and of the
unedited one (`evaluate.score_requests` with both) on the whole run's test requests.

The ZsRE test requests of the CLI's split (`--n-train` / `--n-test`, split seeds
`--seeds`: each seed another test set), the edited modules of the authors' setting
(up_proj of layers 18-23) with small random deltas; the same chunks of requests as
`evaluate` scores. Each row is a fresh process: the first call
(compiling) and the fastest of `--reps` more, the packed positions and answer slots the
chunks compute, and the scores. With `--code DIR,...` the rows alternate with other
checkouts of the package first on the path (say a worktree of an earlier commit), for
`--rounds` rounds, so that they compare in one run.

    python experiments/bench_score.py --code .,../old --seeds 0,1,2

Writes experiments/results/bench_score.{json,md} (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from report import run_with_code, write_report

HERE = Path(__file__).resolve().parent


def measure(data: str, n_train: int, n_test: int, seed: int, reps: int) -> dict:
    import jax
    import numpy as np

    from emsedit_jax.data import load_requests, split_requests
    from emsedit_jax.editor.config import EditorConfig
    from emsedit_jax.editor.steps import zero_deltas
    from emsedit_jax.evaluate import SCORE_CHUNK, score_requests
    from emsedit_jax.models import load_model
    from emsedit_jax.pipeline import VIEWS, encode_split

    model = load_model("smollm2")
    requests = split_requests(load_requests(data, skip_invalid=True).requests, n_train, n_test, seed)[1]
    split = encode_split(model.tokenizer, requests)
    ecfg = EditorConfig(modules=tuple(f"model.layers.{i}.mlp.up_proj" for i in range(18, 24)))
    zero = zero_deltas(ecfg, model.config)
    noise = jax.random.split(jax.random.key(0), len(zero))
    edited = {k: 0.02 * jax.random.normal(r, v.shape) for r, (k, v) in zip(noise, sorted(zero.items()))}
    rows = np.arange(len(split))
    chunks = [rows[i:i + SCORE_CHUNK] for i in range(0, len(rows), SCORE_CHUNK)]
    layout = split.layout(chunks)
    times, scores = [], None
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        scores = score_requests(model, split, rows, (edited, zero), "zsre")
        times.append(time.perf_counter() - t0)
    views = {v: getattr(layout, v) for v in VIEWS}
    return {"requests": len(split), "first_s": times[0], "score_s": min(times[1:]),
            "positions": len(chunks) * sum(vl.n_rows * vl.row_len for vl in views.values()),
            "answer_slots": len(chunks) * sum(vl.n_rows * vl.n_answer for vl in views.values()),
            "tokens": int(sum(split.views[v].attention_mask.sum() for v in VIEWS)),
            "layout": {v: [vl.n_rows, vl.row_len, vl.n_answer] for v, vl in views.items()},
            "edited": {k: float(np.nanmean(v)) * 100 for k, v in scores[0].items()},
            "unedited": {k: float(np.nanmean(v)) * 100 for k, v in scores[1].items()},
            "jax": jax.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--n-train", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--code", default=".", help="comma-separated folders holding the emsedit_jax package to "
                                                "measure ('.': this checkout)")
    ap.add_argument("--seeds", default="0", help="comma-separated split seeds (test sets)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)      # child process: this split seed
    ap.add_argument("--out", default=str(HERE / "results" / "bench_score"), help="output path without suffix")
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(measure(args.data, args.n_train, args.n_test, args.one, args.reps)), flush=True)
        return
    rows = []
    for r in range(args.rounds):
        for seed in args.seeds.split(","):
            child = ["--one", seed, "--data", args.data, "--n-train", str(args.n_train), "--n-test",
                     str(args.n_test), "--reps", str(args.reps)]
            for code in args.code.split(","):
                rows.append({"round": r, "seed": int(seed), "code": code,
                             **run_with_code(__file__, child, code, HERE.parent)})
                print(json.dumps(rows[-1]), flush=True)
    lines = ["| round | split seed | code | first call s | scoring s | positions | answer slots | rows x length (edit / "
             "rephrase / loc) | ES / GS / LS edited | unedited |", "|---:|---:|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        lay = " / ".join(f"{n} x {length}" for n, length, _ in r["layout"].values())
        e, u = (" / ".join(f"{r[k][m]:.2f}" for m in ("ES", "GS", "LS")) for k in ("edited", "unedited"))
        lines.append(f"| {r['round']} | {r['seed']} | {r['code']} | {r['first_s']:.2f} | {r['score_s']:.2f} | {r['positions']} | "
                     f"{r['answer_slots']} | {lay} | {e} | {u} |")
    env = (f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; ZsRE, "
           f"{rows[0]['requests']} test requests, the edited and the unedited model; scoring the fastest of {args.reps} calls after the first")
    write_report(args.out, f"## Scoring an edited model and its baseline ({env})\n\n" + "\n".join(lines),
                 {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
