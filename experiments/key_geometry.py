"""How much the keys of different edit requests overlap, per edited module.

For the first `--num-seq` x `--n-edits` requests of the ZsRE test split (the protocol's
stream), the unedited model's keys (module inputs at the answer positions) are captured
for `mlp.up_proj` and `mlp.down_proj` of `--layers`. Per module it reports
- the mean |cosine| between the keys of different answer positions, and
- the overlap a ridge update causes: for batches k != j, the mean over j's keys u of
  ||u P_k|| / ||u||, with P_k = U_k^T (U_k U_k^T + I)^-1 U_k the projection the solve
  `dW = (U^T U + e^lamda I)^-1 U^T D` (lamda = 0) acts through. 0 means batch k's update
  cannot move the outputs at batch j's keys; 1 means it acts on them fully.
This is the mechanism behind the forgetting of earlier edits in sequential editing, and
what the key memory (`--key-memory`) counters.

    python experiments/key_geometry.py --out experiments/results/key_geometry
"""

from __future__ import annotations

import argparse

import numpy as np

from emsedit_jax import cli
from emsedit_jax.editor.capture import capture
from emsedit_jax.lapack_threads import limit as limit_lapack_threads
from emsedit_jax.pipeline import encode_split
from report import write_report


def main():
    limit_lapack_threads()      # jaxlib's CPU LAPACK at one thread (EMSEDIT_JAX_LAPACK_THREADS overrides)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--layers", default="18-23")
    ap.add_argument("--num-seq", type=int, default=10)
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--out", default="experiments/results/key_geometry")
    args = ap.parse_args()
    ns = argparse.Namespace(model=args.model, dtype="float32", residual_dtype=None, dataset="zsre", data=args.data,
                            test_data=None, n_train=500, n_test=498, split_seed=0, skip_invalid=True)
    model = cli._load_model(ns)
    _, test, _ = cli._load_data(ns)
    lo, hi = (int(x) for x in args.layers.split("-"))
    layers = range(lo, hi + 1)
    mods = tuple(f"model.layers.{layer}.mlp.{kind}" for kind in ("up_proj", "down_proj") for layer in layers)
    split = encode_split(model.tokenizer, test[:args.num_seq * args.n_edits])
    batches = [list(range(i * args.n_edits, (i + 1) * args.n_edits)) for i in range(args.num_seq)]
    layout = split.layout(batches)
    keys = {m: [] for m in mods}
    for rows in batches:
        cap = capture(model.config, model.params, split.batch(rows, layout).edit, mods,
                      n_answer=layout.edit.n_answer)
        mask = np.asarray(cap.mask).reshape(-1)
        for m in mods:
            keys[m].append(np.asarray(cap.keys[m], np.float64).reshape(mask.size, -1)[mask])
    lines, payload = [], {}
    for m in mods:
        per_batch = keys[m]
        allk = np.concatenate(per_batch)
        unit = allk / np.linalg.norm(allk, axis=1, keepdims=True)
        cos = np.abs(unit @ unit.T)[np.triu_indices(len(unit), 1)].mean()
        kept = []
        for k, u_k in enumerate(per_batch):
            proj = u_k.T @ np.linalg.solve(u_k @ u_k.T + np.eye(len(u_k)), u_k)
            kept += [np.mean(np.linalg.norm(u_j @ proj, axis=1) / np.linalg.norm(u_j, axis=1))
                     for j, u_j in enumerate(per_batch) if j != k]
        payload[m] = {"d_in": allk.shape[1], "keys": len(allk), "mean_abs_cos": float(cos),
                      "other_batch_norm_kept": float(np.mean(kept))}
        lines.append(f"| {m} | {allk.shape[1]} | {len(allk)} | {cos:.3f} | {np.mean(kept):.3f} |")
    table = "\n".join([f"## Key overlap, {args.model}, ZsRE test stream ({args.num_seq} x {args.n_edits})", "",
                       "| module | d_in | keys | mean abs cosine | other batch's key norm kept by one batch's ridge "
                       "projection |", "|---|---:|---:|---:|---:|", *lines])
    write_report(args.out, table, payload)


if __name__ == "__main__":
    main()
