"""Seconds per edit of EMSEdit meta-training and editing on the embedded model.

The ZsRE sequential protocol's unit of work: a batch of `--n-edits` requests, T = 2 edit
steps, with the jitted training step (edit + paraphrase loss + gradient + Adam update)
and the jitted edit step (T steps of capture -> hypernetwork -> ridge solve). Compile time
is reported separately; the steady-state figure is the median over `--reps` batches after
warm-up. Several editor configurations can be compared side by side in one run
(`--configs`), e.g. the edited layers or the hypernetwork rank, since both set the cost.
Each row also gives the matmul FLOPs per edit (counted on the jaxpr, see
emsedit_jax/flops.py), the rate achieved, and the time the same FLOPs would take at this
machine's float32 matmul rate (measured in the same run): the floor for this protocol.

    python experiments/bench_edit_speed.py --data ../shared/data/zsre/zsre_mend_train-1k.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from emsedit_jax.data import load_requests
from emsedit_jax.editor.config import EditorConfig
from emsedit_jax.editor.steps import init_editor, zero_deltas
from emsedit_jax.evaluate import edit_batch
from emsedit_jax.flops import count_flops
from emsedit_jax.models import load_model
from emsedit_jax.pipeline import encode_split
from emsedit_jax.train import TrainConfig, make_optimizer, train_step

CONFIGS = {
    "default: layers 18-23 rank 1024": dict(layers=range(18, 24), rank=1024),
    "layers 24-29 rank 1024": dict(layers=range(24, 30), rank=1024),
    "layers 18-23 rank 256": dict(layers=range(18, 24), rank=256),
}


def bench(model, split, name, layers, rank, n_edits, reps):
    ecfg = EditorConfig(modules=tuple(f"model.layers.{i}.mlp.up_proj" for i in layers), rank=rank, lr_init=1e-3)
    tcfg = TrainConfig(n_edits=n_edits)
    tx = make_optimizer(tcfg)
    batches = [np.arange(i * n_edits, (i + 1) * n_edits) for i in range(reps + 2)]
    layout = split.layout(batches)
    state = init_editor(ecfg, model.config, jax.random.key(0))
    opt = tx.init(state.nets)
    zero = zero_deltas(ecfg, model.config)
    train_times, edit_times = [], []
    nets, stats = state.nets, state.stats
    for i, rows in enumerate(batches):
        batch = split.batch(rows, layout)
        t0 = time.perf_counter()
        nets, stats, opt, deltas, m = train_step(nets, stats, opt, model.params, batch, zero, ecfg=ecfg,
                                                 lcfg=model.config, tx=tx, n_answer=layout.n_answer)
        jax.block_until_ready(deltas)
        train_times.append(time.perf_counter() - t0)
    st = state._replace(nets=nets, stats=stats)
    for i, rows in enumerate(batches):
        batch = split.batch(rows, layout)
        t0 = time.perf_counter()
        out, st = edit_batch(st, model.params, batch.edit, zero, ecfg=ecfg, lcfg=model.config,
                             n_answer=layout.edit.n_answer)
        jax.block_until_ready(out)
        edit_times.append(time.perf_counter() - t0)
    batch = split.batch(batches[0], layout)
    flops = {"train": count_flops(train_step, state.nets, state.stats, tx.init(state.nets), model.params, batch,
                                  zero, ecfg=ecfg, lcfg=model.config, tx=tx, n_answer=layout.n_answer),
             "edit": count_flops(edit_batch, state, model.params, batch.edit, zero, ecfg=ecfg, lcfg=model.config,
                                 n_answer=layout.edit.n_answer)}
    row = {"config": name, "n_edits": n_edits, "tokens_per_batch": layout.edit.row_len * layout.edit.n_rows}
    for kind, times in (("train", train_times), ("edit", edit_times)):
        steady = statistics.median(times[2:])
        row[f"{kind}_compile_s"] = times[0] - steady
        row[f"{kind}_s_per_edit"] = steady / n_edits
        row[f"{kind}_gflop_per_edit"] = flops[kind] / n_edits / 1e9
        row[f"{kind}_gflops"] = flops[kind] / steady / 1e9
    return row


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
    return 2 * n ** 3 / statistics.median(times) / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
    ap.add_argument("--n-edits", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from CONFIGS")
    ap.add_argument("--out", default="results/bench_edit_speed")
    args = ap.parse_args()
    model = load_model("smollm2")
    reqs = load_requests(args.data, skip_invalid=True).requests[: args.n_edits * (args.reps + 2)]
    split = encode_split(model.tokenizer, reqs)
    rows = [bench(model, split, name, n_edits=args.n_edits, reps=args.reps, **CONFIGS[name])
            for name in args.configs.split(",")]
    peak = matmul_gflops()
    head = ("| config | train s/edit | edit s/edit | train compile (s) | edit compile (s) | train GFLOP/edit | "
            "edit GFLOP/edit | train GFLOP/s | edit GFLOP/s | matmul-bound train s/edit | matmul-bound edit s/edit |"
            "\n|---|" + "---:|" * 10)
    lines = [f"| {r['config']} | {r['train_s_per_edit']:.3f} | {r['edit_s_per_edit']:.3f} | "
             f"{r['train_compile_s']:.1f} | {r['edit_compile_s']:.1f} | {r['train_gflop_per_edit']:.1f} | "
             f"{r['edit_gflop_per_edit']:.1f} | {r['train_gflops']:.0f} | {r['edit_gflops']:.0f} | "
             f"{r['train_gflop_per_edit'] / peak:.3f} | {r['edit_gflop_per_edit'] / peak:.3f} |" for r in rows]
    env = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
           f"backend {jax.default_backend()}; batch of {args.n_edits} ZsRE requests, T = 2, median of {args.reps}; "
           f"float32 matmul rate {peak:.0f} GFLOP/s (2048^3); FLOPs: matmuls counted on the jaxpr")
    table = "\n".join([f"## EMSEdit seconds per edit ({env})", "", head, *lines])
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
