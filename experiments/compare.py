"""EMSEdit against MEND, MALMEN, RLEdit and their multi-step variants, in one command.

For every dataset x protocol x method x seed: meta-train an editor on the train split
(`emsedit_jax.train.train`), edit the test requests with the protocol and score them
(`emsedit_jax.evaluate.run_protocol`), and write the run's result. "X2" in a method list
is method X with T = 2 edit steps (MSBP plugged in: `editor.config.method_config`).

- Data: ZsRE (the 1k MEND-format file, invalid records skipped, split into train and test
  with a fixed seed) and CounterFact (train on counterfact-train.json, test on
  counterfact-val.json), read from `--data-root` (default ../shared/data).
- Model: the embedded `smollm2`, the library's edited modules (`editor.config.default_modules`:
  the MLP up-projections of the last 30% of the layers, of layers 3-8 with keys at the subject).
- Hyperparameters: the library's defaults, which the CLI shows and uses
  (`train.configs`; `--preset` for a named preset, by default the dataset's as in the CLI:
  EMSEdit on CounterFact takes "counterfact"), the same for every method:
  step size, meta learning rate, rank, epochs. Each method keeps its own steps and
  regulariser (EMSEdit: norm; the baselines: KL on locality prompts).
- Protocols: sequential `--num-seq` x `--n-edits` (default 10 x 10) and batch 1 x
  `--batch-n-edits` (default 100). Training uses the same batch size as the protocol.
- Output (`--out`, default experiments/results/compare): one folder per run (its
  checkpoints, editor and result.json); runs whose result.json exists are skipped, so an
  interrupted compare resumes (and an interrupted run resumes from its checkpoint).
  compare.md / compare.json: mean ± std over seeds of ES / GS / LS, the unedited
  model's scores on the same requests, training and editing seconds per edit.

    python experiments/compare.py                     # the full comparison (long)
    python experiments/compare.py --quick             # a smoke run of a few minutes
    python experiments/compare.py --methods emsedit,malmen2 --datasets zsre --seeds 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax

from emsedit_jax import cli
from emsedit_jax.checkpoint import load_editor
from emsedit_jax.data import check_lengths, load_requests, split_requests
from emsedit_jax.editor.config import parse_method
from emsedit_jax.editor.steps import init_editor
from emsedit_jax.evaluate import preserved_gram, run_protocol
from emsedit_jax.lapack_threads import limit as limit_lapack_threads
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import PRESETS, configs, held_out, train

METHODS = ("emsedit", "mend", "malmen", "rledit", "mend2", "malmen2", "rledit2")
DATASETS = {   # name -> (train file, test file or None: split the train file; format)
    "zsre": ("zsre/zsre_mend_train-1k.json", None, "zsre"),
    "counterfact": ("counterfact/counterfact-train.json", "counterfact/counterfact-val.json", "counterfact"),
}
FULL = {"n_train": 800, "epochs": None, "num_seq": 10, "n_edits": 10, "batch_n_edits": 100, "seeds": "0,1,2",
        "methods": ",".join(METHODS), "datasets": "zsre,counterfact", "protocols": "sequential,batch"}
QUICK = {"n_train": 20, "epochs": 1, "num_seq": 2, "n_edits": 5, "batch_n_edits": 10, "seeds": "0",
         "methods": "emsedit,malmen", "datasets": "zsre", "protocols": "sequential"}
SPLIT_SEED = 0
METRICS = ("ES", "GS", "LS")


def load_dataset(name: str, data_root: Path, n_train: int, n_test: int, tokenizer, test_part: str = "test"):
    """(train requests, test requests): invalid and over-long records skipped. `test_part`
    "rest": the test requests follow the training ones in the training file (CounterFact's
    file of 10,000 requests, for batches larger than its test file)."""
    train_file, test_file, fmt = DATASETS[name]
    reqs = load_requests(data_root / train_file, fmt, skip_invalid=True).requests
    if test_file is None:
        train, test = split_requests(reqs, n_train, n_test, SPLIT_SEED)
    elif test_part == "rest":
        train, test = reqs[:n_train], reqs[n_train:n_train + n_test]
    else:
        train = reqs[:n_train]
        test = load_requests(data_root / test_file, fmt, skip_invalid=True).requests[:n_test]
    train = check_lengths(tokenizer, train, skip_invalid=True).requests
    test = check_lengths(tokenizer, test, skip_invalid=True).requests
    return train, test


def editor_and_train_config(method: str, protocol: str, n_edits: int, num_seq: int, epochs: int | None,
                            seed: int, rank: int | None, blocks: int | None, model_cfg, preset: str = "default",
                            layers: str | None = None, overrides: dict | None = None):
    """The configs `emsedit-jax train` resolves for these options: the library defaults
    under `preset`, step-specific hypernetworks for the sequential protocol, then
    `overrides` (any EditorConfig / TrainConfig field)."""
    fields = {"protocol": protocol, "n_edits": n_edits, "num_seq": num_seq, "seed": seed,
              "step_specific": protocol == "sequential", "epochs": epochs, "rank": rank, "n_blocks": blocks,
              **(overrides or {})}
    modules = cli.parse_modules(None, layers, None, model_cfg) if layers else None   # None: the preset's defaults
    return configs(modules, method, preset=preset, model_cfg=model_cfg,
                   **{k: v for k, v in fields.items() if v is not None})


def parse_overrides(items: list[str]) -> dict:
    """--set FIELD=VALUE pairs -> {field: value}, values parsed as JSON where they can be."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE")
        try:
            out[name.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[name.replace("-", "_")] = value
    return out


def run_one(model, run_dir: Path, method: str, dataset: str, protocol: str, seed: int, splits, opts) -> dict:
    """Trains (or resumes, or reuses a finished editor) and evaluates one run."""
    num_seq, n_edits = (opts.num_seq, opts.n_edits) if protocol == "sequential" else (1, opts.batch_n_edits)
    eval_seq, eval_edits = (opts.eval_num_seq or num_seq, n_edits) if protocol == "sequential" else \
        (1, opts.eval_batch_n_edits or n_edits)
    ecfg, tcfg = editor_and_train_config(method, protocol, n_edits, num_seq, opts.epochs, seed, opts.rank,
                                         opts.blocks, model.config, opts.preset or cli.dataset_preset(dataset, method),
                                         opts.layers, opts.overrides)
    train_split, test_split, train_reqs = splits
    t0 = time.perf_counter()
    editor_dir = run_dir / "editor"
    if opts.untrained:          # the identity hypernetworks at the initial step size: what training starts from
        state, train_s, train_compile_s = init_editor(ecfg, model.config, jax.random.key(seed)), None, None
    elif (editor_dir / "editor.json").is_file():
        ecfg_saved, state, record = load_editor(editor_dir, model.config)
        if ecfg_saved != ecfg:
            raise ValueError(f"{editor_dir} holds an editor of another configuration; delete it")
        train_s, train_compile_s = record.get("train_seconds_per_edit"), None
    else:
        prior = preserved_gram(model, ecfg, train_reqs, n_edits=n_edits, progress=False) if ecfg.needs_prior \
            else None
        val_split = None
        n_val = held_out(tcfg, len(train_reqs))
        if n_val:                 # as `emsedit-jax train`: the last requests are held out to select on
            val_split = encode_split(model.tokenizer, train_reqs[-n_val:])
            train_split = encode_split(model.tokenizer, train_reqs[:-n_val])
        res = train(model, ecfg, tcfg, train_split, run_dir, progress=opts.progress, key_prior=prior,
                    val_split=val_split, metric=cli.DATASET_METRIC[dataset],
                    run_meta={"method": method, "dataset": dataset, "split_seed": SPLIT_SEED})
        state, train_s, train_compile_s = res.state, res.seconds_per_edit, res.compile_seconds
    t1 = time.perf_counter()
    trained = ecfg
    if opts.key_memory:          # an extension applied at edit time to the editor as trained
        ecfg = dataclasses.replace(ecfg, key_memory=opts.key_memory)
    if opts.edit_overrides:      # editor fields changed at edit time only
        ecfg = dataclasses.replace(ecfg, **opts.edit_overrides)
    # The C0 the editor keeps from training (EditorState.prior), else (none kept, or this
    # evaluation takes it at other positions) estimated from the training requests.
    own_prior = bool(state.prior) and ecfg.prior_slots == trained.prior_slots
    prior = preserved_gram(model, ecfg, train_reqs, n_edits=n_edits, progress=False) \
        if ecfg.needs_prior and not own_prior else None
    ev = run_protocol(model, ecfg, state, test_split, protocol=protocol, num_seq=eval_seq, n_edits=eval_edits,
                      metric=cli.DATASET_METRIC[dataset], progress=opts.progress, key_prior=prior,
                      capture_chunk=opts.capture_chunk)
    return {"method": label(method, opts.key_memory, opts.tag), "dataset": dataset, "protocol": protocol, "seed": seed,
            "metrics": ev.metrics, "baseline": ev.baseline, "n_requests": ev.n_requests,
            "train_seconds_per_edit": train_s, "train_compile_seconds": train_compile_s,
            "edit_seconds_per_edit": ev.edit_seconds_per_edit, "edit_compile_seconds": ev.edit_compile_seconds,
            "train_wall_seconds": t1 - t0, "eval_wall_seconds": time.perf_counter() - t1,
            "num_seq": eval_seq, "n_edits": eval_edits, "n_train": len(train_split),
            "editor": dataclasses.asdict(ecfg), "train": dataclasses.asdict(tcfg)}


def label(method: str, key_memory: float, tag: str | None = None) -> str:
    """How a method's rows are named: with the edit-time variant it was evaluated with, if any."""
    return method + (f" + key memory {key_memory:g}" if key_memory else "") + (f" + {tag}" if tag else "")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: list[dict], methods: list[str]) -> list[dict]:
    """One row per (dataset, protocol, method): mean and std over seeds."""
    rows = []
    keys = sorted({(r["dataset"], r["protocol"]) for r in results})
    for dataset, protocol in keys:
        group = [r for r in results if (r["dataset"], r["protocol"]) == (dataset, protocol)]
        base = {k: _mean_std([r["baseline"][k] for r in group])[0] for k in METRICS}
        rows.append({"dataset": dataset, "protocol": protocol, "method": "unedited", "seeds": [],
                     **{k: [base[k], 0.0] for k in METRICS}})
        for method in methods:
            runs = [r for r in group if r["method"] == method]
            if not runs:
                continue
            row = {"dataset": dataset, "protocol": protocol, "method": method, "steps": runs[0]["editor"]["steps"],
                   "seeds": sorted(r["seed"] for r in runs), "n_requests": runs[0]["n_requests"],
                   "shape": f"{runs[0]['num_seq']}x{runs[0]['n_edits']}"}
            for k in METRICS:
                row[k] = list(_mean_std([r["metrics"][k] for r in runs]))
            for k in ("train_seconds_per_edit", "edit_seconds_per_edit"):
                row[k] = list(_mean_std([r[k] for r in runs]))
            rows.append(row)
    return rows


def markdown(rows: list[dict], env: str) -> str:
    out = [f"# Editing methods compared ({env})", ""]
    for dataset, protocol in dict.fromkeys((r["dataset"], r["protocol"]) for r in rows):
        group = [r for r in rows if (r["dataset"], r["protocol"]) == (dataset, protocol)]
        shape = next((r["shape"] for r in group if "shape" in r), "")
        out += [f"## {dataset}, {protocol} {shape}", "",
                "| method | T | ES | GS | LS | train s/edit | edit s/edit | seeds |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            if r["method"] == "unedited":
                out.append("| unedited | – | " + " | ".join(f"{r[k][0]:.1f}" for k in METRICS) + " | | | |")
                continue
            cells = [f"{r[k][0]:.1f} ± {r[k][1]:.1f}" for k in METRICS]
            cells += [f"{r[k][0]:.3f}" for k in ("train_seconds_per_edit", "edit_seconds_per_edit")]
            out.append(f"| {r['method']} | {r['steps']} | " + " | ".join(cells) + f" | {len(r['seeds'])} |")
        out.append("")
    return "\n".join(out)


def main(argv=None):
    limit_lapack_threads()      # jaxlib's CPU LAPACK at one thread (EMSEDIT_JAX_LAPACK_THREADS overrides)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run: " + json.dumps(QUICK))
    ap.add_argument("--methods", help=f"comma-separated (default {FULL['methods']}); X2 = X with 2 steps")
    ap.add_argument("--datasets", help=f"comma-separated from {', '.join(DATASETS)} (default both)")
    ap.add_argument("--protocols", help="comma-separated from sequential, batch (default both)")
    ap.add_argument("--seeds", help="comma-separated training seeds (default 0,1,2)")
    ap.add_argument("--n-train", type=int, help=f"training requests (default {FULL['n_train']})")
    ap.add_argument("--epochs", type=int, help="default: TrainConfig's")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="named set of editor and training values (train.PRESETS; default: the dataset's, "
                         "cli.dataset_preset)")
    ap.add_argument("--num-seq", type=int, help="sequential protocol: batches (default 10)")
    ap.add_argument("--n-edits", type=int, help="sequential protocol: requests per batch (default 10)")
    ap.add_argument("--batch-n-edits", type=int, help="batch protocol: requests (default 100)")
    ap.add_argument("--rank", type=int, help="hypernetwork rank (default: EditorConfig's)")
    ap.add_argument("--blocks", type=int, help="hypernetwork blocks (default: EditorConfig's)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--out", default="experiments/results/compare")
    ap.add_argument("--key-memory", type=float, default=0.0, metavar="MU",
                    help="evaluate each trained editor with key memory MU (an extension; 0: the paper's solve); "
                         "the editors are trained once and reused, the scores go to result_km<MU>.json")
    ap.add_argument("--layers", help="edited layer range like 27-29 (default: the library's modules)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="overrides",
                    help="any EditorConfig / TrainConfig field, e.g. --set beta=3e-3 (repeatable)")
    ap.add_argument("--edit-set", action="append", default=[], metavar="FIELD=VALUE", dest="edit_overrides",
                    help="an EditorConfig field changed at edit time only (repeatable; needs --tag)")
    ap.add_argument("--eval-num-seq", type=int, metavar="N",
                    help="sequential protocol: evaluate the editors (trained on --num-seq streams) on streams of N "
                         "batches (needs --tag)")
    ap.add_argument("--eval-batch-n-edits", type=int, metavar="N",
                    help="batch protocol: evaluate the editors on one batch of N requests (needs --tag)")
    ap.add_argument("--tag", help="name of an evaluation variant (--edit-set, --eval-*): the trained editors are "
                                  "reused and the scores go to result_<tag>.json and compare_<tag>.md")
    ap.add_argument("--untrained", action="store_true",
                    help="evaluate untrained editors (identity hypernetworks; needs --tag)")
    ap.add_argument("--progress", action="store_true", help="progress bars within runs")
    ap.add_argument("--capture-chunk", type=int, metavar="ROWS",
                    help="edit large batches capturing ROWS packed rows at a time (memory; same results)")
    ap.add_argument("--test-part", choices=("test", "rest"), default="test",
                    help="CounterFact: test on its test file (default) or on the training file's requests after "
                         "the first --n-train (rest: batches larger than the test file)")
    opts = ap.parse_args(argv)
    opts.overrides = parse_overrides(opts.overrides)
    opts.edit_overrides = parse_overrides(opts.edit_overrides)
    if (opts.edit_overrides or opts.eval_num_seq or opts.eval_batch_n_edits or opts.untrained) and not opts.tag:
        raise SystemExit("--edit-set needs --tag (the trained editors are reused; their scores are kept apart)")
    preset = QUICK if opts.quick else {}
    for key, value in FULL.items():
        if getattr(opts, key) is None:
            setattr(opts, key, preset.get(key, value))
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    for m in methods:
        parse_method(m)                                    # fail early on a typo
    datasets = [d.strip() for d in opts.datasets.split(",") if d.strip()]
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown:
        raise SystemExit(f"unknown dataset(s) {unknown}; choose from {', '.join(DATASETS)}")
    protocols = [p.strip() for p in opts.protocols.split(",") if p.strip()]
    seeds = [int(s) for s in opts.seeds.split(",") if s.strip()]
    n_test = max((opts.eval_num_seq or opts.num_seq) * opts.n_edits if "sequential" in protocols else 0,
                 (opts.eval_batch_n_edits or opts.batch_n_edits) if "batch" in protocols else 0)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_model(opts.model)
    plan = [(d, p, m, s) for d in datasets for p in protocols for m in methods for s in seeds]
    results, splits = [], {}
    settings = {k: getattr(opts, k) for k in ("n_train", "epochs", "num_seq", "n_edits", "batch_n_edits", "rank",
                                              "blocks", "model", "preset", "layers", "overrides")}
    if opts.test_part != "test":
        settings["test_part"] = opts.test_part
    variant = (f"_km{opts.key_memory:g}" if opts.key_memory else "") + (f"_{opts.tag}" if opts.tag else "")
    print("compare:", json.dumps({"runs": len(plan), "n_test": n_test, "methods": methods, "datasets": datasets,
                                  "protocols": protocols, "seeds": seeds, **settings}))
    for i, (dataset, protocol, method, seed) in enumerate(plan, 1):
        run_dir = out / dataset / protocol / method / f"seed{seed}"
        result_file = run_dir / f"result{variant}.json"
        tag = f"[{i}/{len(plan)}] {dataset} {protocol} {method} seed {seed}"
        if result_file.is_file():
            previous = json.loads(result_file.read_text())
            if previous.get("settings") != settings:
                raise SystemExit(f"{result_file} was run with other settings ({previous.get('settings')}); "
                                 "use another --out")
            results.append(previous)
            print(f"{tag}: done before, skipped", flush=True)
            continue
        if dataset not in splits:
            tr, te = load_dataset(dataset, Path(opts.data_root), opts.n_train, n_test, model.tokenizer,
                                  opts.test_part)
            if len(te) < n_test:
                raise SystemExit(f"{dataset}: {len(te)} test requests, the protocols need {n_test}")
            splits[dataset] = (encode_split(model.tokenizer, tr), encode_split(model.tokenizer, te), tr)
        t0 = time.perf_counter()
        res = run_one(model, run_dir, method, dataset, protocol, seed, splits[dataset], opts)
        res["settings"] = settings
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(result_file)
        results.append(res)
        scores = " ".join(f"{k} {res['metrics'][k]:.1f} (unedited {res['baseline'][k]:.1f})" for k in METRICS)
        print(f"{tag}: {scores}; train {res['train_seconds_per_edit'] or float('nan'):.3f} s/edit, edit "
              f"{res['edit_seconds_per_edit']:.3f} s/edit, {time.perf_counter() - t0:.0f} s", flush=True)

    env = f"{opts.model}, jax {jax.__version__} on {jax.default_backend()}, n_train {opts.n_train}"
    rows = aggregate(results, [label(m, opts.key_memory, opts.tag) for m in methods])
    table = markdown(rows, env)
    print(table)
    name = f"compare{variant}"
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps({"env": env, "settings": settings, "rows": rows,
                                                  "runs": results}, indent=1))
    print(f"wrote {out / name}.md and {out / name}.json")


if __name__ == "__main__":
    main()
