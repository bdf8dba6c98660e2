"""Seconds per edit of EMSEdit meta-training and editing on the embedded model.

The ZsRE sequential protocol as the CLI runs it: the 500 training requests of the seeded
split in the batches of one epoch of the training plan (batches of `--n-edits`), and the
10 test batches of the 10 x 10 protocol; T edit steps per configuration. The jitted training step
(edit + paraphrase loss + gradient + Adam update) and the jitted edit step (T steps of
capture -> hypernetwork -> ridge solve) cost the same for every batch of one shape, so
each distinct batch layout is timed `--reps` times after its compiling call, and the
s/edit of a run is the mean over its batches (each at its layout's fastest time). Rows compare
`--buckets` (how many layouts the batches are packed in: 1 = one layout padded to the
largest batch), editor configurations (`--configs`: edited layers, hypernetwork rank,
key memory) and the LLM's layer layout (`--param-layouts`: list or stacked, see
emsedit_jax/models/transformer.py) side by side in one run. The training step threads
its donated editor and optimiser state from call to call, as the training loop does.
Each row also gives the matmul FLOPs per edit (counted on the jaxpr, see
emsedit_jax/flops.py), the rate achieved, and the time the same FLOPs would take at this
machine's float32 matmul rate (measured in the same run): the floor. The counted FLOPs
are matmuls only (the key memory's d_in x d_in solves are not in them; a conditional,
should a step hold one, is charged the mean of its branches: `count_flops(cond="mean")`).
A large square matmul runs faster than the step's own (a few hundred token rows against
576- to 1536-wide kernels), so each row also gives a second floor: every matmul of the
step (`flops.dot_census`) run alone at its own shape, `--reps` times, the fastest time
times how often the step runs it; "of floor" is that floor over the step's time, the
share of the step that its matmuls alone would take.

    python experiments/bench_edit_speed.py --data ../shared/data/zsre/zsre_mend_train-1k.json
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import time
from collections import Counter

import jax
import numpy as np

from emsedit_jax.data import load_requests, split_requests
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.evaluate import edit_batch
from emsedit_jax.flops import census_flops, dot_census
from emsedit_jax.lapack_threads import limit as limit_lapack_threads
from emsedit_jax.api import load_model
from emsedit_jax.models.transformer import stack_layers, unstack_layers
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import TrainConfig, batch_plan, make_optimizer, train_step
from report import write_report

CONFIGS = {   # the locality prior only sets where the key memory starts: it costs nothing per edit
    "default: layers 21-29 rank 256 key memory 1 steps 3": dict(layers=range(21, 30), rank=256, key_memory=1.0,
                                                                 steps=3),
    "previous default: layers 27-29 rank 256 key memory 1 steps 3": dict(layers=range(27, 30), rank=256,
                                                                          key_memory=1.0, steps=3),
    "earlier default: layers 18-23 rank 1024 steps 2": dict(layers=range(18, 24), rank=1024, steps=2),
    "counterfact: layers 3-8 rank 256 key memory 1 steps 6 subject keys": dict(
        layers=range(3, 9), rank=256, key_memory=1.0, steps=6, key_positions="subject"),
}


def parse_config(name: str) -> dict:
    """A row's editor configuration: a name from CONFIGS, or 'layers A-B rank R' with an
    optional ' key memory MU', ' steps T' and ' subject keys' (mlp.up_proj of layers A..B;
    T = 2 unless given; keys at the answer positions unless 'subject keys')."""
    if name in CONFIGS:
        return CONFIGS[name]
    m = re.fullmatch(r"layers (\d+)-(\d+) rank (\d+)(?: key memory ([\d.e+-]+))?(?: steps (\d+))?( subject keys)?",
                     name.strip())
    if not m:
        raise SystemExit(f"--configs: {name!r} is neither one of {sorted(CONFIGS)} "
                         "nor 'layers A-B rank R [key memory MU] [steps T] [subject keys]'")
    lo, hi, rank, mu, steps, subject = m.groups()
    return dict(layers=range(int(lo), int(hi) + 1), rank=int(rank), key_memory=float(mu or 0.0),
                steps=int(steps or 2), key_positions="subject" if subject else "answer")


def _timed(fn, reps: int) -> tuple[float, float]:
    """(first call, fastest of the next `reps`) seconds of fn(). The fastest, not the
    median: on a shared machine other work only ever adds time (run-to-run medians
    here varied by up to 30%)."""
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times[0], min(times[1:])


def bench(model, train_split, test_split, name, layers, rank, n_edits, reps, buckets, param_layout, key_memory=0.0,
          steps=2, key_positions="answer"):
    ecfg = EditorConfig(modules=tuple(f"model.layers.{i}.mlp.up_proj" for i in layers), rank=rank, lr_init=1e-3,
                        log_step_size=True, key_memory=key_memory, loc_prior=0.0, steps=steps,
                        key_positions=key_positions)
    tcfg = TrainConfig(n_edits=n_edits, buckets=buckets)
    tx = make_optimizer(tcfg)
    state = init_editor(ecfg, model.config, jax.random.key(0))
    zero = zero_deltas(ecfg, model.config)
    row = {"config": name, "buckets": buckets, "param_layout": param_layout, "n_edits": n_edits}
    params = stack_layers(model.params) if param_layout == "stacked" else unstack_layers(model.params)
    train_batches = batch_plan(len(train_split), tcfg)[0]
    test_batches = [np.arange(i * n_edits, (i + 1) * n_edits) for i in range(10)]
    for kind, split, batches in (("train", train_split, train_batches), ("edit", test_split, test_batches)):
        layouts = split.layouts(batches, buckets=buckets)
        uses = Counter(layouts)
        first = {lay: batches[layouts.index(lay)] for lay in uses}
        compile_s, cost, flops, floor = 0.0, 0.0, 0.0, 0.0
        timed: dict = {}
        for lay, n_uses in uses.items():
            batch = split.batch(first[lay], lay)
            if kind == "train":
                opt = tx.init(state.nets)
                args = (state.nets, state.stats, opt, params, batch, zero, None, state.key_gram)
                kw = dict(ecfg=ecfg, lcfg=model.config, tx=tx, n_answer=lay.n_answer)
                census = dot_census(train_step, *args, cond="mean", **kw)
                # train_step donates the editor and optimiser state: thread them from call
                # to call, as the training loop does.
                carry = [jax.tree.map(jax.numpy.copy, state.nets), state.stats, tx.init(state.nets)]

                def fn(carry=carry, args=args, kw=kw):
                    out = train_step(*carry, *args[3:], **kw)
                    carry[:] = out[:3]
                    return out[3]
            else:
                kw = dict(ecfg=ecfg, lcfg=model.config, n_answer=lay.edit.n_answer)
                census = dot_census(edit_batch, state, params, batch.edit, zero, cond="mean", **kw)
                fn = lambda: edit_batch(state, params, batch.edit, zero, **kw)[0]  # noqa: E731
            t_first, t = _timed(fn, reps)
            compile_s += t_first - t
            cost += n_uses * t
            flops += n_uses * census_flops(census)
            floor += n_uses * sum(dot_seconds(spec, reps, timed) * k for spec, k in census.items())
        steady = cost / len(batches)
        row[f"{kind}_layouts"] = len(uses)
        row[f"{kind}_compile_s"] = compile_s
        row[f"{kind}_s_per_edit"] = steady / n_edits
        row[f"{kind}_gflop_per_edit"] = flops / len(batches) / n_edits / 1e9
        row[f"{kind}_gflops"] = flops / cost / 1e9
        row[f"{kind}_floor_s_per_edit"] = floor / len(batches) / n_edits
        row[f"{kind}_of_floor"] = floor / cost
    return row


def dot_seconds(spec, reps: int, cache: dict) -> float:
    """Seconds of one matmul of the step run alone at its shape (`flops.DotSpec`): the
    fastest of `reps` timings of enough back-to-back calls to take about 20 ms."""
    if spec not in cache:
        k1, k2 = jax.random.split(jax.random.key(1))
        a = jax.random.normal(k1, spec.lhs_shape).astype(spec.lhs_dtype)
        b = jax.random.normal(k2, spec.rhs_shape).astype(spec.rhs_dtype)
        f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, spec.dimension_numbers,
                                                     preferred_element_type=spec.preferred_element_type))
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        jax.block_until_ready(f(a, b))
        n = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                out = f(a, b)
            jax.block_until_ready(out)
            best = min(best, (time.perf_counter() - t0) / n)
        cache[spec] = best
    return cache[spec]


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """This machine's float32 matmul rate: the ceiling the table is compared with."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times) / 1e9


def main():
    limit_lapack_threads()      # jaxlib's CPU LAPACK at one thread (EMSEDIT_JAX_LAPACK_THREADS overrides)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--n-train", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=498)
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--buckets", default="1,3", help="comma-separated bucket counts to compare")
    ap.add_argument("--param-layouts", default="list", help="comma-separated LLM layer layouts to compare: list, stacked "
                    "(see emsedit_jax/models/transformer.py)")
    ap.add_argument("--configs", default=next(iter(CONFIGS)), help="comma-separated configurations: names from CONFIGS or "
                    "'layers A-B rank R [key memory MU] [steps T] [subject keys]'")
    ap.add_argument("--dtypes", default="float32", help="comma-separated LLM parameter dtypes to compare: float32, "
                    "bfloat16 (the residual stream in float32, as the CLI's --dtype bfloat16)")
    ap.add_argument("--out", default="results/bench_edit_speed")
    args = ap.parse_args()
    reqs = load_requests(args.data, skip_invalid=True).requests
    train_reqs, test_reqs = split_requests(reqs, args.n_train, args.n_test, 0)      # as the CLI splits
    rows, train_split = [], None
    for dtype in args.dtypes.split(","):
        model = load_model("smollm2", dtype=dtype)
        if train_split is None:     # the same tokenizer whatever the dtype
            train_split, test_split = (encode_split(model.tokenizer, r) for r in (train_reqs, test_reqs))
        rows += [{**bench(model, train_split, test_split, name, n_edits=args.n_edits, reps=args.reps, buckets=int(k),
                          param_layout=param_layout, **parse_config(name)), "dtype": dtype}
                 for name in args.configs.split(",") for k in args.buckets.split(",")
                 for param_layout in args.param_layouts.split(",")]
    peak = matmul_gflops()
    head = ("| config | dtype | buckets | layers | train s/edit | edit s/edit | train / edit layouts | train compile (s) | "
            "edit compile (s) | train GFLOP/edit | edit GFLOP/edit | train GFLOP/s | edit GFLOP/s | "
            "matmul-bound train s/edit | matmul-bound edit s/edit | own-shape matmuls train s/edit | "
            "own-shape matmuls edit s/edit | train of floor | edit of floor |\n|---|---|---:|---|" + "---:|" * 15)
    lines = [f"| {r['config']} | {r['dtype']} | {r['buckets']} | {r['param_layout']} | {r['train_s_per_edit']:.3f} | {r['edit_s_per_edit']:.3f} | "
             f"{r['train_layouts']} / {r['edit_layouts']} | "
             f"{r['train_compile_s']:.1f} | {r['edit_compile_s']:.1f} | {r['train_gflop_per_edit']:.1f} | "
             f"{r['edit_gflop_per_edit']:.1f} | {r['train_gflops']:.0f} | {r['edit_gflops']:.0f} | "
             f"{r['train_gflop_per_edit'] / peak:.3f} | {r['edit_gflop_per_edit'] / peak:.3f} | "
             f"{r['train_floor_s_per_edit']:.3f} | {r['edit_floor_s_per_edit']:.3f} | {r['train_of_floor']:.0%} | "
             f"{r['edit_of_floor']:.0%} |" for r in rows]
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
           f"backend {jax.default_backend()}; ZsRE, {args.n_train} training requests in batches of {args.n_edits} "
           f"(one epoch's plan), the 10 test batches of the 10 x {args.n_edits} protocol, T as named; each layout's fastest of "
           f"{args.reps} calls after compiling; float32 matmul rate {peak:.0f} GFLOP/s (2048^3); FLOPs: matmuls "
           "counted on the jaxpr")
    table = "\n".join([f"## EMSEdit seconds per edit ({env})", "", head, *lines])
    write_report(args.out, table, {"env": env, "rows": rows})


if __name__ == "__main__":
    main()
