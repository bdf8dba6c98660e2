"""One trained editor, several variants of the edit, several sequential streams.

Sequential editing is sensitive: a small difference in one edit changes the weights
every later edit starts from, so one stream's scores carry luck. This runs the
sequential protocol (`--num-seq` x `--n-edits`) on `--streams` disjoint slices of the
editor's test split (stream s edits test requests s*100 ... s*100+99 for 10 x 10;
stream 0 is what `emsedit-jax evaluate` runs) for every combination of
- `--precisions`: the LLM in
  - float32: the reference;
  - bf16-f32res: bfloat16 parameters, matmuls and activations with a float32 residual
    stream (the CLI's `--dtype bfloat16` default);
  - bf16: everything in bfloat16 (`--residual-dtype bfloat16`, transformers' numerics);
  - rounded: float32 compute on bfloat16-rounded weights (separates weight rounding
    from activation precision);
- `--key-memory`: values of the solve's key memory mu (0: the paper's ridge solve;
  default: the editor's own).
It prints per-stream and mean ES / GS / LS, the unedited model's, and the largest
per-stream gap to the first variant, and writes them to `--out` (.md and .json).

    python experiments/streams.py --editor runs/zsre/editor --streams 4 --precisions float32,bf16-f32res,bf16
    python experiments/streams.py --editor runs/zsre/editor --streams 4 --key-memory 0,1,10
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
from emsedit_jax.lapack_threads import limit as limit_lapack_threads
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from report import write_report

METRICS = ("ES", "GS", "LS")
PRECISIONS = {
    "float32": "float32",
    "bf16-f32res": "bfloat16, float32 residual",
    "bf16": "bfloat16 everywhere",
    "rounded": "float32 compute, bfloat16-rounded weights",
}


def load_precision(model_name: str, name: str):
    if name == "float32":
        return load_model(model_name)
    if name == "bf16-f32res":
        return load_model(model_name, dtype=jnp.bfloat16, residual="float32")
    if name == "bf16":
        return load_model(model_name, dtype=jnp.bfloat16)
    if name == "rounded":
        m32 = load_model(model_name)
        return dataclasses.replace(m32, params=jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32),
                                                            m32.params))
    raise SystemExit(f"unknown precision {name!r} (choose from {', '.join(PRECISIONS)})")


def main():
    limit_lapack_threads()      # jaxlib's CPU LAPACK at one thread (EMSEDIT_JAX_LAPACK_THREADS overrides)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--editor", required=True, help="editor folder written by train")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--num-seq", type=int, default=10)
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--precisions", default="float32", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    ap.add_argument("--key-memory", default=None, help="comma-separated mu values (default: the editor's)")
    ap.add_argument("--out", default="experiments/results/streams")
    args = ap.parse_args()
    record = json.loads((Path(args.editor) / "editor.json").read_text())
    data_args = argparse.Namespace(model=None, skip_invalid=False, dataset=None, data=None, test_data=None,
                                   n_train=None, n_test=None, split_seed=None)
    cli._editor_defaults(data_args, record)         # the editor's data and split, as evaluate does
    model_name = data_args.model or "smollm2"
    models = {p: load_precision(model_name, p) for p in args.precisions.split(",")}
    ref = next(iter(models.values()))
    ecfg, state, _ = load_editor(args.editor, ref.config)
    mus = [ecfg.key_memory] if args.key_memory is None else [float(x) for x in args.key_memory.split(",")]
    variants = {(p, mu): (models[p], dataclasses.replace(ecfg, key_memory=mu)) for p in models for mu in mus}
    _, test, _ = cli._load_data(data_args)
    _, test = cli._check_tokenised(ref, [], test, data_args.skip_invalid)
    per = args.num_seq * args.n_edits
    if len(test) < per * args.streams:
        raise SystemExit(f"{args.streams} streams of {per} requests need {per * args.streams} test requests, "
                         f"the split has {len(test)}")
    metric = cli.DATASET_METRIC[data_args.dataset]

    def label(p, mu):
        return PRECISIONS[p] + (f", key memory {mu:g}" if len(mus) > 1 or mu else "")

    rows = {"unedited": [], **{label(*v): [] for v in variants}}
    for s in range(args.streams):
        split = encode_split(ref.tokenizer, test[s * per:(s + 1) * per])
        for i, ((p, mu), (model, cfg)) in enumerate(variants.items()):
            res = run_protocol(model, cfg, state, split, protocol="sequential", num_seq=args.num_seq,
                               n_edits=args.n_edits, metric=metric, progress=False)
            rows[label(p, mu)].append(res.metrics)
            if i == 0:
                rows["unedited"].append(res.baseline)
            print(f"stream {s} {label(p, mu)}: " + " ".join(f"{k} {res.metrics[k]:.1f}" for k in METRICS), flush=True)
    first = label(*next(iter(variants)))
    head = ("| variant | " + " | ".join(METRICS) + f" | largest per-stream difference to {first} (ES / GS / LS) |\n"
            "|---|---:|---:|---:|---|")
    lines = []
    for name, per_stream in rows.items():
        mean = {k: float(np.mean([r[k] for r in per_stream])) for k in METRICS}
        gap = "" if name in ("unedited", first) else " / ".join(
            f"{max(abs(r[k] - f[k]) for r, f in zip(per_stream, rows[first])):.1f}" for k in METRICS)
        lines.append(f"| {name} | " + " | ".join(f"{mean[k]:.1f}" for k in METRICS) + f" | {gap} |")
    table = "\n".join([f"## {args.editor}: sequential {args.num_seq} x {args.n_edits}, mean of {args.streams} "
                       "disjoint streams of the test split", "", head, *lines])
    write_report(args.out, table, {"editor": args.editor, "streams": rows})


if __name__ == "__main__":
    main()
