"""The whole run beside the authors' PyTorch EMSEdit, in one run on this machine.

Both sides get the same work: SmolLM2-135M-Instruct in float32 (the embedded model,
exported as a Hugging Face folder for the PyTorch side), the authors' configuration
(`--preset faithful`: T = 2, rank 1024, their step size, regulariser and schedule) on
`up_proj` of layers 18-23, meta-training on 100 ZsRE training requests as one stream of
10 batches of 10, then editing 100 test requests as a stream of 10 batches of 10 and
scoring ES / GS / LS after the last batch. The requests are this library's split of
`--data` (split seed 0), written in the authors' loader's format.

The authors' side is one process, `main.py` of a checkout given by `--official`, run by
`--official-python` (an interpreter with their requirements: torch, transformers,
hydra-core, omegaconf, swanlab < 0.8); with `model_device=cpu editor_device=cpu` and
swanlab disabled. A small wrapper (this file, `--child`) times their phases from outside
without changing their code: meta-training (their `train_seq`), editing (the capture,
hypernetwork and weight update calls inside `sequential_valid`) and scoring (the rest of
`sequential_valid`). It leaves their GLUE import out when it cannot load (GLUE is off
in this configuration and its modules need an older `datasets`).

This side is `emsedit-jax train ... --evaluate`, one process too, first with an empty
compilation cache and then warm. Rounds alternate the two sides, as the machine's speed
drifts. Per-edit times: the authors' code over all batches (it compiles nothing); this
library's without its first, compiling batch (the process time includes it).

    python experiments/bench_official.py --official ../emsedit --official-python ../emsedit-venv/bin/python
    python experiments/bench_official.py ... --rounds 3 --args "--dtype bfloat16"

Writes experiments/results/bench_official.{json,md} (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYERS = range(18, 24)
OURS = "--preset faithful --layers 18-23 --n-edits 10 --num-seq 10"


# ---------------------------------------------------------------- the authors' process (child)
def child(official: Path, overrides: list[str]) -> None:
    """Runs the authors' main.py with `overrides`, timing its phases; prints
    "RESULT {json}" last. Runs under --official-python: standard library only here."""
    import importlib
    import runpy
    import types
    sys.path.insert(0, str(official))
    os.chdir(official)
    try:
        importlib.import_module("glue_eval.glue_eval")
    except Exception:                       # GLUE is off here; leave it out when it cannot load
        stub = types.ModuleType("glue_eval.glue_eval")
        stub.GLUEEval = None
        sys.modules["glue_eval.glue_eval"] = stub
    base = importlib.import_module("editor.base")
    emsedit = importlib.import_module("editor.emsedit")
    import swanlab
    clock = {"train_s": 0.0, "valid_s": 0.0, "edit_s": 0.0, "in_valid": False}
    metrics = {}

    def timed(cls, name, key=None):
        fn = getattr(cls, name)

        def wrapper(self, *a, **k):
            t = time.perf_counter()
            try:
                return fn(self, *a, **k)
            finally:
                dt = time.perf_counter() - t
                if key is not None:
                    clock[key] += dt
                elif clock["in_valid"]:
                    clock["edit_s"] += dt
        setattr(cls, name, wrapper)

    for name in ("cache", "predict_param_shifts", "edit_model"):
        timed(base.BaseEditor, name)
    timed(emsedit.EMSEDIT, "train_seq", "train_s")
    valid = base.BaseEditor.sequential_valid

    def sequential_valid(self, *a, **k):
        clock["in_valid"], t = True, time.perf_counter()
        try:
            return valid(self, *a, **k)
        finally:
            clock["in_valid"], clock["valid_s"] = False, clock["valid_s"] + time.perf_counter() - t
    base.BaseEditor.sequential_valid = sequential_valid
    log = swanlab.log

    def log_metrics(data, *a, **k):
        if isinstance(data, dict) and {"ES", "GS", "LS"} <= set(data):
            metrics.update({m: 100 * float(data[m]) for m in ("ES", "GS", "LS")})
        return log(data, *a, **k)
    swanlab.log = log_metrics
    sys.argv = [str(official / "main.py"), *overrides]
    runpy.run_path(str(official / "main.py"), run_name="__main__")
    out = {k: v for k, v in clock.items() if k != "in_valid"}
    out["score_s"] = out["valid_s"] - out["edit_s"]
    print("RESULT " + json.dumps({**out, "metrics": metrics}), flush=True)


# ---------------------------------------------------------------- preparing both sides
def prepare(work: Path, data: str) -> dict:
    """The embedded model as a Hugging Face folder, the split's requests in the
    authors' format, and a config folder naming the model and its edited modules."""
    from emsedit_jax import cli
    from emsedit_jax.models import load_model
    from emsedit_jax.models.hf_io import save_hf

    argv = ["train", "--dataset", "zsre", "--data", data, "--n-train", "100", "--n-test", "100", "--skip-invalid",
            *shlex.split(OURS), "--out", str(work / "unused")]
    args = cli.parse_args(argv)
    train, test, _ = cli._load_data(args)
    model = load_model("smollm2")
    train, test = cli._check_tokenised(model, train, test, True, False)
    if (len(train), len(test)) != (100, 100):
        raise SystemExit(f"{data}: the split left {len(train)} training and {len(test)} test requests, not 100 each")
    hf = work / "smollm2-hf"
    save_hf(model, hf)
    files = {}
    for name, reqs in (("train", train), ("test", test)):
        files[name] = work / f"zsre_{name}.json"
        files[name].write_text(json.dumps([{"src": r.prompt, "rephrase": r.rephrase, "alt": r.target_new,
                                            "ans": r.target_new, "answers": [r.target_true], "loc": r.loc_prompt,
                                            "loc_ans": r.loc_answer, "subject": r.subject} for r in reqs]))
    conf = work / "config" / "model"
    conf.mkdir(parents=True)
    modules = "".join(f"- model.layers.{i}.mlp.up_proj\n" for i in LAYERS)
    (conf / "smollm2.yaml").write_text(f"name_or_path: {hf}\nname: smollm2\nclass_name: AutoModelForCausalLM\n"
                                       f"model_vec_size: {model.config.vocab_size}\nedit_modules:\n{modules}"
                                       "half: False\n")
    return {"config": work / "config", **files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", required=True, help="a checkout of the authors' EMSEdit code (main.py, config/)")
    ap.add_argument("--official-python", default=sys.executable, help="an interpreter with their requirements")
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--args", default="", help="further flags of `emsedit-jax train` (say --dtype bfloat16)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the authors' process then this one, warm cache")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(HERE / "results" / "bench_official"), help="output path without suffix")
    args, rest = ap.parse_known_args()
    official = Path(args.official).resolve()
    if args.child:
        return child(official, rest)
    if not (official / "main.py").is_file() or not (official / "editor" / "emsedit.py").is_file():
        raise SystemExit(f"--official {official}: not a checkout of the authors' EMSEdit (no main.py, editor/)")

    from report import run_timed as run
    from report import write_report
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SWANLAB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = prepare(work, args.data)
        theirs = [args.official_python, str(Path(__file__).resolve()), "--child", "--official", str(official),
                  f"hydra.searchpath=[file://{files['config']}]", "model=smollm2", "editor=emsedit", "dataset=zsre",
                  "model_device=cpu", "editor_device=cpu", "num_seq=10", "dataset.n_edits=10",
                  f"dataset.train_path={files['train']}", f"dataset.valid_path={files['test']}"]

        def ours(i: int, cache: str) -> dict:
            out = work / f"run{i}"
            cmd = [sys.executable, "-m", "emsedit_jax.cli", "train", "--dataset", "zsre", "--data", args.data,
                   "--n-train", "100", "--n-test", "100", "--skip-invalid", "--quiet", "--evaluate", "--out",
                   str(out), "--compile-cache-dir", str(work / "cache"), *shlex.split(OURS), *shlex.split(args.args)]
            wall, _ = run(cmd, env)
            editor = json.loads((out / "editor" / "editor.json").read_text())
            res = json.loads((out / "results.json").read_text())
            return {"code": "emsedit-jax", "cache": cache, "wall_s": wall,
                    "train_s_per_edit": editor["train_seconds_per_edit"],
                    "edit_s_per_edit": res["timing"]["edit_seconds_per_edit"],
                    "metrics": {m: res["metrics"][m] for m in ("ES", "GS", "LS")},
                    "unedited": {m: res["baseline"][m] for m in ("ES", "GS", "LS")}}

        def authors() -> dict:
            wall, out = run(theirs, env, cwd=official)
            found = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
            r = json.loads(found[-1][len("RESULT "):])
            return {"code": "authors' PyTorch", "cache": "-", "wall_s": wall, "train_s_per_edit": r["train_s"] / 100,
                    "edit_s_per_edit": r["edit_s"] / 100, "score_s": r["score_s"], "metrics": r["metrics"]}

        rows.append(ours(0, "empty"))
        print(json.dumps(rows[-1]), flush=True)
        for i in range(args.rounds):
            for one in (authors, lambda: ours(i + 1, "warm")):
                rows.append(one())
                print(json.dumps(rows[-1]), flush=True)

    lines = ["| round | code | compile cache | process s | train s/edit | edit s/edit | ES | GS | LS |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows):
        m = r["metrics"]
        lines.append(f"| {(i + 1) // 2} | {r['code']} | {r['cache']} | {r['wall_s']:.1f} | "
                     f"{r['train_s_per_edit']:.3f} | {r['edit_s_per_edit']:.3f} | {m.get('ES', float('nan')):.2f} | {m.get('GS', float('nan')):.2f} "
                     f"| {m.get('LS', float('nan')):.2f} |")
    # each round's ratio: the authors' process against this one's warm process right after it
    keys = ("wall_s", "train_s_per_edit", "edit_s_per_edit")
    ratios = [{k: a[k] / b[k] for k in keys} for a, b in zip(rows[1::2], rows[2::2])]
    spans = {k: f"{min(r[k] for r in ratios):.2f}-{max(r[k] for r in ratios):.2f}x" for k in keys}
    unedited = rows[0]["unedited"]
    env_line = (f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
                f"train flags: {OURS} {args.args}".strip())
    text = "\n".join([f"## The whole run beside the authors' code ({env_line})", "", *lines, "",
                      f"Unedited model: ES {unedited['ES']:.2f}, GS {unedited['GS']:.2f}, LS {unedited['LS']:.2f}. "
                      "Faster than the authors' code, each round (warm cache): whole process "
                      f"{spans['wall_s']}, training {spans['train_s_per_edit']}, editing {spans['edit_s_per_edit']}."])
    write_report(args.out, text, {"env": env_line, "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
