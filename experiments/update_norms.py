"""How large each step's update is along a sequential stream, and what it does to the edits so far.

A sequential stream can go wrong in one batch: one request whose value gradient lies far
outside what the hypernetwork's normaliser has seen makes one step rewrite a module, and
every edit before it is lost. This replays the stream that `emsedit-jax evaluate` runs
(the first `--num-seq` x `--n-edits` requests of the editor's test split) once per
`--max-update` value (the trust region rho of EditorConfig.max_update; 0 = no cap) and,
after every batch, records each edited module's per-step update norm relative to its
unedited kernel, ||dW_t|| / ||W||; every `--score-every` batches (and after the last) it
scores ES / GS / LS on all requests edited so far. It prints, per variant, the scores
along the stream and the batches whose largest step update exceeded `--report-above`.

    python experiments/update_norms.py --editor runs/zsre/editor --num-seq 49 --max-update 0,0.1 --score-every 7
    python experiments/update_norms.py --editor EDITOR --dataset zsre --n-train 500 --n-test 490 \
        --data ../shared/data/zsre/zsre_mend_train-1k.json      # an editor from compare.py
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np

from emsedit_jax import cli
from emsedit_jax.checkpoint import load_editor
from emsedit_jax.editor.steps import multi_step_edit, new_stream, update_bounds, zero_deltas
from emsedit_jax.evaluate import preserved_gram, score_requests, summarise
from emsedit_jax.lapack_threads import limit as limit_lapack_threads
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from report import write_report

METRICS = ("ES", "GS", "LS")


def replay(model, ecfg, state, split, num_seq, n_edits, metric, score_every, prior):
    """Per batch: the largest ||dW_t|| / ||W|| over modules and steps (and where), and
    the scores of the requests edited so far at the scored batches."""
    lcfg = model.config
    w_norm = {m: float(b) for m, b in update_bounds(dataclasses.replace(ecfg, max_update=1.0), lcfg,
                                                     model.params).items()}       # ||W|| of each module
    batches = [np.arange(i * n_edits, (i + 1) * n_edits) for i in range(num_seq)]
    layouts = split.layouts(batches, buckets=1)
    edited = np.arange(num_seq * n_edits)
    deltas, state = zero_deltas(ecfg, lcfg), new_stream(ecfg, lcfg, state, prior)
    rows = []
    step = functools.cache(lambda n_answer: jax.jit(functools.partial(multi_step_edit, ecfg, lcfg,
                                                                      n_answer=n_answer)))  # one compile a layout
    for i, batch_rows in enumerate(batches):
        layout = layouts[i]
        deltas, state, per_step = step(layout.edit.n_answer)(model.params, state, split.batch(batch_rows, layout).edit,
                                                             deltas)
        ratios = {m: np.linalg.norm(np.asarray(per_step[m]).reshape(ecfg.steps, -1), axis=1) / w_norm[m]
                  for m in ecfg.modules}
        where = max(ratios, key=lambda m: ratios[m].max())
        row = {"batch": i + 1, "largest_update": float(ratios[where].max()), "module": where,
               "step": int(ratios[where].argmax()) + 1}
        if (i + 1) % score_every == 0 or i == num_seq - 1:
            row.update(summarise(score_requests(model, split, edited[:(i + 1) * n_edits], deltas, metric,
                                                layout_rows=edited)))
        rows.append(row)
        print(f"batch {i + 1}: largest update {row['largest_update']:.3f} ||W|| ({where}, step {row['step']})"
              + "".join(f" {k} {row[k]:.1f}" for k in METRICS if k in row), flush=True)
    return rows


def main():
    limit_lapack_threads()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--editor", required=True, help="editor folder written by train")
    ap.add_argument("--num-seq", type=int, default=49)
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--max-update", default="0,0.1", help="comma-separated trust regions rho (0: none)")
    ap.add_argument("--score-every", type=int, default=7)
    ap.add_argument("--report-above", type=float, default=0.1, help="list the batches whose largest step update "
                    "exceeds this fraction of ||W||")
    ap.add_argument("--dataset", help="as evaluate's (default: the editor's)")
    ap.add_argument("--data", help="as evaluate's (default: the editor's data and split)")
    ap.add_argument("--test-data")
    ap.add_argument("--n-train", type=int)
    ap.add_argument("--n-test", type=int)
    ap.add_argument("--split-seed", type=int)
    ap.add_argument("--out", default="experiments/results/update_norms")
    args = ap.parse_args()
    record = json.loads((Path(args.editor) / "editor.json").read_text())
    data_args = argparse.Namespace(model=None, skip_invalid=True, chat_template=False,
                                   **{k: getattr(args, k) for k in ("dataset", "data", "test_data", "n_train",
                                                                     "n_test", "split_seed")})
    cli._editor_defaults(data_args, record)         # the editor's data and split, as evaluate does
    model = load_model(data_args.model or "smollm2")
    ecfg, state, _ = load_editor(args.editor, model.config)
    train, test, _ = cli._load_data(data_args)
    train, test = cli._check_tokenised(model, train if ecfg.needs_prior and not state.prior else [], test, True)
    need = args.num_seq * args.n_edits
    if len(test) < need:
        raise SystemExit(f"the stream needs {need} test requests, the split has {len(test)}")
    split = encode_split(model.tokenizer, test[:need])
    prior = preserved_gram(model, ecfg, train, n_edits=args.n_edits, progress=False) \
        if ecfg.needs_prior and not state.prior else None
    metric = cli.DATASET_METRIC[data_args.dataset]
    runs = {}
    for rho in (float(x) for x in args.max_update.split(",")):
        print(f"max_update {rho:g}")
        runs[rho] = replay(model, dataclasses.replace(ecfg, max_update=rho), state, split, args.num_seq,
                           args.n_edits, metric, args.score_every, prior)
    scored = [r["batch"] for r in next(iter(runs.values())) if "ES" in r]
    lines = [f"## {args.editor}: sequential {args.num_seq} x {args.n_edits}, ES / GS / LS of the requests edited "
             "so far", "", "| max_update | " + " | ".join(f"after {b}" for b in scored) + " | batches with a step "
             f"update > {args.report_above:g} ||W|| (largest) |", "|---|" + "---:|" * len(scored) + "---|"]
    for rho, rows in runs.items():
        cells = [" / ".join(f"{r[k]:.1f}" for k in METRICS) for r in rows if "ES" in r]
        big = [f"{r['batch']} ({r['largest_update']:.2f})" for r in rows if r["largest_update"] > args.report_above]
        lines.append(f"| {rho:g} | " + " | ".join(cells) + f" | {', '.join(big) or 'none'} |")
    write_report(args.out, "\n".join(lines), {"editor": args.editor, "runs": {str(k): v for k, v in runs.items()}})


if __name__ == "__main__":
    main()
