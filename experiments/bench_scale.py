"""Scaling benchmark: seconds per edit of meta-training and editing, memory, and the
LLM's forward + backward FLOP rate against the device's peak (MFU), swept over the
number of edits per batch, device meshes and models.

Each mesh runs in its own subprocess: on CPU it gets DATA x MODEL host devices through
XLA_FLAGS=--xla_force_host_platform_device_count (which must be set before JAX starts);
on GPU/TPU it uses the first DATA x MODEL devices. A row is one (model, mesh, n_edits):

- the editor: the batch protocol's (one hypernetwork shared by the T steps; the library's
  defaults T = 8, rank 256; `--steps`, `--rank`).
- train / edit s/edit: median over `--reps` batches of the jitted meta-training step
  (T edit steps + paraphrase loss + gradient + Adam) and of the edit step (T steps of
  capture -> hypernetwork -> ridge solve), divided by n_edits; each step is compiled ahead
  of time (its compile seconds apart), so a batch of 16k edits runs only its timed calls.
- memory: XLA's compiled footprint of each step (arguments + outputs + temporaries,
  per device) and, where the backend reports it (GPU, TPU), the device's peak bytes in use.
- LLM fwd+bwd: a full forward and backward pass (gradient w.r.t. every parameter, loss
  on every token) over the edit batch's packed rows; FLOPs counted analytically,
  6 * (matmul parameters) * tokens + 12 * layers * row length * heads * head dim * tokens
  (attention scores are computed for the whole row), and on the jaxpr (dot_generals,
  scan bodies times their length); MFU = analytic FLOP/s over the peak of the devices
  used. Peaks: a table of dense tensor-core rates for known GPUs, and on CPU a matmul
  measured in the same process (the forced host devices share the same cores).
- train / edit TFLOP/s: the steps' matmul FLOPs counted on the jaxpr over their time.

Models: `smollm2` (the embedded SmolLM2-135M), `tiny` (a random 4-layer model, for smoke
tests), `llama3-8b` (randomly initialised, Llama-3-8B-shaped, built directly sharded;
use with a GPU). Requests are synthetic token sequences with ZsRE-like lengths (prompts
of 8-16 tokens, targets of 2-5), so no dataset or tokenizer is needed.

    python experiments/bench_scale.py                                   # defaults for the backend
    python experiments/bench_scale.py --models tiny --n-edits 4,16 --meshes 1x1,2x1,1x2 --reps 2
    python experiments/bench_scale.py --models smollm2,llama3-8b --n-edits 10,100,1000,4096 --remat
    python experiments/bench_scale.py --n-edits 1000,4000,16000 --meshes 1x1 --skip-train --capture-chunk 256 --reps 1

Writes experiments/results/bench_scale.{json,md} (or --out) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from report import write_report

HERE = Path(__file__).resolve().parent

# Dense (no sparsity) peak FLOP/s per device by dtype, from the vendors' data sheets.
# float32 matmuls on these GPUs run as TF32 on the tensor cores under JAX's default precision.
GPU_PEAKS = {
    "H200": {"bfloat16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float32": 494e12},     # SXM; PCIe is about 756 / 378
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float32": 60e12},
    "A10G": {"bfloat16": 70e12, "float32": 35e12},
}
CPU_DEFAULTS = {"models": "smollm2", "n_edits": "10,100,400", "meshes": "1x1,2x1,1x2", "dtype": "float32"}
GPU_DEFAULTS = {"models": "smollm2,llama3-8b", "n_edits": "10,100,1000,4096", "meshes": None, "dtype": "bfloat16"}


# ---------------------------------------------------------------- parent: sweep over meshes
def probe_backend() -> tuple[str, int, str]:
    """(platform, device count, device kind) of a fresh process, so that the parent
    never holds accelerator memory itself."""
    code = "import jax, json; d = jax.devices(); print(json.dumps([d[0].platform, len(d), d[0].device_kind]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def default_meshes(platform_: str, n_devices: int) -> str:
    if platform_ == "cpu":
        return CPU_DEFAULTS["meshes"]
    meshes = ["1x1"]
    if n_devices > 1:
        meshes += [f"{n_devices}x1", f"1x{n_devices}"]
    return ",".join(meshes)


def run_mesh(args, mesh: str, platform_: str) -> list[dict]:
    d, m = (int(x) for x in mesh.split("x"))
    env = dict(os.environ)
    if platform_ == "cpu":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={d * m}").strip()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mesh", mesh, "--models", args.models,
               "--n-edits", args.n_edits, "--reps", str(args.reps), "--dtype", args.dtype, "--sharding", args.sharding,
               "--worker-out", str(out)]
        for flag in ("rank", "steps"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag}", str(getattr(args, flag))]
        if args.remat:
            cmd.append("--remat")
        if args.capture_chunk:
            cmd += ["--capture-chunk", str(args.capture_chunk)]
        if args.skip_train:
            cmd.append("--skip-train")
        if args.lm_tokens:
            cmd += ["--lm-tokens", str(args.lm_tokens)]
        print(f"mesh {mesh}: {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, check=False, env=env)
        if proc.returncode != 0:
            print(f"mesh {mesh}: worker failed with status {proc.returncode}", file=sys.stderr)
        return json.loads(out.read_text()) if out.exists() else []


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict]) -> str:
    head = ("| model | dtype | mesh | T | n_edits | tokens | train s/edit | edit s/edit | train compile s | "
            "edit compile s | train mem GB | edit mem GB | peak GB | fwd+bwd TFLOP/s | MFU | train TFLOP/s | "
            "edit TFLOP/s |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['mesh']} | {r['steps']} | {r['n_edits']} | {r['tokens']} | "
            f"{fmt(r.get('train_s_per_edit'), '.3g')} | {fmt(r.get('edit_s_per_edit'), '.3g')} | "
            f"{fmt(r.get('train_compile_s'), '.1f')} | {fmt(r.get('edit_compile_s'), '.1f')} | "
            f"{fmt(r.get('train_mem_gb'), '.3g')} | {fmt(r.get('edit_mem_gb'), '.3g')} | {fmt(r['peak_gb'], '.3g')} | "
            f"{fmt(r.get('lm_tflops'), '.3g')} | {fmt(r.get('mfu'), '.1%')} | {fmt(r.get('train_tflops'), '.3g')} | "
            f"{fmt(r.get('edit_tflops'), '.3g')} |")
    return "\n".join(lines)


def main_parent(args) -> None:
    platform_, n_devices, kind = probe_backend()
    defaults = CPU_DEFAULTS if platform_ == "cpu" else GPU_DEFAULTS
    args.models = args.models or defaults["models"]
    args.n_edits = args.n_edits or defaults["n_edits"]
    args.dtype = args.dtype or defaults["dtype"]
    meshes = args.meshes or default_meshes(platform_, n_devices)
    rows = []
    for mesh in meshes.split(","):
        rows += run_mesh(args, mesh, platform_)
    env = (f"{platform_} ({kind}, {n_devices} device(s) visible), {platform.machine()}, {os.cpu_count()} CPUs, "
           f"python {platform.python_version()}; median of {args.reps} batches, compiled ahead of time; "
           f"remat={args.remat}, capture chunk={args.capture_chunk}")
    peaks = sorted({(r["mesh"], r["dtype"], r["peak_tflops"], r["peak_source"]) for r in rows})
    text = "\n".join([f"## EMSEdit scaling ({env})", "", table(rows), "",
                      "Peak used for MFU: " + "; ".join(f"mesh {m} {dt}: {p:.3g} TFLOP/s ({s})"
                                                        for m, dt, p, s in peaks)])
    write_report(args.out, text, {"env": env, "rows": rows})


# ---------------------------------------------------------------- worker: one mesh
def worker(args) -> None:
    import jax

    d, m = (int(x) for x in args.mesh.split("x"))
    from emsedit_jax import sharding
    mesh = sharding.make_mesh(d, m, strategy=args.sharding)
    args.lm_tokens = args.lm_tokens or (2048 if jax.default_backend() == "cpu" else 16384)
    rows = []
    for name in args.models.split(","):
        model = build_model(name, args.dtype, mesh)
        peak, source = peak_flops(args.dtype, d * m)
        for n in (int(x) for x in args.n_edits.split(",")):
            row = bench_one(model, name, n, args, mesh)
            row.update(mesh=args.mesh, sharding=args.sharding, n_devices=d * m, dtype=args.dtype, peak_tflops=peak / 1e12, peak_source=source,
                       mfu=row["lm_flops_per_s"] / peak if "lm_flops_per_s" in row else None,
                       backend=jax.default_backend())
            rows.append(row)
            print(json.dumps({k: row.get(k) for k in ("model", "mesh", "n_edits", "edit_s_per_edit", "mfu")}), flush=True)
            Path(args.worker_out).write_text(json.dumps(rows, indent=1))
        del model


LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
             "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False}
TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def build_model(name: str, dtype: str, mesh):
    """A Model-like bundle (config, params placed on the mesh)."""
    import types

    import jax
    import jax.numpy as jnp

    from emsedit_jax import sharding
    from emsedit_jax.models import ModelConfig, abstract_params, init_params, load_model
    jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    if name == "smollm2":
        model = load_model("smollm2", dtype=jdtype, tokenizer=False)
        return types.SimpleNamespace(config=model.config,
                                     params=sharding.place_params(model.config, model.params, mesh))
    if name not in ("tiny", "llama3-8b"):
        raise SystemExit(f"unknown model {name!r} (smollm2, tiny, llama3-8b)")
    cfg = ModelConfig.from_hf(TINY if name == "tiny" else LLAMA3_8B)
    scale = 0.2 if name == "tiny" else 0.02
    # Initialised directly into its shards: a 16 GB model never sits on one device.
    shardings = sharding.param_shardings(cfg, abstract_params(cfg, jdtype), mesh)
    init = jax.jit(lambda key: init_params(cfg, key, jdtype, scale), out_shardings=shardings)
    return types.SimpleNamespace(config=cfg, params=init(jax.random.key(0)))


def modules_for(cfg) -> tuple[str, ...]:
    from emsedit_jax.cli import default_modules
    if cfg.num_layers <= 6:
        return tuple(f"model.layers.{i}.mlp.up_proj" for i in range(cfg.num_layers - 2, cfg.num_layers))
    return default_modules(cfg)


def synthetic_split(n: int, vocab: int, seed: int = 0):
    """n requests of random tokens with ZsRE-like lengths, all three views."""
    import numpy as np

    from emsedit_jax.data import TeacherForced
    from emsedit_jax.editor.capture import IGNORE
    from emsedit_jax.pipeline import VIEWS, EncodedSplit
    rng = np.random.default_rng(seed)

    def view():
        p_len, t_len = rng.integers(8, 17, n), rng.integers(2, 6, n)
        s = int((p_len + t_len - 1).max())
        ids = np.zeros((n, s), np.int32)
        labels = np.full((n, s), IGNORE, np.int32)
        for i, (p, t) in enumerate(zip(p_len, t_len)):
            ids[i, :p + t - 1] = rng.integers(2, vocab, p + t - 1)
            labels[i, p - 1:p + t - 1] = rng.integers(2, vocab, t)
        mask = (np.arange(s)[None] < (p_len + t_len - 1)[:, None]).astype(np.int32)
        return TeacherForced(ids, mask, labels, np.full_like(labels, IGNORE), int(t_len.max()), p_len - 1, t_len)

    return EncodedSplit([None] * n, {v: view() for v in VIEWS})


def compile_ahead(jitted, args, **statics):
    """(compiled program, compile seconds, per-device bytes) of jitted(*args(), **statics),
    compiled ahead of time so that a large batch runs only its timed calls. Bytes:
    arguments + outputs + temporaries, less donated buffers reused for outputs (None where
    the backend does not report them); known before the program runs (out of memory)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args(), **statics).compile()
    compile_s = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
        nbytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                     - mem.alias_size_in_bytes)
    except Exception:  # noqa: BLE001  (not every backend reports it)
        nbytes = None
    return compiled, compile_s, nbytes


def timed(compiled, args, reps: int) -> float:
    """Median seconds of `reps` (at least 1) calls compiled(*args()); args() gives fresh
    arguments each call (steps that donate their inputs)."""
    import jax
    times = []
    for _ in range(max(1, reps)):
        a = args()
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*a))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_peak_bytes() -> int | None:
    import jax
    stats = [dev.memory_stats() for dev in jax.local_devices()]
    if not all(stats):
        return None
    return max(s.get("peak_bytes_in_use", 0) for s in stats)


def peak_flops(dtype: str, n_devices: int) -> tuple[float, str]:
    """Peak FLOP/s of the devices a mesh uses: the GPU table, or a CPU matmul measured now."""
    import jax
    import jax.numpy as jnp
    dev = jax.devices()[0]
    if dev.platform == "gpu" or dev.platform == "cuda":
        for key, peaks in GPU_PEAKS.items():
            if key in dev.device_kind:
                return peaks[dtype] * n_devices, f"{dev.device_kind} data sheet x {n_devices}"
    # The forced host devices share the machine's cores: measure the machine once, on one device.
    n = 2048
    x = jax.device_put(jnp.ones((n, n), {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]), dev)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times), f"measured {n}^3 {dtype} matmul on {dev.platform}"


def lm_flops(cfg, tokens: int, row_len: int) -> float:
    """6 * matmul parameters * tokens + attention (QK^T and PV, forward 4 * S * H * Dh per
    token and layer, x3 with the backward)."""
    from emsedit_jax.models import tensor_specs
    matmul = sum(math.prod(s.shape) * cfg.num_layers for path, s in tensor_specs(cfg).items()
                 if s.stacked and path[-1] == "kernel")
    matmul += cfg.vocab_size * cfg.hidden_size          # the LM head (tied or not)
    attn = 12 * cfg.num_layers * row_len * cfg.num_heads * cfg.head_dim
    return 6.0 * matmul * tokens + attn * tokens


def bench_one(model, name: str, n: int, args, mesh) -> dict:
    import jax
    import numpy as np

    from emsedit_jax import sharding
    from emsedit_jax.editor.capture import token_nll
    from emsedit_jax.editor.config import EditorConfig
    from emsedit_jax.editor.steps import init_editor, zero_deltas
    from emsedit_jax.evaluate import edit_batch
    from emsedit_jax.flops import count_flops
    from emsedit_jax.models import forward
    from emsedit_jax.train import TrainConfig, make_optimizer, train_step
    lcfg = model.config
    reps = args.reps
    split = synthetic_split(n * (reps + 1), lcfg.vocab_size, seed=n)
    batches = [np.arange(i * n, (i + 1) * n) for i in range(reps + 1)]
    layout = split.layout(batches)
    data = [split.batch(b, layout) for b in batches]
    # The batch protocol's editor: one hypernetwork shared by its T steps (EditorConfig's
    # defaults: T = 8, rank 256, the key memory), unless --steps / --rank say otherwise. The
    # locality prior only sets where the key memory starts (no cost): it starts empty here.
    ecfg = EditorConfig(modules=modules_for(lcfg), step_specific=False, loc_prior=0.0,
                        **{k: v for k, v in (("rank", args.rank), ("steps", args.steps)) if v is not None})
    state = init_editor(ecfg, lcfg, jax.random.key(0))
    zero = zero_deltas(ecfg, lcfg)
    row = {"model": name, "n_edits": n, "rows": layout.edit.n_rows, "row_len": layout.edit.row_len,
           "tokens": layout.edit.n_rows * layout.edit.row_len, "modules": len(ecfg.modules), "rank": ecfg.rank,
           "steps": ecfg.steps}
    it = iter(range(10 ** 9))

    # The jitted steps themselves, their inputs placed on the mesh (and the mesh set).
    def edit_args():
        return (sharding.place_editor(state, mesh), model.params,
                sharding.place_batch(data[next(it) % len(data)].edit, mesh), sharding.place_deltas(lcfg, zero, mesh))

    def edit_phase():
        statics = {"ecfg": ecfg, "lcfg": lcfg, "n_answer": layout.edit.n_answer, "remat": args.remat,
                   "chunk": args.capture_chunk}
        compiled, compile_s, nbytes = compile_ahead(edit_batch, edit_args, **statics)
        row.update(edit_compile_s=compile_s, edit_mem_gb=_gb(nbytes))
        steady = timed(compiled, edit_args, reps)
        row["edit_s_per_edit"] = steady / n
        edit_flops = count_flops(edit_batch, state, model.params, data[0].edit, zero, ecfg=ecfg, lcfg=lcfg,
                                 n_answer=layout.edit.n_answer)
        row["edit_tflops"] = edit_flops / steady / 1e12

    def train_phase():
        tx = make_optimizer(TrainConfig(n_edits=n))
        statics = {"ecfg": ecfg, "lcfg": lcfg, "tx": tx, "n_answer": layout.n_answer, "remat": args.remat}

        def train_args():
            st = init_editor(ecfg, lcfg, jax.random.key(0))     # fresh: the step donates nets and opt_state
            nets, stats, opt, gram = sharding.place_editor((st.nets, st.stats, tx.init(st.nets), st.key_gram), mesh)
            return (nets, stats, opt, model.params, sharding.place_batch(data[next(it) % len(data)], mesh),
                    sharding.place_deltas(lcfg, zero, mesh), None, gram)

        compiled, compile_s, nbytes = compile_ahead(train_step, train_args, **statics)
        row.update(train_compile_s=compile_s, train_mem_gb=_gb(nbytes))
        steady = timed(compiled, train_args, reps)
        row["train_s_per_edit"] = steady / n
        train_flops = count_flops(train_step, state.nets, state.stats, tx.init(state.nets), model.params, data[0],
                                  zero, None, state.key_gram, ecfg=ecfg, lcfg=lcfg, tx=tx, n_answer=layout.n_answer)
        row["train_tflops"] = train_flops / steady / 1e12

    # The LLM alone: forward + backward over (up to --lm-tokens of) the edit batch's packed rows.
    def lm_loss(params, batch):
        logits, _ = forward(lcfg, params, batch.input_ids, batch.attention_mask, positions=batch.positions,
                            remat=args.remat)
        targets = jax.numpy.roll(batch.input_ids, -1, axis=1)
        return token_nll(logits, targets, batch.attention_mask > 0)

    def lm_phase():
        k = max(1, min(layout.edit.n_rows, args.lm_tokens // layout.edit.row_len))
        lm_batches = [sharding.place_batch(jax.tree.map(lambda x: x[:k], b.edit), mesh) for b in data]
        grad = jax.jit(jax.grad(lm_loss), out_shardings=sharding.param_shardings(lcfg, model.params, mesh))
        lm_args = lambda: (model.params, lm_batches[next(it) % len(lm_batches)])  # noqa: E731
        compiled, compile_s, _ = compile_ahead(grad, lm_args)
        steady = timed(compiled, lm_args, reps)
        tokens = lm_batches[0].input_ids.shape[0] * lm_batches[0].input_ids.shape[1]
        analytic = lm_flops(lcfg, tokens, layout.edit.row_len)
        row.update(lm_s=steady, lm_compile_s=compile_s, lm_tokens=tokens, lm_flops_analytic=analytic,
                   lm_flops_counted=count_flops(jax.grad(lm_loss), model.params, lm_batches[0]),
                   lm_flops_per_s=analytic / steady, lm_tflops=analytic / steady / 1e12)

    for phase, run in (("edit", edit_phase), ("train", train_phase), ("lm", lm_phase)):
        if phase == "train" and args.skip_train:
            continue
        try:
            with sharding.use_mesh(mesh):
                run()
        except Exception as e:  # noqa: BLE001  (out of memory at large n_edits: record it, go on)
            row[f"{phase}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"{name} n_edits={n} {phase}: {row[f'{phase}_error']}", file=sys.stderr, flush=True)
    row["peak_gb"] = _gb(device_peak_bytes())
    return row


def _gb(x):
    return None if x is None else x / 2 ** 30


def main():
    from emsedit_jax.lapack_threads import limit as limit_lapack_threads
    limit_lapack_threads()      # jaxlib's CPU LAPACK at one thread (EMSEDIT_JAX_LAPACK_THREADS overrides)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=None, help="comma-separated: smollm2, tiny, llama3-8b "
                    "(default: smollm2 on CPU, smollm2,llama3-8b on GPU)")
    ap.add_argument("--n-edits", default=None, help="comma-separated batch sizes (default: 10,100,400 on CPU, "
                    "10,100,1000,4096 on GPU)")
    ap.add_argument("--meshes", default=None, help="comma-separated DATAxMODEL meshes, one subprocess each "
                    "(default: 1x1,2x1,1x2 on CPU; 1x1, Nx1, 1xN with N accelerators)")
    ap.add_argument("--reps", type=int, default=3, help="timed batches after the compiling one")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="LLM dtype (default: float32 on CPU, bfloat16 on GPU); the editor is float32")
    ap.add_argument("--rank", type=int, default=None, help="hypernetwork rank (default: EditorConfig's, 256)")
    ap.add_argument("--steps", type=int, default=None,
                    help="edit steps T (default: the batch protocol's, 8)")
    ap.add_argument("--sharding", default="fsdp", choices=["fsdp", "tp"],
                    help="use of each mesh's MODEL devices: fully sharded data parallel or tensor parallel")
    ap.add_argument("--remat", action="store_true", help="recompute LLM activations in the backward passes")
    ap.add_argument("--capture-chunk", type=int, default=None, help="capture in microbatches of this many rows")
    ap.add_argument("--skip-train", action="store_true", help="only the edit step and the LLM pass")
    ap.add_argument("--lm-tokens", type=int, default=None, help="rows of the LLM fwd+bwd pass, in tokens "
                    "(default 16384 on GPU, 2048 on CPU)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_scale"), help="output path without suffix")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mesh", default="1x1", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
