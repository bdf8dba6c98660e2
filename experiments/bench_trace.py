"""What a process pays before its first training step: tracing, lowering and compiling
the jitted training step (`train.train_step`), its first call, then the step itself, for a
preset's configuration on the embedded model.

Tracing and lowering happen in every process (the persistent compilation cache is keyed
by the lowered program); compiling once per machine (`--warm`: each row's process reads
the program from a compilation cache an earlier process of the same row filled, as a
warm `emsedit-jax` process does). The first call is timed apart from the later ones: on
CPU it also builds the runtime of each operation XLA hands to YNNPACK (counted in the
table). Each configuration runs in a fresh process (JAX's caches start empty) on one batch
of `--n-edits` training requests (ZsRE, or CounterFact for the counterfact preset); the
step is timed over `--reps` calls after the first one, its outputs fed back. With `--code
DIR,...` each configuration also runs with another checkout's package first on the path
(say a worktree of an earlier commit), and with `--xla-flags "A;B"` under each of those
XLA_FLAGS settings ('' for none), alternating, so that the rows compare in one run.

    python experiments/bench_trace.py                                     # three presets
    python experiments/bench_trace.py --configs "faithful 18-23" --code .,../old
    python experiments/bench_trace.py --configs "faithful 18-23" --warm --rounds 3 \
        --xla-flags ";--xla_cpu_experimental_ynn_fusion_type=;--xla_cpu_experimental_ynn_fusion_type=individual_dot"

Writes experiments/results/bench_trace.{json,md} (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from report import flags_label, run_with_code, write_report

HERE = Path(__file__).resolve().parent
DATA = {"zsre": "../shared/data/zsre/zsre_mend_train-1k.json",
        "counterfact": "../shared/data/counterfact/counterfact-train.json"}
CONFIGS = "default,faithful 18-23,counterfact"


def measure(spec: str, data: dict[str, str], n_edits: int, reps: int, cache: str | None = None) -> dict:
    """Trace / lower / compile / first call / step seconds of the training step for
    `spec` ("PRESET" or "PRESET FIRST-LAST": the up_proj of those layers), compiled
    programs read from and written to the compilation cache `cache` when given."""
    import jax

    from emsedit_jax.data import load_requests
    from emsedit_jax.editor.steps import init_editor, new_stream, zero_deltas
    from emsedit_jax.evaluate import preserved_gram
    from emsedit_jax.lapack_threads import limit
    from emsedit_jax.models import load_model
    from emsedit_jax.pipeline import encode_split
    from emsedit_jax.train import batch_plan, configs, make_optimizer, train_step

    limit()
    if cache:
        from emsedit_jax import compile_cache
        compile_cache.enable(cache)
    preset, *layers = spec.split()
    model = load_model("smollm2")
    modules = None
    if layers:
        first, last = (int(x) for x in layers[0].split("-"))
        modules = tuple(f"model.layers.{i}.mlp.up_proj" for i in range(first, last + 1))
    ecfg, tcfg = configs(modules, preset=preset, model_cfg=model.config, n_edits=n_edits)
    dataset = "counterfact" if preset == "counterfact" else "zsre"
    requests = load_requests(data[dataset], skip_invalid=True).requests[:n_edits]
    split = encode_split(model.tokenizer, requests)
    prior = preserved_gram(model, ecfg, requests) if ecfg.needs_prior else None
    state = new_stream(ecfg, model.config, init_editor(ecfg, model.config, jax.random.key(0)), prior)
    tx = make_optimizer(tcfg)
    rows = batch_plan(len(split), tcfg)[0][:1]
    layout = split.layouts(rows, buckets=1)[0]
    kw = dict(ecfg=ecfg, lcfg=model.config, tx=tx, n_answer=layout.n_answer, beta_power=tcfg.beta_power,
              **({"protect": state.protect} if state.protect else {}))
    args = (state.nets, state.stats, tx.init(state.nets), model.params, split.batch(rows[0], layout),
            zero_deltas(ecfg, model.config), None, state.key_gram)
    t0 = time.perf_counter()
    traced = train_step.trace(*args, **kw)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    t4 = time.perf_counter()
    first_loss = float(out[4]["loss"])
    times = []
    for _ in range(reps):
        args = (*out[:3], *args[3:])
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return {"config": spec, "steps": ecfg.steps, "modules": f"{ecfg.modules[0]} .. {ecfg.modules[-1]}",
            "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "first_call_s": t4 - t3,
            "step_s": min(times, default=float("nan")),
            "ynn_fusions": (compiled.as_text() or "").count('"kind":"__ynn_fusion"'),
            "first_loss": first_loss, "last_loss": float(out[4]["loss"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=CONFIGS, help="comma-separated 'PRESET' or 'PRESET FIRST-LAST'")
    ap.add_argument("--code", default=".", help="comma-separated folders holding the emsedit_jax package to "
                                                "measure ('.': this checkout)")
    ap.add_argument("--xla-flags", default="", help="';'-separated XLA_FLAGS settings to compare ('' for none; "
                                                     "default: only the environment's)")
    ap.add_argument("--warm", action="store_true", help="time reading each program from a compilation cache that "
                                                        "a first process of the same row filled")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the alternating rows this many times")
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--zsre", default=DATA["zsre"])
    ap.add_argument("--counterfact", default=DATA["counterfact"])
    ap.add_argument("--one", help=argparse.SUPPRESS)          # child process: measure this config
    ap.add_argument("--cache", help=argparse.SUPPRESS)        # child process: the compilation cache
    ap.add_argument("--out", default=str(HERE / "results" / "bench_trace"), help="output path without suffix")
    args = ap.parse_args()
    data = {"zsre": args.zsre, "counterfact": args.counterfact}
    if args.one:
        print("RESULT " + json.dumps(measure(args.one, data, args.n_edits, args.reps, args.cache)), flush=True)
        return

    root = HERE.parent
    flag_sets = args.xla_flags.split(";") if args.xla_flags else [None]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = ["--cache", str(Path(tmp) / "cache")] if args.warm else []
        variants = [(spec.strip(), code, flags) for spec in args.configs.split(",")
                    for code in args.code.split(",") for flags in flag_sets]

        def child(spec: str, code: str, flags: str | None, reps: int) -> dict:
            argv = ["--one", spec, "--n-edits", str(args.n_edits), "--reps", str(reps),
                    "--zsre", data["zsre"], "--counterfact", data["counterfact"], *cache]
            return run_with_code(__file__, argv, code, root, None if flags is None else {"XLA_FLAGS": flags})

        if args.warm:      # fill the cache: each variant compiles once, untimed
            for variant in variants:
                child(*variant, reps=0)
        for r in range(args.rounds):
            for spec, code, flags in variants:
                rows.append({"round": r, "code": code, "xla_flags": flags, **child(spec, code, flags, args.reps)})
                print(json.dumps(rows[-1]), flush=True)
    compile_head = "cache read s" if args.warm else "compile s"
    lines = [f"| config | code | XLA_FLAGS | T | trace s | lower s | {compile_head} | first call s | step s | "
             "YNNPACK ops | first loss | last loss |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['code']} | {flags_label(r['xla_flags'])} | {r['steps']} | "
                     f"{r['trace_s']:.2f} | {r['lower_s']:.2f} | {r['compile_s']:.1f} | {r['first_call_s']:.2f} | "
                     f"{r['step_s']:.3f} | {r['ynn_fusions']} | {r['first_loss']:.7f} | {r['last_loss']:.7f} |")
    env = (f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; batch of "
           f"{args.n_edits}; step: fastest of {args.reps} calls after the first")
    write_report(args.out, f"## Tracing, lowering and compiling the training step ({env})\n\n" + "\n".join(lines),
                 {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
