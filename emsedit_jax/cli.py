"""Command line: `emsedit-jax {demo,train,evaluate,edit,generate,plan}`.

train -> an editor folder (editor.json + state/, checkpoints/ while training);
evaluate -> results.json (metrics, unedited baseline, timing, resolved config);
edit -> greedy completions before and after editing facts, optionally saved as a
Hugging Face checkpoint; plan -> memory per device and FLOPs per edit on a device mesh,
from config.json alone. Every command prints the resolved configuration it ran with.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import UserError

# Token accuracy ("zsre") for data whose locality prompts are unrelated facts with their
# own answers (the demo); the logit comparison of DESIGN.md for CounterFact.
DATASET_METRIC = {"zsre": "zsre", "counterfact": "counterfact", "mquake": "counterfact", "demo": "zsre",
                  "user": "zsre", "knowedit": "zsre"}
DATASET_FORMAT = {"zsre": "zsre", "counterfact": "auto", "mquake": "mquake", "demo": "counterfact", "user": "user",
                  "knowedit": "knowedit"}


def default_modules(cfg) -> tuple[str, ...]:
    """Six consecutive MLP input projections: layers 18-23 of a 30-layer LLaMA-style
    model (0.6 of the depth), the last six layers of GPT-2 / GPT-J; for a Flax model
    (--model package.module:factory), the edit paths its factory gave `from_nnx` / `from_linen`."""
    from .models.transformer import builtin
    if not builtin(cfg):
        return cfg.modules
    n = cfg.num_layers
    if cfg.family == "llama":
        start = min(max(0, round(0.6 * n)), max(0, n - 6))
        return tuple(f"model.layers.{i}.mlp.up_proj" for i in range(start, min(n, start + 6)))
    module = "mlp.c_fc" if cfg.family == "gpt2" else "mlp.fc_in"
    return tuple(f"transformer.h.{i}.{module}" for i in range(max(0, n - 6), n))


def parse_modules(spec: str | None, layers: str | None, module: str | None, cfg) -> tuple[str, ...]:
    if spec:
        return tuple(s.strip() for s in spec.split(",") if s.strip())
    base = default_modules(cfg)
    if layers is None and module is None:
        return base
    from .models.transformer import builtin
    if not builtin(cfg):
        from .errors import UserError
        raise UserError("--layers/--module name layers of Hugging Face models; for a Flax model pass --modules "
                        "(module paths like layers.18.mlp.up_proj)")
    suffix = module or base[0].split(".", 3)[-1]
    if layers:
        lo, _, hi = layers.partition("-")
        idx = range(int(lo), int(hi or lo) + 1)
    else:
        idx = [int(m.split(".")[2]) for m in base]
    return tuple(f"{cfg.layer_prefix}.{i}.{suffix}" for i in idx)


def _load_model(args, mesh=None):
    """The --model in --dtype; with bfloat16 parameters the residual stream is float32
    unless --residual-dtype bfloat16 asks for transformers' all-bfloat16 numerics. With a
    mesh, every parameter is read straight into its shards."""
    import jax.numpy as jnp

    from .models import load_model
    from .models.hf_io import is_factory
    if is_factory(args.model) and (args.dtype != "float32" or args.residual_dtype or mesh is not None):
        from .errors import UserError
        raise UserError("--dtype, --residual-dtype and --mesh apply to checkpoints; a model factory "
                        f"({args.model}) sets its own dtypes")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    residual = args.residual_dtype or ("float32" if args.dtype == "bfloat16" else None)
    layout = getattr(args, "layer_layout", None)
    stacked = None if layout is None else layout == "stacked"
    return load_model(args.model, dtype=dtype, residual=residual, mesh=mesh, stacked=stacked)


def model_name(name: str) -> str:
    """How a run records --model: the absolute path of a local folder, else the name
    (embedded model or hub id)."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else str(name)


def _load_data(args):
    """(train requests, test requests, data record) from --data/--test-data and the split
    options. The record holds each file's absolute path, SHA-256 and every skipped or
    repeated record, and the split actually used."""
    from .data import load_requests, request_hash, split_requests
    from .data.records import split_units
    if args.dataset is None:
        raise SystemExit("--dataset is required (zsre, counterfact, mquake, demo or user)")
    fmt = DATASET_FORMAT[args.dataset]
    data = args.data or (str(demo_data_path()) if args.dataset == "demo" else None)
    if data is None:
        raise SystemExit(f"--data is required for --dataset {args.dataset}")
    loaded = report_load(load_requests(data, fmt, skip_invalid=args.skip_invalid))
    reqs = loaded.requests
    seed = 0 if args.split_seed is None else args.split_seed
    record = {"data": _file_record(loaded), "test_data": None}
    if args.test_data:
        test_loaded = report_load(load_requests(args.test_data, fmt, skip_invalid=args.skip_invalid))
        record["test_data"] = _file_record(test_loaded)
        train = reqs[:args.n_train] if args.n_train else reqs
        test = test_loaded.requests[:args.n_test] if args.n_test else test_loaded.requests
        record["split"] = {"n_train": len(train), "n_test": len(test), "split_seed": None}
    else:
        # An MQuAKE case's rewrites stay together (its multi-hop questions need all of them).
        by_case = args.dataset == "mquake"
        n_units = len(split_units(reqs, by_case))
        n_train = args.n_train or n_units // 2
        n_test = args.n_test or n_units - n_train
        record["split"] = {"n_train": n_train, "n_test": n_test, "split_seed": seed, "by_case": by_case}
        train, test = split_requests(reqs, n_train, n_test, seed, by_case=by_case)
    trained = {request_hash(r) for r in train}
    record["train_test_overlap"] = sum(request_hash(r) in trained for r in test)
    if record["train_test_overlap"]:
        print(f"{record['train_test_overlap']} test request(s) have the same content as a training request",
              file=sys.stderr)
    return train, test, record


def _file_record(loaded) -> dict:
    return {"path": loaded.path, "sha256": loaded.sha256, "n_records": loaded.n_records,
            "n_requests": len(loaded.requests), "skipped": loaded.skipped, "duplicates": loaded.duplicates}


def report_load(loaded, shown: int = 3):
    """Prints how many records of a file were skipped or repeat an earlier request, with
    the first few reasons (all of them stay in `loaded` for the run's JSON record)."""
    for what, items in (("skipped invalid record(s)", loaded.skipped),
                        ("request(s) repeating an earlier one (kept)", loaded.duplicates)):
        if items:
            print(f"{loaded.path}: {len(items)} {what}:", file=sys.stderr)
            for line in items[:shown]:
                print(f"  {line}", file=sys.stderr)
            if len(items) > shown:
                print(f"  ... and {len(items) - shown} more", file=sys.stderr)
    return loaded


def demo_data_path() -> Path:
    return Path(__file__).parent / "data" / "demo_counterfacts.json"


def _print_table(metrics: dict, baseline: dict, title: str) -> str:
    """One row per metric computed, the unedited model beside the edited one."""
    from .metrics import unit

    def cell(d, k):
        return "-" if k not in d else f"{d[k]:.2f}" if unit(k) == "bits" else f"{d[k]:.1f}"
    lines = [f"{title}", "", "| metric | unit | unedited | edited |", "|---|---|---:|---:|"]
    lines += [f"| {k} | {unit(k)} | {cell(baseline, k)} | {cell(metrics, k)} |" for k in metrics]
    text = "\n".join(lines)
    print(text)
    return text


def _check_tokenised(model, train, test, skip_invalid, chat_template=False):
    """Validates lengths of every request before any long work."""
    from .data import check_lengths
    out = []
    for reqs in (train, test):
        res = check_lengths(model.tokenizer, reqs, skip_invalid=skip_invalid, chat_template=chat_template)
        if res.skipped:
            print(f"skipped {len(res.skipped)} over-long request(s)", file=sys.stderr)
        out.append(res.requests)
    return out


# ---------------------------------------------------------------- commands
# Hyperparameters that depend on the schedule. "faithful" uses the authors' values; the
# default loop trains for real, and its step size and regulariser weight are set for the
# scale of the embedded model (see the README for the measurements behind them).
SCHEDULE_DEFAULTS = {
    "default": {"epochs": 1, "meta_lr": 1e-4, "lr_init": 1e-3, "beta": 1e-2},
    "faithful": {"epochs": 1, "meta_lr": 1e-5, "lr_init": 1e-6, "beta": 0.5},
}


def train_editor_config(args, model_cfg):
    """The EditorConfig of `train`: the method's defaults (editor.config.method_config:
    EMSEdit 2 steps + norm regulariser, MEND / MALMEN / RLEdit 1 step + KL), `--steps N`
    for "Method²", and the shared options. Step-specific hypernetworks for the
    sequential protocol (they matter only when steps > 1)."""
    from .editor.config import method_config
    options = {"step_specific": args.protocol == "sequential", "rank": args.rank, "n_blocks": args.blocks,
               "lr_init": args.lr_init, "msbp": args.msbp, "log_step_size": args.schedule == "default",
               "beta": args.beta, "back_depth": args.back_depth, "key_memory": args.key_memory,
               "loc_prior": args.loc_prior, "null_space": args.null_space, "key_positions": args.key_positions,
               "solve": args.solve, "hypernet": args.hypernet}
    return method_config(args.method, parse_modules(args.modules, args.layers, args.module, model_cfg),
                         steps=args.steps, **{k: v for k, v in options.items() if v is not None})


def resolve_schedule(args):
    """Fills the options `train` left unset with its --schedule's defaults (in place)."""
    for key, value in SCHEDULE_DEFAULTS[args.schedule].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def train_config(args):
    """The TrainConfig of `train` (after resolve_schedule)."""
    from .train import TrainConfig
    return TrainConfig(protocol=args.protocol, schedule=args.schedule, n_edits=args.n_edits, num_seq=args.num_seq,
                       epochs=args.epochs, meta_lr=args.meta_lr, seed=args.seed, buckets=args.buckets,
                       select_every=args.select_every)


def cmd_train(args) -> dict:
    from .evaluate import preserved_gram
    from .pipeline import encode_split
    from .runs import check_run
    from .train import train
    resolve_schedule(args)
    args.chat_template = bool(args.chat_template)
    mesh = _scale_setup(args)
    train_reqs, test_reqs, data = _load_data(args)        # data errors before the model loads
    tcfg = train_config(args)
    n_val = 0
    if tcfg.select_every:       # the last --n-val training requests are held out to select on
        need = args.n_edits * (args.num_seq if args.protocol == "sequential" else 1)
        n_val = args.n_val or need
        if n_val < need:
            raise SystemExit(f"--n-val {n_val}: the validation edits need at least {need} held-out requests")
    residual = args.residual_dtype or ("float32" if args.dtype == "bfloat16" else args.dtype)
    # Everything that makes this run this run (runs.claim_run adds the model, the editor
    # config and the training requests' content hash); --mesh and --remat change only
    # the cost. A folder holding another run is refused before the model loads.
    identity = {"dataset": args.dataset, "skip_invalid": args.skip_invalid,
                "data_sha256": data["data"]["sha256"], "n_skipped": len(data["data"]["skipped"]),
                "test_data_sha256": (data["test_data"] or {}).get("sha256"), "split": data["split"],
                "dtype": args.dtype, "residual_dtype": residual, "chat_template": args.chat_template,
                "deterministic": args.deterministic, "prior_source": args.prior_source, "n_val": n_val}
    check_run(args.out, {**identity, "train": dataclasses.asdict(tcfg)})
    model = _load_model(args, mesh)
    train_reqs, test_reqs = _check_tokenised(model, train_reqs, test_reqs, args.skip_invalid, args.chat_template)
    ecfg = train_editor_config(args, model.config)
    if n_val >= len(train_reqs):
        raise SystemExit(f"--n-val {n_val}: needs fewer than the {len(train_reqs)} training requests")
    val_reqs = train_reqs[len(train_reqs) - n_val:]
    train_reqs = train_reqs[:len(train_reqs) - n_val]
    run_meta = {"model_name": model_name(args.model), "dataset": args.dataset, "data": data["data"]["path"],
                "test_data": (data["test_data"] or {}).get("path"), **data["split"], "dtype": args.dtype,
                "residual_dtype": residual, "skip_invalid": args.skip_invalid, "mesh": args.mesh,
                "sharding": args.sharding, "remat": args.remat, "chat_template": args.chat_template, "data_files": data,
                "prior_source": args.prior_source, "n_val": len(val_reqs)}
    print("configuration:", json.dumps({"editor": dataclasses.asdict(ecfg), "train": dataclasses.asdict(tcfg),
                                         **{k: v for k, v in run_meta.items() if k != "data_files"}}, indent=1))
    t0 = time.perf_counter()
    key_prior = None
    if ecfg.needs_prior:        # C0 of the training requests' preserved facts, as evaluate computes it
        key_prior = preserved_gram(model, ecfg, train_reqs, source=args.prior_source, n_edits=args.n_edits,
                                   progress=not args.quiet, chat_template=args.chat_template)
    result = train(model, ecfg, tcfg, encode_split(model.tokenizer, train_reqs, chat_template=args.chat_template),
                   args.out, run_meta=run_meta, identity=identity, model_name=model_name(args.model),
                   progress=not args.quiet, mesh=mesh, remat=args.remat, key_prior=key_prior,
                   metric=DATASET_METRIC[args.dataset],
                   val_split=encode_split(model.tokenizer, val_reqs, chat_template=args.chat_template)
                   if val_reqs else None)
    if not result.n_edits_seen:
        print(f"{args.out} already holds this finished run; its editor is unchanged", file=sys.stderr)
    summary = {"train_seconds_per_edit": result.seconds_per_edit, "compile_seconds": result.compile_seconds,
               "wall_seconds": time.perf_counter() - t0, "editor": str(Path(args.out) / "editor")}
    print(json.dumps(summary, indent=1))
    return summary


def _editor_defaults(args, record):
    """Fills options not given from the editor's training record: the model and whether
    prompts are wrapped in its chat template, and the data and split unless --data
    names other data (then nothing of the training data is kept)."""
    keys = ["model_name", "skip_invalid", "chat_template"]
    if args.data is None:
        keys += ["dataset", "data", "test_data", "n_train", "n_test", "split_seed"]
    for key in keys:
        attr = "model" if key == "model_name" else key
        if getattr(args, attr, None) in (None, False) and record.get(key) is not None:
            setattr(args, attr, record[key])


def _exclude_trained(args, record: dict, data: dict, test_reqs):
    """Test requests without those the editor was trained on, and the overlap record.

    On the editor's own training file the test requests are taken from the complement
    of its training requests (by content hash); on any other data, a test request the
    editor was trained on is an error unless --allow-train-overlap. The overlap count
    always goes to results.json."""
    from .checkpoint import trained_hashes
    from .data import request_hash
    trained = trained_hashes(args.editor)
    info = {"train_overlap": None, "left_out_as_trained": 0,
            "same_file_as_training": data["test_data"] is None
            and data["data"]["sha256"] == record.get("data_sha256")}
    if data["test_data"] is None and record.get("data_sha256") and data["data"]["path"] == record.get("data") \
            and not info["same_file_as_training"]:
        print(f"note: {data['data']['path']} changed since the editor was trained on it (its SHA-256 differs)",
              file=sys.stderr)
    if trained is None:       # an editor saved without its training requests
        print(f"{args.editor}: the editor does not list its training requests; overlap not checked", file=sys.stderr)
        return test_reqs, info
    if info["same_file_as_training"] and not args.allow_train_overlap:
        kept = [r for r in test_reqs if request_hash(r) not in trained]
        info["left_out_as_trained"] = len(test_reqs) - len(kept)
        if len(kept) < len(test_reqs):
            print(f"left out {len(test_reqs) - len(kept)} test request(s) the editor was trained on", file=sys.stderr)
        test_reqs = kept
    overlap = [r for r in test_reqs if request_hash(r) in trained]
    info["train_overlap"] = len(overlap)
    if overlap and not args.allow_train_overlap:
        raise UserError(f"{len(overlap)} of the {len(test_reqs)} test requests were used to train the editor "
                        f"{args.editor} (first: {overlap[0].source}); evaluate on other requests, or pass "
                        "--allow-train-overlap to score them anyway")
    return test_reqs, info


def cmd_evaluate(args) -> dict:
    from .checkpoint import read_editor_record
    from .evaluate import mquake_accuracy, preserved_gram, run_protocol
    from .pipeline import encode_split
    mesh = _scale_setup(args)
    record = read_editor_record(args.editor)
    _editor_defaults(args, record)
    args.model = args.model or "smollm2"
    model = _load_model(args, mesh)
    ecfg, state, record = _load_editor_for(args, model)
    if args.key_memory is not None:     # the solve's key memory is a test-time choice too
        ecfg = dataclasses.replace(ecfg, key_memory=args.key_memory)
    ecfg = dataclasses.replace(ecfg, **{k: getattr(args, k) for k in ("solve", "hypernet") if getattr(args, k)})
    if args.loc_prior is not None:
        if args.loc_prior and not ecfg.key_memory:
            raise SystemExit("--loc-prior NU starts the key memory at NU C0: it needs --key-memory MU > 0")
        ecfg = dataclasses.replace(ecfg, loc_prior=args.loc_prior)
    if args.null_space is not None:
        ecfg = dataclasses.replace(ecfg, null_space=args.null_space)
    args.prior_source = args.prior_source or record.get("prior_source") or "loc"
    train_reqs, test_reqs, data = _load_data(args)
    test_reqs, overlap = _exclude_trained(args, record, data, test_reqs)
    train_reqs, test_reqs = _check_tokenised(model, train_reqs if ecfg.needs_prior else [], test_reqs,
                                             args.skip_invalid, args.chat_template)
    chat = bool(args.chat_template)
    config = {"editor": dataclasses.asdict(ecfg), "protocol": args.protocol, "num_seq": args.num_seq,
              "n_edits": args.n_edits, "model": args.model, "dataset": args.dataset, "data": args.data,
              "test_data": args.test_data, "n_train": args.n_train, "n_test": args.n_test,
              "split_seed": args.split_seed, "dtype": args.dtype,
              "residual_dtype": model.config.residual_dtype or args.dtype, "editor_dir": str(args.editor),
              "train": record.get("train"), "mesh": args.mesh, "sharding": args.sharding, "remat": args.remat,
              "capture_chunk": args.capture_chunk, "buckets": args.buckets,
              "loc_prior_requests": len(train_reqs) if ecfg.needs_prior else None,
              "prior_source": args.prior_source if ecfg.needs_prior else None, "chat_template": chat,
              "fluency_tokens": args.fluency, "per_request": args.per_request,
              "prob_scores": args.prob_scores if args.prob_scores is not None else
              DATASET_METRIC.get(args.dataset) == "counterfact", **overlap}
    print("configuration:", json.dumps(config, indent=1))
    key_prior, prior_s = None, None
    if ecfg.needs_prior:       # C0 from the training requests' preserved facts, never the test ones
        if not train_reqs:
            raise SystemExit("--loc-prior / --null-space need training requests (the editor's --data split, or "
                             "--data with --test-data) to estimate C0 from")
        t0 = time.perf_counter()
        key_prior = preserved_gram(model, ecfg, train_reqs, source=args.prior_source, n_edits=args.n_edits,
                                   progress=not args.quiet, chat_template=chat)
        prior_s = time.perf_counter() - t0
    if args.dataset == "mquake":
        result = mquake_accuracy(model, ecfg, state, test_reqs, n_cases=args.n_edits * args.num_seq,
                                 progress=not args.quiet, key_prior=key_prior, chat_template=chat)
        out = {"metrics": result, "config": config, "data_files": data}
    else:
        split = encode_split(model.tokenizer, test_reqs, chat_template=chat)
        res = run_protocol(model, ecfg, state, split, protocol=args.protocol, num_seq=args.num_seq,
                           n_edits=args.n_edits, metric=DATASET_METRIC[args.dataset], full_curve=args.full_curve,
                           progress=not args.quiet, mesh=mesh, remat=args.remat, capture_chunk=args.capture_chunk,
                           buckets=args.buckets, key_prior=key_prior, fluency_tokens=args.fluency,
                           prob_scores=args.prob_scores)
        out = {"metrics": res.metrics, "baseline": res.baseline,
               "timing": {"train_seconds_per_edit": record.get("train_seconds_per_edit"),
                          "edit_seconds_per_edit": res.edit_seconds_per_edit,
                          "edit_compile_seconds": res.edit_compile_seconds,
                          "loc_prior_seconds": prior_s},
               "config": config, "n_requests": res.n_requests, "curve": res.curve, "data_files": data}
        _print_table(res.metrics, res.baseline, f"{args.dataset} {args.protocol} {args.num_seq}x{args.n_edits}")
        if args.plot and res.curve:
            plot_curve(res.curve, args.plot, res.baseline)
        if args.per_request:
            from .evaluate import per_request_lines
            Path(args.per_request).parent.mkdir(parents=True, exist_ok=True)
            with open(args.per_request, "w", encoding="utf-8") as f:
                for line in per_request_lines(res, split.requests):
                    f.write(json.dumps(line) + "\n")
            print(f"wrote {args.per_request} ({res.n_requests} requests)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.out)              # never a half-written results file
        print(f"wrote {args.out}")
    return out


def plot_curve(curve: list[dict], path: str, baseline: dict | None = None) -> None:
    """One panel per metric of the curve: its value after each edited batch (over every
    request edited so far), the unedited model's value as a dashed line."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import unit
    names = [k for k in curve[-1] if k != "batches"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    x = [c["batches"] for c in curve]
    for ax, k in zip(axes.flat, names):
        ax.plot(x, [c.get(k, float("nan")) for c in curve], marker="o", label="edited")
        if baseline and k in baseline:
            ax.axhline(baseline[k], color="grey", linestyle="--", label="unedited")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("edited batches", fontsize=8)
        ax.set_ylabel(unit(k), fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _complete(model, prompts: Sequence[str], params, max_new_tokens: int, chat_template: bool = False) -> list[str]:
    from .evaluate import generate
    return generate(model, params, list(prompts), max_new_tokens, chat_template=chat_template, chunk=len(prompts))


def _load_editor_for(args, model):
    """load_editor for --model (refused when the editor was made for another
    architecture); a same-architecture model of another name is named on stderr."""
    from .checkpoint import load_editor
    ecfg, state, record = load_editor(args.editor, model.config, model_name=model_name(args.model))
    made_for = (record.get("model") or {}).get("name") if isinstance(record.get("model"), dict) else None
    if made_for is not None and made_for != model_name(args.model):
        print(f"note: the editor {args.editor} was trained for {made_for}; --model {args.model} has the same "
              "architecture and edited layer shapes", file=sys.stderr)
    return ecfg, state, record


def cmd_edit(args) -> dict:
    import numpy as np

    from .data import EditRequest
    from .evaluate import edit_batch
    from .editor.steps import zero_deltas
    from .models import apply_deltas, save_hf
    from .checkpoint import read_editor_record
    from .pipeline import encode_split
    if args.model is None:        # the model the editor was trained for
        args.model = read_editor_record(args.editor).get("model_name") or "smollm2"
    model = _load_model(args)
    if args.save and model.config.family in ("nnx", "linen"):
        from .errors import UserError
        raise UserError("--save writes a Hugging Face checkpoint; a Flax model's edited parameters are "
                        "models.apply_deltas(model.config, model.params, deltas), to save as you save that model")
    ecfg, state, record = _load_editor_for(args, model)
    chat = bool(args.chat_template or record.get("chat_template"))     # as the editor was trained
    facts = [EditRequest(prompt=p, target_new=t, rephrase=p, loc_prompt=p, loc_answer=t, source=f"--fact {i}")
             for i, (p, t) in enumerate(args.fact)]
    split = encode_split(model.tokenizer, facts, chat_template=chat)
    rows = np.arange(len(facts))
    layout = split.layout([rows])
    deltas, _ = edit_batch(state, model.params, split.batch(rows, layout).edit, zero_deltas(ecfg, model.config),
                           ecfg=ecfg, lcfg=model.config, n_answer=layout.edit.n_answer)
    prompts = [p for p, _ in args.fact] + list(args.prompt or [])
    edited = apply_deltas(model.config, model.params, deltas)
    before = _complete(model, prompts, model.params, args.max_new_tokens, chat)
    after = _complete(model, prompts, edited, args.max_new_tokens, chat)
    for p, b, a in zip(prompts, before, after):
        print(f"{p!r}\n  before: {b!r}\n  after:  {a!r}")
    if args.save:
        save_hf(model, args.save, edited)
        print(f"saved the edited model to {args.save}")
    return {"before": before, "after": after}


def cmd_generate(args) -> dict:
    t0 = time.perf_counter()
    model = _load_model(args)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    outs = _complete(model, args.prompt, model.params, args.max_new_tokens, bool(args.chat_template))
    t_gen = time.perf_counter() - t1
    for p, o in zip(args.prompt, outs):
        print(f"{p!r} -> {o!r}")
    print(f"load {t_load:.1f} s, generate {t_gen:.1f} s ({args.max_new_tokens} tokens x {len(args.prompt)} prompts, "
          "first call includes compilation)")
    return {"completions": outs}


def cmd_demo(args) -> dict:
    """Train EMSEdit on the shipped demo data with the embedded model, then evaluate
    sequential editing on held-out requests and print the table: with the paper's ridge
    solve, and (unless --key-memory 0) again with the key memory extension."""
    out = Path(args.out)
    common = ["--model", args.model, "--dataset", "demo", "--n-train", str(args.n_train), "--n-test",
              str(args.n_test), "--split-seed", "0"]
    if args.quiet:
        common.append("--quiet")
    main(["train", *common, "--out", str(out), "--epochs", str(args.epochs), "--n-edits", "10", "--num-seq", "10"])
    evaluate = ["evaluate", "--editor", str(out / "editor"), *common, "--num-seq", str(args.num_seq), "--n-edits", "10"]
    result = main([*evaluate, "--out", str(out / "results.json")])
    if args.key_memory:
        print(f"\nthe same editor with key memory {args.key_memory:g} (an extension, see README):")
        result = main([*evaluate, "--key-memory", str(args.key_memory), "--out", str(out / "results_key_memory.json")])
    return result


# ---------------------------------------------------------------- parser
def _add_model(p):
    p.add_argument("--model", default=None, help="embedded model name (smollm2), HF folder or hub id, or "
                   "package.module:factory returning a Model (a Flax model: models.flax_nnx.from_nnx, models.flax_linen.from_linen)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="LLM parameter dtype")
    p.add_argument("--residual-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the residual stream (default: float32; with --dtype bfloat16 every matmul still "
                        "runs in bfloat16); bfloat16 = transformers' all-bfloat16 numerics")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--layer-layout", default=None, choices=["list", "stacked"],
                   help="LLM layers as one tree each (unrolled) or stacked (scanned); default by backend: list on "
                        "CPU, stacked on GPU / TPU")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="folder of JAX's persistent compilation cache (default: $EMSEDIT_JAX_COMPILE_CACHE, else "
                        "~/.cache/emsedit_jax/xla): a later run with the same shapes loads its compiled steps")
    p.add_argument("--no-compile-cache", action="store_true", help="compile everything in this process, cache nothing")
    p.add_argument("--chat-template", action="store_true", default=None,
                   help="wrap every prompt in the tokenizer's chat template (one user turn, then the assistant "
                        "header) for instruct models; default raw prompts (evaluate and edit: as the editor was "
                        "trained)")


def _add_scale(p, capture_chunk: bool = False):
    p.add_argument("--mesh", default=None, metavar="DATA,MODEL",
                   help="device mesh, e.g. 1,4: batch rows split over DATA devices, LLM parameters split over MODEL "
                        "devices as --sharding says (default: one device)")
    p.add_argument("--sharding", default="fsdp", choices=["fsdp", "tp"],
                   help="use of the mesh's MODEL devices: fsdp = fully sharded data parallel (every parameter split "
                        "along the hidden size, batch rows split too; default), tp = tensor parallel (attention heads "
                        "and MLP units split, rows not)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host run: call jax.distributed.initialize first (TPU pods, SLURM, Open MPI)")
    p.add_argument("--remat", action="store_true", help="recompute LLM layer activations in the backward pass "
                   "(less memory, more compute)")
    p.add_argument("--solve", default=None, choices=["looped", "batched"],
                   help="ridge solves one module at a time or batched (default by backend: looped on CPU)")
    p.add_argument("--hypernet", default=None, choices=["unrolled", "scanned"],
                   help="hypernetwork blocks one after the other or as a scan (default by backend: unrolled on CPU)")
    p.add_argument("--deterministic", action="store_true",
                   help="GPU: bit-reproducible kernels (XLA's deterministic ops, no autotuning by timing); slower. "
                        "CPU runs are reproducible without it")
    if capture_chunk:
        p.add_argument("--capture-chunk", type=int, default=None, metavar="ROWS",
                       help="capture keys and value gradients in microbatches of ROWS packed rows (less memory; "
                            "same result)")


def _scale_setup(args):
    """Starts multi-host JAX if asked (before anything touches a device), then builds
    the --mesh mesh (None without one)."""
    from .runs import use_deterministic_ops
    from .sharding import maybe_initialize_distributed, mesh_from_spec
    if args.deterministic:
        use_deterministic_ops()
    maybe_initialize_distributed(args.distributed)
    return mesh_from_spec(args.mesh, args.sharding)


def _add_data(p, evaluate: bool = False):
    p.add_argument("--dataset", choices=sorted(DATASET_METRIC), default=None)
    p.add_argument("--data", default=None, help="data file (or hub dataset id)")
    p.add_argument("--test-data", default=None, help="separate test file (else --data is split)")
    p.add_argument("--n-train", type=int, default=None, help="training requests (MQuAKE: cases) of --data")
    p.add_argument("--n-test", type=int, default=None, help="test requests (MQuAKE: cases)")
    if evaluate:
        p.add_argument("--split-seed", type=int, default=None,
                       help="seed of the train/test split of --data (default: the editor's, else 0)")
        p.add_argument("--allow-train-overlap", action="store_true",
                       help="score test requests the editor was trained on (refused by default; the overlap count "
                            "is always in results.json)")
    else:
        p.add_argument("--split-seed", type=int, default=0, help="seed of the train/test split of --data")
    p.add_argument("--skip-invalid", action="store_true", help="skip (and count) invalid records instead of stopping")


LOC_PRIOR_HELP = ("start each stream's key memory at NU C0, C0 the mean k k^T of the keys of the training requests' "
                  "preserved facts (--prior-source): dW = (U^T U + e^lamda I + NU C0 + MU G)^-1 U^T D (needs "
                  "--key-memory; an extension, default 0)")
NULL_SPACE_HELP = ("project every update onto the null space of C0: dW <- (I - V V^T) dW, V the eigenvectors of C0 "
                   "with eigenvalue above TAU times the largest (AlphaEdit's projection; an extension, default 0)")
PRIOR_SOURCE_HELP = ("the preserved facts C0 is estimated from: loc = the training requests' locality prompts "
                     "(default), wide = those and the training requests' prompts and paraphrases with their true "
                     "answers")


def _add_prior(p, train: bool):
    p.add_argument("--loc-prior", type=float, default=None, metavar="NU",
                   help=LOC_PRIOR_HELP if train else "override the editor's locality prior (" + LOC_PRIOR_HELP + ")")
    p.add_argument("--null-space", type=float, default=None, metavar="TAU",
                   help=NULL_SPACE_HELP if train else "override the editor's projection (" + NULL_SPACE_HELP + ")")
    p.add_argument("--prior-source", default="loc" if train else None, choices=["loc", "wide"],
                   help=PRIOR_SOURCE_HELP + ("" if train else "; default: the editor's"))


KEY_MEMORY_HELP = ("ridge solve against the stream's earlier keys: dW = (U^T U + e^lamda I + MU G)^-1 U^T D, "
                   "G = sum of the earlier batches' U^T U (default 0: the paper's solve; an extension)")


def cmd_plan(args) -> dict:
    from .plan import run
    return run(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="emsedit-jax", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="meta-train an editor")
    _add_model(p)
    _add_data(p)
    p.add_argument("--out", required=True, help="run folder (checkpoints/, editor/)")
    p.add_argument("--method", default="emsedit", choices=["emsedit", "mend", "malmen", "rledit"])
    p.add_argument("--modules", default=None, help="comma-separated HF module names to edit")
    p.add_argument("--layers", default=None, help="layer range like 18-23 (with the default module)")
    p.add_argument("--module", default=None, help="module suffix like mlp.up_proj")
    p.add_argument("--steps", type=int, default=None, help="edit steps T (default: emsedit 2, the baselines 1; "
                   "--method malmen --steps 2 is MALMEN²)")
    p.add_argument("--protocol", default="sequential", choices=["sequential", "batch"])
    p.add_argument("--schedule", default="default", choices=["default", "faithful"])
    p.add_argument("--n-edits", type=int, default=10)
    p.add_argument("--num-seq", type=int, default=10)
    p.add_argument("--epochs", type=int, default=None,
                   help="default 1 (on 500 ZsRE requests a second epoch lowered test ES; faithful: 1)")
    p.add_argument("--meta-lr", type=float, default=None, help="default 1e-4 (faithful: 1e-5)")
    p.add_argument("--lr-init", type=float, default=None, help="initial step size eta (default 1e-3; faithful: 1e-6)")
    p.add_argument("--rank", type=int, default=1024)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--beta", type=float, default=None, help="norm regulariser weight (default 1e-2; faithful: 0.5, "
                   "applied squared as in the authors' code)")
    p.add_argument("--msbp", default="detached", choices=["detached", "exact"])
    p.add_argument("--key-memory", type=float, default=None, metavar="MU", help=KEY_MEMORY_HELP)
    _add_prior(p, train=True)
    p.add_argument("--key-positions", default=None, choices=["answer", "subject", "both"],
                   help="where keys and value gradients are taken: answer positions (default, the paper's), the "
                   "subject's last token (answer positions for prompts without the subject) or both (an extension)")
    p.add_argument("--back-depth", type=int, default=None,
                   help="memory backtracking: add the weighted losses of the stream's last N-1 earlier batches "
                   "(default: RLEdit 10, the others 1 = none; for EMSEdit an extension, not the paper's loss)")
    p.add_argument("--select-every", type=int, default=0, metavar="BATCHES",
                   help="hold out the last --n-val training requests and score the editor on them before training "
                   "and every BATCHES batches; keep the best (ES + GS + LS) editor (default 0: none)")
    p.add_argument("--n-val", type=int, default=None, help="held-out training requests for --select-every "
                   "(default: one validation stream or batch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--buckets", type=int, default=1, help="distinct batch shapes to compile: more buckets, less "
                   "padding, more compiles (RLEdit uses 1: its memory stacks batches)")
    _add_scale(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="memory per device and FLOPs per edit of editing and training on a mesh, "
                       "from config.json alone (no weights, no accelerator needed)")
    from .plan import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("evaluate", help="edit held-out requests and score them")
    _add_model(p)
    _add_data(p, evaluate=True)
    p.add_argument("--editor", required=True, help="editor folder written by train")
    p.add_argument("--protocol", default="sequential", choices=["sequential", "batch"])
    p.add_argument("--num-seq", type=int, default=10)
    p.add_argument("--n-edits", type=int, default=10)
    p.add_argument("--full-curve", action="store_true", help="score after every batch")
    p.add_argument("--key-memory", type=float, default=None, metavar="MU",
                   help="override the editor's key memory (" + KEY_MEMORY_HELP + ")")
    _add_prior(p, train=False)
    p.add_argument("--buckets", type=int, default=1, help="distinct edit-batch shapes (less padding, more compiles)")
    p.add_argument("--plot", default=None, help="PNG of every metric's curve over the stream, unedited beside "
                   "(implies --full-curve)")
    p.add_argument("--per-request", default=None, metavar="FILE.jsonl",
                   help="also write one line per edited request: its id, batch and position in the stream, and "
                        "every metric edited and unedited")
    p.add_argument("--fluency", type=int, default=0, metavar="TOKENS",
                   help="also score fluency: n-gram entropy of TOKENS greedily generated tokens on each request's "
                        "generation prompts (the edit prompt when it has none), edited and unedited (default 0: "
                        "off; slow)")
    p.add_argument("--prob-scores", action="store_true", default=None,
                   help="also report ROME's probability scores (efficacy, paraphrase and neighbourhood score and "
                        "magnitude, from whole-target probabilities of the new and true targets; default: on for "
                        "CounterFact, off for the others)")
    p.add_argument("--out", default=None, help="results.json")
    _add_scale(p, capture_chunk=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("edit", help="edit facts and show completions before and after")
    _add_model(p)
    p.add_argument("--editor", required=True)
    p.add_argument("--fact", nargs=2, action="append", required=True, metavar=("PROMPT", "NEW_TARGET"))
    p.add_argument("--prompt", action="append", help="extra prompts to complete before and after")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--save", default=None, help="save the edited model as a Hugging Face folder")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("generate", help="greedy completions of prompts")
    _add_model(p)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="train EMSEdit on the demo data and evaluate sequential editing")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n-train", type=int, default=361)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--num-seq", type=int, default=10)
    p.add_argument("--key-memory", type=float, default=1.0, metavar="MU",
                   help="also evaluate with this key memory (0: only the paper's solve)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None):
    args = build_parser().parse_args(argv)
    if hasattr(args, "compile_cache") and not args.no_compile_cache:
        from .compile_cache import enable
        enable(args.compile_cache)
    if getattr(args, "plot", None):
        args.full_curve = True
    if args.command not in ("evaluate", "edit") and getattr(args, "model", "x") is None:
        args.model = "smollm2"
    return args.func(args)


def console() -> int:
    """Entry point of the `emsedit-jax` script (exit status 0 on success)."""
    main()
    return 0


if __name__ == "__main__":
    sys.exit(console())
