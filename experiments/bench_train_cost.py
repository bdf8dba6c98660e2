"""Cost of the jitted meta-training step: EMSEdit (norm regulariser) against the same step
with the baselines' KL term (MALMEN² and RLEdit², i.e. method malmen / rledit with T = 2).

Every configuration runs `emsedit_jax.train.train_step` on the same model, the same batch
of `--n-edits` ZsRE requests, T = 2, from zero deltas, and reports:
- compile time: `train_step.lower(...)` (tracing) and `.compile()` (XLA), timed apart;
- step time: median over `--reps` calls of the compiled step after `--warmup` calls,
  and that over the batch size (seconds per edit);
- memory: XLA's own estimate for the compiled step (`memory_analysis()`: temporaries,
  arguments, outputs), and the measured peak: `memory_stats()['peak_bytes_in_use']` on
  a GPU, on CPU the growth of the process's peak resident set (`getrusage` maxrss) from
  just before compiling to after the timed calls. Each configuration runs in its own
  process (`--no-isolate` to run all in one) so peaks and compile caches do not mix.
- the KL term's share of the step, measured by ablation: the same configuration with
  `loc_coef = 0`, for which the objective (statically) skips the locality prompts, i.e.
  the unedited and the edited forward passes on them and the edited pass's backward, for
  the current batch and, for RLEdit, for every batch in its memory; everything else
  (the T-step edit, the paraphrase loss, RLEdit's memory CE terms, the optimiser) stays.
  share = 1 - t(loc_coef = 0) / t(full). The norm regulariser itself is a sum of squares
  of the deltas and costs nothing measurable.
RLEdit² is timed in the steady state of a training stream: its memory holds the
back_depth - 1 (9) previous batches with their weights, as from the 10th batch on.

Models: the embedded `smollm2` (float32) on any backend; with a GPU
(jax.default_backend() == 'gpu', or `--large on`) also a randomly initialised model
with Llama-3-8B's shape in bfloat16 (no weights are read), fed the same token ids.
`--large lower` only traces and lowers the large model's step (abstract parameters, no
memory allocated): a check of that code path on a machine without a GPU.

    python experiments/bench_train_cost.py                  # ~ a few minutes on CPU
    python experiments/bench_train_cost.py --reps 3 --configs emsedit,malmen2
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from emsedit_jax.data import load_requests
from emsedit_jax.editor import memory as mem
from emsedit_jax.editor.config import EditorConfig, default_modules, method_config
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.lapack_threads import limit as limit_lapack_threads
from emsedit_jax.models import ModelConfig, load_model
from emsedit_jax.models.transformer import abstract_params, init_params
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import TrainConfig, make_optimizer, train_step
from report import write_report

# name -> (method, overrides). T = 2 everywhere; "-noKL" are the ablations.
CONFIGS = {
    "emsedit": ("emsedit", {}),
    "malmen2": ("malmen", {}),
    "malmen2-noKL": ("malmen", {"loc_coef": 0.0}),
    "rledit2": ("rledit", {}),
    "rledit2-noKL": ("rledit", {"loc_coef": 0.0}),
}
LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
             "tie_word_embeddings": False}


SLOTS = EditorConfig(modules=("_",), method="rledit").memory_slots     # RLEdit's memory at its default depth


def _tokenizer_and_split(data: str, n_requests: int):
    model = load_model("smollm2")
    reqs = load_requests(data, "zsre", skip_invalid=True).requests[:n_requests]
    return model, encode_split(model.tokenizer, reqs)


def _batches(split, n_edits: int, slots: int):
    """The timed batch and, before it, `slots` earlier batches of its stream, all on one
    layout (identical for every configuration)."""
    rows = [np.arange(i * n_edits, (i + 1) * n_edits) for i in range(slots + 1)]
    layout = split.layout(rows)
    batches = [split.batch(r, layout) for r in rows]
    return batches[-1], batches[:-1], layout


def _peak_bytes():
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process maxrss"


def run_config(name: str, model_kind: str, args) -> dict:
    """Compiles and times one configuration in this process."""
    method, overrides = CONFIGS[name]
    text_model, split = _tokenizer_and_split(args.data, args.n_edits * (SLOTS + 1))
    if model_kind == "smollm2":
        lcfg, params = text_model.config, text_model.params
    else:
        lcfg = ModelConfig.from_hf(LLAMA3_8B)
        if args.large == "lower":
            params = abstract_params(lcfg, jnp.bfloat16)
        else:
            init = jax.jit(functools.partial(init_params, lcfg, dtype=jnp.bfloat16, scale=0.02))
            params = jax.block_until_ready(init(jax.random.key(0)))
    del text_model
    ecfg = method_config(method, default_modules(lcfg), steps=2, rank=args.rank, n_blocks=args.blocks, **overrides)
    tcfg = TrainConfig(n_edits=args.n_edits)
    tx = make_optimizer(tcfg)
    batch, earlier, layout = _batches(split, args.n_edits, SLOTS)
    memory = None
    if ecfg.memory_slots:
        memory = mem.empty_memory(batch, ecfg.memory_slots)
        for n, b in enumerate(earlier[-ecfg.memory_slots:]):
            memory = mem.push(memory, b, n + len(earlier) - ecfg.memory_slots, ecfg.time_decay)
    abstract = args.large == "lower" and model_kind != "smollm2"    # shapes only: nothing allocated
    build = jax.eval_shape if abstract else (lambda f, *a: f(*a))
    state = build(functools.partial(init_editor, ecfg, lcfg), jax.random.key(0))
    opt = build(tx.init, state.nets)
    deltas = build(functools.partial(zero_deltas, ecfg, lcfg))
    statics = {"ecfg": ecfg, "lcfg": lcfg, "tx": tx, "n_answer": layout.n_answer, "remat": args.remat}
    row = {"config": name, "model": model_kind, "method": method, "steps": ecfg.steps,
           "regulariser": ecfg.regulariser, "loc_coef": ecfg.loc_coef, "memory_slots": ecfg.memory_slots,
           "n_edits": args.n_edits, "rank": ecfg.rank, "modules": list(ecfg.modules),
           "tokens": {v: getattr(layout, v).n_rows * getattr(layout, v).row_len for v in ("edit", "rephrase", "loc")}}
    t0 = time.perf_counter()
    lowered = train_step.lower(state.nets, state.stats, opt, params, batch, deltas, memory, **statics)
    row["lower_s"] = time.perf_counter() - t0
    if abstract:
        return row
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    if ma is not None:
        row["xla_temp_bytes"] = int(ma.temp_size_in_bytes)
        row["xla_argument_bytes"] = int(ma.argument_size_in_bytes)
        row["xla_output_bytes"] = int(ma.output_size_in_bytes)
    nets, stats = state.nets, state.stats
    times = []
    for i in range(args.warmup + args.reps):
        t0 = time.perf_counter()
        nets, stats, opt, _, metrics, _ = compiled(nets, stats, opt, params, batch, deltas, memory)
        jax.block_until_ready((nets, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    row["step_s"] = statistics.median(times)
    row["step_s_all"] = times
    row["s_per_edit"] = row["step_s"] / args.n_edits
    row["loss"] = float(metrics["loss"])
    peak, how = _peak_bytes()
    row["peak_bytes"] = peak - (rss0 if how == "process maxrss" else 0)
    row["peak_how"] = how if how != "process maxrss" else "process maxrss growth from compile to end"
    return row


def _isolated(name: str, model_kind: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--one-model", model_kind, "--data", args.data,
           "--n-edits", str(args.n_edits), "--reps", str(args.reps), "--warmup", str(args.warmup),
           "--rank", str(args.rank), "--blocks", str(args.blocks), "--large", args.large]
    if args.remat:
        cmd.append("--remat")
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{name} on {model_kind} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(x):
    return f"{x / 2**20:.0f}" if x is not None else "–"


def table(rows: list[dict], env: str) -> str:
    header = ("| model | config | compile (s) | lower (s) | step (s) | s/edit | vs emsedit | KL share | "
              "XLA temp (MiB) | peak (MiB) |")
    lines = [f"## Meta-training step cost, T = 2 ({env})", "", header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['model']} | {r['config']} | – | {r['lower_s']:.1f} | – | – | – | – | – | – |")
            continue
        base = next((x for x in rows if x["model"] == r["model"] and x["config"] == "emsedit" and "step_s" in x), None)
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else "–"
        share = f"{100 * r['kl_share']:.0f}%" if r.get("kl_share") is not None else "–"
        lines.append(f"| {r['model']} | {r['config']} | {r['compile_s']:.1f} | {r['lower_s']:.1f} | {r['step_s']:.3f} | "
                     f"{r['s_per_edit']:.4f} | {ratio} | {share} | {_mb(r.get('xla_temp_bytes'))} | "
                     f"{_mb(r.get('peak_bytes'))} |")
    return "\n".join(lines)


def main():
    limit_lapack_threads()      # jaxlib's CPU LAPACK at one thread (EMSEDIT_JAX_LAPACK_THREADS overrides)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated from {', '.join(CONFIGS)}")
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--remat", action="store_true", help="recompute activations in the backward pass")
    ap.add_argument("--large", default="auto", choices=["auto", "on", "off", "lower"],
                    help="Llama-3-8B-shaped random model: auto = on with a GPU; lower = trace and lower only")
    ap.add_argument("--skip-small", action="store_true", help="only the large model (with --large on/lower)")
    ap.add_argument("--no-isolate", action="store_true", help="all configurations in this process")
    ap.add_argument("--out", default="experiments/results/bench_train_cost")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--one-model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_config(args.one, args.one_model, args)))
        return
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    models = [] if args.skip_small else ["smollm2"]
    large = args.large
    if large == "auto":
        large = "on" if jax.default_backend() == "gpu" else "off"
        args.large = large
    if large != "off":
        models.append("llama3-8b-shape-bf16")
    rows = []
    for model_kind in models:
        for name in names:
            t0 = time.perf_counter()
            row = run_config(name, model_kind, args) if args.no_isolate else _isolated(name, model_kind, args)
            rows.append(row)
            step = f"step {row['step_s']:.3f} s, compile {row['compile_s']:.1f} s" if "step_s" in row else \
                f"lowered in {row['lower_s']:.1f} s"
            print(f"{model_kind} {name}: {step} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for r in rows:        # KL share by ablation: 1 - t(loc_coef = 0) / t(full)
        abl = next((x for x in rows if x["model"] == r["model"] and x["config"] == r["config"] + "-noKL"), None)
        if abl is not None and "step_s" in r and "step_s" in abl:
            r["kl_share"] = 1.0 - abl["step_s"] / r["step_s"]
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, backend "
           f"{jax.default_backend()}; batch of {args.n_edits} ZsRE requests, rank {args.rank}, median of {args.reps} "
           f"after {args.warmup} warm-up")
    text = table(rows, env)
    write_report(args.out, text, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
