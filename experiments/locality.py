"""Locality options compared: train one editor per configuration, then edit held-out
requests with evaluation-time variants of it and score them.

Protocol (sequential 10 x 10 unless --num-seq / --n-edits say otherwise):
- zsre: `zsre_mend_train-1k.json` split 500 / 498 with --split-seed 0 (invalid records
  skipped); counterfact: the first 500 of `counterfact-train.json`, test on
  `counterfact-val.json`.
- The editor trains on the first --n-fit (default 400) of the 500 training requests;
  the other 100 are the validation part that options are chosen on; the test part is
  scored with the same editor and reported beside it.

A configuration is a name and JSON: {"train": {EditorConfig overrides for training},
"prior": {preserved-knowledge options while training}, "evals": {variant name:
EditorConfig overrides at edit time}}. Each variant's C0 (when its config has
loc_prior or null_space) comes from the training requests (`--prior-source`).

    python experiments/locality.py --dataset counterfact --name base --config '{}'
    python experiments/locality.py --dataset zsre --name base --config '{"evals": {"km1": {"key_memory": 1}}}'

Appends one JSON row per (configuration, variant, part) to experiments/results/locality.jsonl
and prints a table of every row there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from emsedit_jax.cli import parse_modules
from emsedit_jax.data import check_lengths, load_requests, split_requests
from emsedit_jax.editor.config import method_config
from emsedit_jax.evaluate import preserved_gram, run_protocol
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from emsedit_jax.checkpoint import load_editor
from emsedit_jax.train import TrainConfig, TrainResult, train

DATA = {"zsre": "../shared/data/zsre/zsre_mend_train-1k.json",
        "counterfact": "../shared/data/counterfact/counterfact-train.json"}
TEST = {"counterfact": "../shared/data/counterfact/counterfact-val.json"}
METRIC = {"zsre": "zsre", "counterfact": "counterfact"}
# The configuration these studies ran at (then the default): up_proj 27-29, rank 256, beta 3e-3.
BASE = {"rank": 256, "beta": 3e-3, "lr_init": 1e-3, "log_step_size": True, "step_specific": True}
RESULTS = Path(__file__).parent / "results" / "locality.jsonl"


def load_parts(dataset: str, model, n_fit: int):
    fmt = "zsre" if dataset == "zsre" else "auto"
    reqs = load_requests(DATA[dataset], fmt, skip_invalid=True).requests
    if dataset == "zsre":
        train_reqs, test = split_requests(reqs, 500, 498, 0)
    else:
        train_reqs = reqs[:500]
        test = load_requests(TEST[dataset], fmt, skip_invalid=True).requests
    train_reqs = check_lengths(model.tokenizer, train_reqs, skip_invalid=True).requests
    test = check_lengths(model.tokenizer, test, skip_invalid=True).requests
    return train_reqs[:n_fit], train_reqs[n_fit:], test, train_reqs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", choices=sorted(DATA), required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-fit", type=int, default=400)
    ap.add_argument("--layers", default="27-29")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--num-seq", type=int, default=10)
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--protocol", default="sequential")
    ap.add_argument("--parts", default="val,test")
    ap.add_argument("--runs", default="runs/locality")
    ap.add_argument("--editor", default=None, help="evaluate this trained editor folder instead of training")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    if not args.table_only:
        run(args)
    print_table()


def run(args):
    cfg = json.loads(args.config)
    model = load_model("smollm2")
    fit, val, test, all_train = load_parts(args.dataset, model, args.n_fit)
    modules = parse_modules(None, args.layers, None, model.config)
    fields = {**BASE, **cfg.get("train", {})}
    if args.protocol == "batch":
        fields["step_specific"] = False
    ecfg = method_config("emsedit", modules, **fields)
    tcfg = TrainConfig(protocol=args.protocol, n_edits=args.n_edits, num_seq=args.num_seq, epochs=args.epochs,
                       meta_lr=cfg.get("meta_lr", 1e-4), seed=args.seed)
    out = Path(args.runs) / f"{args.dataset}_{args.name}_s{args.seed}"
    if args.editor is None and (out / "editor" / "editor.json").exists():
        args.editor = str(out / "editor")       # trained already: reuse
    fit_split = encode_split(model.tokenizer, fit)
    prior_opts = cfg.get("prior", {"source": "loc"})
    train_prior = None
    if ecfg.loc_prior or ecfg.null_space:
        train_prior = preserved_gram(model, ecfg, fit, source=prior_opts.get("source", "loc"), progress=False)
    if args.editor:
        ecfg, state, record = load_editor(args.editor, model.config)
        res = TrainResult(state, [], record["train_seconds_per_edit"], 0.0, 0)
    else:
        t0 = time.perf_counter()
        res = train(model, ecfg, tcfg, fit_split, out, progress=False, key_prior=train_prior)
        train_wall = time.perf_counter() - t0
        print(f"trained {out} in {train_wall:.0f} s ({res.seconds_per_edit:.3f} s/edit steady)", flush=True)
    variants = cfg.get("evals") or {"as-trained": {}}
    parts = {"val": val, "test": test}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for vname, over in variants.items():
        source = over.pop("prior_source", prior_opts.get("source", "loc"))
        vcfg = dataclasses.replace(ecfg, **over)
        prior = None
        if vcfg.loc_prior or vcfg.null_space:
            prior = preserved_gram(model, vcfg, fit, source=source, progress=False)
        for part in args.parts.split(","):
            split = encode_split(model.tokenizer, parts[part])
            r = run_protocol(model, vcfg, res.state, split, protocol=args.protocol, num_seq=args.num_seq,
                             n_edits=args.n_edits, metric=METRIC[args.dataset], progress=False, key_prior=prior,
                             prob_scores=False)
            row = {"dataset": args.dataset, "config": args.name, "variant": vname, "part": part,
                   "seed": args.seed, "protocol": f"{args.protocol} {args.num_seq}x{args.n_edits}",
                   "metrics": r.metrics, "baseline": r.baseline, "prior_source": source,
                   "train_s_per_edit": res.seconds_per_edit, "edit_s_per_edit": r.edit_seconds_per_edit,
                   "editor": {k: v for k, v in dataclasses.asdict(vcfg).items() if k != "modules"},
                   "layers": args.layers, "n_fit": len(fit), "epochs": args.epochs}
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            m, b = r.metrics, r.baseline
            print(f"{args.dataset} {args.name} {vname} {part} seed {args.seed}: "
                  f"ES/GS/LS {m['ES']:.1f} / {m['GS']:.1f} / {m['LS']:.1f} "
                  f"(unedited {b['ES']:.1f} / {b['GS']:.1f} / {b['LS']:.1f}) edit {r.edit_seconds_per_edit:.3f} s/edit",
                  flush=True)


def print_table():
    if not RESULTS.exists():
        return
    rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["protocol"], r["part"], r["config"], r["variant"]), []).append(r)
    lines = ["| dataset | protocol | part | config | variant | seeds | ES | GS | LS | unedited ES/GS/LS | "
             "train s/edit | edit s/edit |", "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for key in sorted(groups):
        g = groups[key]
        cell = []
        for k in ("ES", "GS", "LS"):
            v = np.array([r["metrics"][k] for r in g])
            cell.append(f"{v.mean():.1f}" + (f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""))
        base = "/".join(f"{np.mean([r['baseline'][k] for r in g]):.1f}" for k in ("ES", "GS", "LS"))
        tr = np.mean([r["train_s_per_edit"] for r in g])
        ed = np.mean([r["edit_s_per_edit"] for r in g])
        lines.append(f"| {' | '.join(map(str, key))} | {len(g)} | {' | '.join(cell)} | {base} | {tr:.3f} | {ed:.3f} |")
    text = "\n".join(lines)
    print(text)
    RESULTS.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
