"""One trained editor, the LLM in several precisions, several sequential streams.

Sequential editing is sensitive: a small numerical difference in one edit changes the
weights every later edit starts from. To compare precisions beyond one stream's luck,
this runs the sequential protocol (`--num-seq` x `--n-edits`) on `--streams` disjoint
slices of the editor's test split (stream s edits test requests s*100 ... s*100+99 for
10 x 10; stream 0 is what `emsedit-jax evaluate` runs), with the same editor on:
- float32: the reference;
- bfloat16 parameters, matmuls and activations with a float32 residual stream (the
  CLI's `--dtype bfloat16` default);
- everything in bfloat16 (`--residual-dtype bfloat16`: transformers' numerics);
- float32 compute on bfloat16-rounded weights (`--with-rounded`: separates weight
  rounding from activation precision).
It prints per-stream and mean ES / GS / LS, the unedited model's, and the largest
per-stream gap to float32, and writes them to `--out` (.md and .json).

    python experiments/precision_streams.py --editor runs/zsre/editor --streams 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from emsedit_jax import cli
from emsedit_jax.checkpoint import load_editor
from emsedit_jax.evaluate import run_protocol
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from report import write_report

METRICS = ("ES", "GS", "LS")


def precisions(model_name: str, with_rounded: bool) -> dict:
    m32 = load_model(model_name)
    out = {"float32": m32,
           "bfloat16, float32 residual": load_model(model_name, dtype=jnp.bfloat16, residual="float32"),
           "bfloat16 everywhere": load_model(model_name, dtype=jnp.bfloat16)}
    if with_rounded:
        rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), m32.params)
        out["float32 compute, bfloat16-rounded weights"] = dataclasses.replace(m32, params=rounded)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--editor", required=True, help="editor folder written by train")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--num-seq", type=int, default=10)
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--with-rounded", action="store_true")
    ap.add_argument("--out", default="experiments/results/precision_streams")
    args = ap.parse_args()
    record = json.loads((Path(args.editor) / "editor.json").read_text())
    data_args = argparse.Namespace(model=None, skip_invalid=False, dataset=None, data=None, test_data=None,
                                   n_train=None, n_test=None, split_seed=None)
    cli._editor_defaults(data_args, record)         # the editor's data and split, as evaluate does
    models = precisions(data_args.model or "smollm2", args.with_rounded)
    ref = models["float32"]
    ecfg, state, _ = load_editor(args.editor, ref.config)
    _, test = cli._load_data(data_args)
    _, test = cli._check_tokenised(ref, [], test, data_args.skip_invalid)
    per = args.num_seq * args.n_edits
    if len(test) < per * args.streams:
        raise SystemExit(f"{args.streams} streams of {per} requests need {per * args.streams} test requests, "
                         f"the split has {len(test)}")
    metric = cli.DATASET_METRIC[data_args.dataset]
    rows = {name: [] for name in ["unedited", *models]}
    for s in range(args.streams):
        split = encode_split(ref.tokenizer, test[s * per:(s + 1) * per])
        for name, model in models.items():
            res = run_protocol(model, ecfg, state, split, protocol="sequential", num_seq=args.num_seq,
                               n_edits=args.n_edits, metric=metric, progress=False)
            rows[name].append(res.metrics)
            if name == "float32":
                rows["unedited"].append(res.baseline)
            print(f"stream {s} {name}: " + " ".join(f"{k} {res.metrics[k]:.1f}" for k in METRICS), flush=True)
    head = ("| model | " + " | ".join(METRICS) + " | largest per-stream gap to float32 (ES / GS / LS) |\n"
            "|---|---:|---:|---:|---|")
    lines = []
    for name, per_stream in rows.items():
        mean = {k: float(np.mean([r[k] for r in per_stream])) for k in METRICS}
        gap = "" if name in ("unedited", "float32") else " / ".join(
            f"{max(abs(r[k] - f[k]) for r, f in zip(per_stream, rows['float32'])):.1f}" for k in METRICS)
        lines.append(f"| {name} | " + " | ".join(f"{mean[k]:.1f}" for k in METRICS) + f" | {gap} |")
    table = "\n".join([f"## {args.editor}: sequential {args.num_seq} x {args.n_edits}, mean of {args.streams} "
                       "disjoint streams of the test split", "", head, *lines])
    write_report(args.out, table, {"editor": args.editor, "streams": rows})


if __name__ == "__main__":
    main()
