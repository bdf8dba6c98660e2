#!/usr/bin/env python
"""Forward and forward+backward speed of the embedded SmolLM2-135M: JAX against PyTorch.

Both frameworks run the same weights (``load_model("smollm2")`` for JAX, transformers'
``LlamaForCausalLM.from_pretrained(model.path)`` for PyTorch) in the same process on a
batch of random token ids with a full attention mask.

* forward:          logits of every position (B, S, V) in float32.
* forward+backward: loss = mean next-token cross-entropy over all positions; JAX runs
  ``jax.jit(jax.value_and_grad(loss))`` with respect to every parameter, PyTorch runs
  ``zero_grad(); loss.backward()``.

Every JAX timing ends in ``jax.block_until_ready`` on the whole output. The first call of
every case is timed on its own ("first call"; "compile" = first call - steady-state median).
Then all cases run ``--warmup`` untimed and ``--reps`` timed rounds, interleaved (case 1,
case 2, ..., case 1, ...), so that a shared machine whose load changes during the run slows
every row alike; median and min are reported.

PyTorch runs with ``torch.set_num_threads(os.cpu_count())`` unless ``--torch-threads`` says
otherwise; ``--torch-threads 2,1`` adds rows per thread count (the first is the torch/jax
baseline). On an oversubscribed CPU (load average above the core count) PyTorch's OpenMP
threads wait on each other at every op and the multi-threaded rows slow down a lot; the
1-thread row shows what PyTorch does without that effect.

Variants of the JAX model (``--variants``, comma separated), all through the public API:

* ``scan``   the library default: the 30 layers run as one ``jax.lax.scan``.
* ``unroll`` every layer traced separately (``forward(..., edits={i: {} for every layer})``
  makes ``run_layers`` unroll them; no edit is applied).

``--xla-flags`` is appended to ``$XLA_FLAGS`` before JAX starts (e.g.
``--xla-flags=--xla_cpu_experimental_ynn_fusion_type=`` turns the YNNPACK dot
fusions off, leaving XLA's own Eigen dots), so XLA CPU back-end options can be compared
run against run. ``--dtype bfloat16`` adds bfloat16 rows for JAX (PyTorch stays float32).

Usage::

    python experiments/bench_forward.py                       # batch 8 x 32 tokens
    python experiments/bench_forward.py --reps 20 --variants scan,unroll --dtype bfloat16
    python experiments/bench_forward.py --torch-threads 2,1 --xla-flags=--xla_cpu_experimental_ynn_fusion_type=
    python experiments/bench_forward.py --out results/bench_forward   # -> .json and .md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="embedded model name or checkpoint folder")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--reps", type=int, default=10, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=3, help="untimed repetitions after the first call")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 adds JAX bfloat16 rows (PyTorch stays float32)")
    p.add_argument("--variants", default="scan",
                   help="JAX layer-loop variants, comma separated: scan, unroll")
    p.add_argument("--passes", default="forward,forward+backward",
                   help="comma separated: forward, forward+backward")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    p.add_argument("--xla-flags", default="", help="appended to $XLA_FLAGS before JAX starts")
    p.add_argument("--torch-threads", default=None,
                   help="torch.set_num_threads value(s), comma separated; each gets its own PyTorch "
                        "rows, the first is the torch/jax baseline (default os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/bench_forward",
                   help="output stem: writes <out>.json and <out>.md (a .json/.md suffix is dropped)")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = set(args.variants) - {"scan", "unroll"}
    if bad:
        p.error(f"unknown variant(s) {sorted(bad)}; choose from scan, unroll")
    args.passes = [v.strip() for v in args.passes.split(",") if v.strip()]
    bad = set(args.passes) - {"forward", "forward+backward"}
    if bad:
        p.error(f"unknown pass(es) {sorted(bad)}; choose from forward, forward+backward")
    threads = args.torch_threads or str(os.cpu_count())
    args.torch_threads = [int(t) for t in threads.split(",") if t.strip()]
    return args


def first_call(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def round_robin(cases: list[dict], reps: int, warmup: int) -> None:
    """Warm-up and timed calls of every case, interleaved (case 1, case 2, ..., case 1, ...)
    so that a machine whose load changes over time (a shared CPU) slows every case alike.
    Each case's "fn" must block until its result is ready."""
    for _ in range(warmup):
        for c in cases:
            c["fn"]()
    for c in cases:
        c["times_s"] = []
    for _ in range(reps):
        for c in cases:
            t0 = time.perf_counter()
            c["fn"]()
            c["times_s"].append(time.perf_counter() - t0)
    for c in cases:
        c["median_s"] = statistics.median(c["times_s"])
        c["min_s"] = min(c["times_s"])
        c["compile_s"] = max(c["first_s"] - c["median_s"], 0.0)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    from emsedit_jax.lapack_threads import limit as limit_lapack_threads
    limit_lapack_threads()      # jaxlib's CPU LAPACK at one thread (EMSEDIT_JAX_LAPACK_THREADS overrides)
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from emsedit_jax.models import forward, load_model
    from emsedit_jax.models.transformer import layer_params

    torch = transformers = ref = None
    if not args.no_torch:
        import torch
        import transformers
        torch.set_num_threads(args.torch_threads[0])

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    model = load_model(args.model, tokenizer=False)
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    ids_np = rng.integers(0, cfg.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    mask_np = np.ones_like(ids_np)
    ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
    tokens = args.batch * args.seq
    cases: list[dict] = []
    results: dict = {}     # case label -> last output (for the sanity check)

    def jax_loss(params, ids, mask, edits):
        lg = forward(cfg, params, ids, mask, edits=edits)[0]
        logp = jax.nn.log_softmax(lg[:, :-1].astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    # ---- JAX: compile (first call) each case now; time them later, interleaved.
    dtypes = ["float32"] + (["bfloat16"] if args.dtype == "bfloat16" else [])
    for dtype in dtypes:
        params = model.params if dtype == "float32" else jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                                                                       model.params)
        for variant in args.variants:
            edits = {i: {} for i in range(cfg.num_layers)} if variant == "unroll" else None
            for pass_ in args.passes:
                if pass_ == "forward":
                    f = jax.jit(lambda p, i, m, e=edits: forward(cfg, p, i, m, edits=e)[0])
                else:
                    f = jax.jit(jax.value_and_grad(lambda p, i, m, e=edits: jax_loss(p, i, m, e)))
                label = f"jax/{variant}/{dtype}/{pass_}"

                def fn(f=f, params=params, label=label):
                    results[label] = jax.block_until_ready(f(params, ids, mask))
                case = dict(framework="jax", variant=variant, dtype=dtype, pass_=pass_, threads=None, fn=fn)
                case["first_s"] = first_call(fn)
                log(f"{label}: first call {case['first_s']:.2f} s")
                cases.append(case)

    # ---- PyTorch eager on the same weights.
    if torch is not None:
        ref = transformers.LlamaForCausalLM.from_pretrained(model.path, dtype=torch.float32)
        ref.train(False)
        tids, tmask = torch.tensor(ids_np, dtype=torch.long), torch.tensor(mask_np, dtype=torch.long)

        def t_fwd():
            with torch.inference_mode():
                return ref(input_ids=tids, attention_mask=tmask).logits

        def t_step():
            ref.zero_grad(set_to_none=True)
            lg = ref(input_ids=tids, attention_mask=tmask).logits
            loss = torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]).float(),
                                                     tids[:, 1:].reshape(-1))
            loss.backward()
            results["torch/loss"] = loss.item()

        for threads in args.torch_threads:
            for pass_ in args.passes:
                body = t_fwd if pass_ == "forward" else t_step

                def fn(body=body, threads=threads):
                    if torch.get_num_threads() != threads:
                        torch.set_num_threads(threads)
                    body()
                case = dict(framework="torch", variant="eager", dtype="float32", pass_=pass_, threads=threads,
                            fn=fn)
                case["first_s"] = first_call(fn)
                log(f"torch/{threads} threads/{pass_}: first call {case['first_s']:.2f} s")
                cases.append(case)

    log(f"timing {len(cases)} cases: {args.warmup} warm-up + {args.reps} timed rounds, interleaved")
    round_robin(cases, args.reps, args.warmup)

    checks = {}
    key = f"jax/{args.variants[0]}/float32/forward+backward"
    if "torch/loss" in results and key in results:
        jl, jg = results[key]
        w = ref.model.layers[0].mlp.down_proj.weight.grad.numpy().T
        g = np.asarray(layer_params(jg, 0)["mlp"]["down_proj"]["kernel"])
        checks = {"loss_jax": float(jl), "loss_torch": results["torch/loss"],
                  "loss_abs_diff": abs(float(jl) - results["torch/loss"]),
                  "grad_rel_diff_layer0_down_proj": float(np.linalg.norm(g - w) / np.linalg.norm(w))}

    # torch/jax: the median of PyTorch at its first thread count over JAX's, same pass.
    rows = [{k: v for k, v in c.items() if k != "fn"} for c in cases]
    torch_median = {r["pass_"]: r["median_s"] for r in rows
                    if r["framework"] == "torch" and r["threads"] == args.torch_threads[0]}
    for r in rows:
        r["tokens_per_s"] = tokens / r["median_s"]
        t = torch_median.get(r["pass_"])
        r["torch_over_jax"] = (t / r["median_s"]) if (t is not None and r["framework"] == "jax") else None

    env = {
        "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
        "platform": jax.default_backend(), "cpu": cpu_name(), "os_cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "jax": jax.__version__, "jaxlib": __import__("jaxlib").__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version(),
        "model": args.model, "model_path": str(model.path), "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
        "batch": args.batch, "seq": args.seq, "tokens_per_batch": tokens,
        "reps": args.reps, "warmup": args.warmup, "timing": "interleaved round robin",
    }
    if torch is not None:
        env |= {"torch": torch.__version__, "transformers": transformers.__version__,
                "torch_num_threads": args.torch_threads,
                "torch_num_interop_threads": torch.get_num_interop_threads(),
                "torch_attn_implementation": getattr(ref.config, "_attn_implementation", None)}

    md = render(rows, env, checks)
    print(md)
    stem = Path(args.out)
    if stem.suffix in (".json", ".md"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    raw = {"env": env, "checks": checks, "table_md": md,
           "rows": [{("pass" if k == "pass_" else k): v for k, v in r.items()} for r in rows]}
    stem.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    log(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return 0


def render(rows, env, checks) -> str:
    torch_part = ""
    if "torch" in env:
        torch_part = (f", torch {env['torch']} (intra-op threads {env['torch_num_threads']}, "
                      f"{env['torch_num_interop_threads']} inter-op, attention {env['torch_attn_implementation']})")
    load = "/".join(f"{x:.1f}" for x in env["loadavg_before"]), "/".join(f"{x:.1f}" for x in env["loadavg_after"])
    lines = [
        f"## Forward / forward+backward: {env['model']} ({env['num_layers']} layers), "
        f"batch {env['batch']} x {env['seq']} tokens",
        "",
        f"Device: {env['device']} ({env['cpu']}, {env['os_cpu_count']} CPUs, load average "
        f"{load[0]} before / {load[1]} after); jax {env['jax']}{torch_part}; "
        f"XLA_FLAGS={env['XLA_FLAGS'] or '(none)'}; {env['warmup']} warm-up + {env['reps']} timed runs, "
        "interleaved across rows.",
        "",
        "| framework | variant | dtype | pass | compile (s) | first call (s) | median (ms) | min (ms) "
        "| tokens/s | torch/jax |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = "" if r["torch_over_jax"] is None else f"{r['torch_over_jax']:.2f}"
        compile_s = f"{r['compile_s']:.2f}" if r["framework"] == "jax" else "-"
        variant = r["variant"] if r["threads"] is None else f"{r['variant']}, {r['threads']} thr"
        lines.append(f"| {r['framework']} | {variant} | {r['dtype']} | {r['pass_']} | {compile_s} "
                     f"| {r['first_s']:.2f} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} "
                     f"| {r['tokens_per_s']:,.0f} | {ratio} |")
    if checks:
        lines += ["", f"Check: loss jax {checks['loss_jax']:.6f} vs torch {checks['loss_torch']:.6f} "
                      f"(|diff| {checks['loss_abs_diff']:.2e}); layer-0 down_proj gradient relative "
                      f"difference {checks['grad_rel_diff_layer0_down_proj']:.2e}."]
    lines += ["", "torch/jax = PyTorch median (first thread count) / JAX median of the same pass; "
                  "> 1 means JAX is faster. compile = first call - steady-state median."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
