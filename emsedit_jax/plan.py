"""Memory plan of editing and meta-training a model, without its weights or its hardware.

`make_plan` builds the model abstractly from its config.json alone (shapes only), gives
every input of the jitted edit step (`evaluate.edit_batch`) and training step
(`train.train_step`) the sharding that a run on the mesh would give it
(`sharding.param_shardings`, `delta_shardings`, `editor_shardings`, `row_shardings`),
then lowers and compiles both steps for those abstract inputs (`jax.ShapeDtypeStruct`s:
nothing is allocated) and reads XLA's memory analysis of each: bytes per device of
arguments, outputs, temporaries and donated (aliased) buffers. The peak per device is
arguments + outputs + temporaries - aliased. FLOPs per edit are counted on the jaxpr
(flops.count_flops: XLA's cost analysis counts a loop body once).

The mesh is made of the real devices when there are enough of them, else of simulated
CPU devices (`--xla_force_host_platform_device_count`, fixed when JAX starts: the CLI's
`plan` starts itself again with it). XLA's CPU compiler fuses and schedules differently
from the GPU and TPU ones, so on simulated devices the temporaries are an estimate of
the accelerator's; arguments and outputs are exact.

Batches are shaped like the packed batches of a run (pipeline.py): `n_edits` requests
of `seq_len` tokens and `answer_len` answer tokens in each view, laid end to end in rows
of at most 512 tokens (the row length with the fewest positions and answer slots:
pipeline.row_shape), rows padded to a multiple of the mesh's row axes (data x fsdp:
`partition.ROWS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

GiB = 2 ** 30
# Memory of one device (what the runtime reports as its capacity).
DEVICE_MEMORY = {"v5e": 16 * GiB, "v4": 32 * GiB, "v5p": 95 * GiB, "a100-40": 40 * GiB, "a100-80": 80 * GiB,
                 "h100-80": 80 * GiB, "h200": 141 * 10 ** 9}
# Share of a device's memory a plan may use: the rest is left to the runtime, the
# allocator's fragmentation and the difference between XLA's CPU and accelerator plans.
USABLE = 0.9


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / 2 ** 20:.1f} MiB"


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """XLA's memory analysis of one compiled step, bytes per device."""
    step: str                 # "edit" | "train"
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops_per_edit: float
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    mesh: tuple[int, int]
    devices: str              # e.g. "8 simulated cpu devices"
    dtype: str
    n_edits: int
    rows: int                 # packed rows per view
    row_len: int
    steps: tuple[StepPlan, ...]
    device: str | None = None
    sharding: str = "fsdp"    # use of the model axis: fsdp or tp (partition.py)

    def fits(self, device: str | None = None) -> bool | None:
        device = device or self.device
        if device is None:
            return None
        return max(s.peak_bytes for s in self.steps) <= USABLE * DEVICE_MEMORY[device]

    def table(self) -> str:
        how = "" if self.sharding == "fsdp" else f" {self.sharding}"
        lines = [f"{self.model}: mesh {self.mesh[0]}x{self.mesh[1]}{how} ({self.devices}), {self.dtype}, "
                 f"{self.n_edits} edits per batch ({self.rows} rows of {self.row_len} tokens per view)",
                 "| step | arguments | outputs | temporaries | aliased | peak per device | GFLOP per edit "
                 "| compile (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for s in self.steps:
            lines.append(f"| {s.step} | {_size(s.argument_bytes)} | {_size(s.output_bytes)} | {_size(s.temp_bytes)} | "
                         f"{_size(s.alias_bytes)} | {_size(s.peak_bytes)} | {s.flops_per_edit / 1e9:.3g} | "
                         f"{s.compile_seconds:.0f} |")
        if self.device:
            cap = DEVICE_MEMORY[self.device]
            peak = max(s.peak_bytes for s in self.steps)
            lines.append(f"{self.device} ({cap / GiB:.0f} GiB, {USABLE:.0%} usable): "
                         f"{'fits' if self.fits() else 'does NOT fit'} (peak {_size(peak)}, "
                         f"{peak / cap:.0%} of the device)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["steps"] = [{**dataclasses.asdict(s), "peak_bytes": s.peak_bytes} for s in self.steps]
        out["fits"] = self.fits()
        return out


def packed_rows(n_edits: int, seq_len: int, answer_len: int, max_row_len: int, data: int) -> tuple[int, int, int]:
    """(rows, row length, answer slots per row) of `n_edits` sequences of `seq_len`
    tokens with `answer_len` answers each, packed as a run packs them
    (pipeline.row_shape), rows a multiple of `data` (the number of devices rows are
    split over)."""
    import numpy as np

    from .pipeline import row_shape
    rows, row_len, n_answer = row_shape([(np.full(n_edits, seq_len), np.full(n_edits, answer_len))], max_row_len)
    return -(-rows // data) * data, row_len, n_answer


def _abstract(tree, shardings):
    import jax
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def step_inputs(lcfg, ecfg, tcfg, mesh, *, dtype, n_edits: int, seq_len: int = 24, answer_len: int = 4,
                stacked: bool = True) -> dict[str, Any]:
    """Abstract, sharded inputs of both steps (nothing allocated) and their static
    arguments: {"edit": (args, kwargs), "train": (args, kwargs), "rows", "row_len"}."""
    import jax
    import jax.numpy as jnp

    from . import sharding
    from .editor.capture import Batch
    from .partition import n_row_shards
    from .editor.objective import EditBatch, NAnswer
    from .editor.steps import init_editor, zero_deltas
    from .models import abstract_params
    from .train import make_optimizer

    params = abstract_params(lcfg, dtype, stacked=stacked)
    state = jax.eval_shape(lambda: init_editor(ecfg, lcfg, jax.random.key(0)))
    tx = make_optimizer(tcfg)
    opt_state = jax.eval_shape(tx.init, state.nets)
    deltas = jax.eval_shape(lambda: zero_deltas(ecfg, lcfg))
    rows, row_len, n_answer = packed_rows(n_edits, seq_len, answer_len, tcfg.max_row_len,
                                          n_row_shards(dict(mesh.shape)))
    ids = jax.ShapeDtypeStruct((rows, row_len), jnp.int32)
    view = Batch(ids, ids, ids, ids)
    batch = EditBatch(view, view, view)

    params = _abstract(params, sharding.param_shardings(lcfg, params, mesh))
    state = _abstract(state, sharding.editor_shardings(state, mesh))
    opt_state = _abstract(opt_state, sharding.editor_shardings(opt_state, mesh))
    deltas = _abstract(deltas, sharding.delta_shardings(lcfg, deltas, mesh))
    batch = _abstract(batch, sharding.row_shardings(batch, mesh))
    edit = ((state, params, batch.edit, deltas),
            {"ecfg": ecfg, "lcfg": lcfg, "n_answer": n_answer, "remat": False, "chunk": None})
    train = ((state.nets, state.stats, opt_state, params, batch, deltas, None, state.key_gram),
             {"ecfg": ecfg, "lcfg": lcfg, "tx": tx, "n_answer": NAnswer(n_answer, n_answer, n_answer),
              "beta_power": tcfg.beta_power, "only_step": None, "remat": False})
    return {"edit": edit, "train": train, "rows": rows, "row_len": row_len}


def analyse(step: str, fn, args, kwargs, n_edits: int) -> StepPlan:
    """Compiles `fn(*args, **kwargs)` (a jitted step; args abstract or real) and reads
    its memory analysis and FLOPs, under the mesh the arguments are placed on (so the
    step's sharding constraints apply, as in a run)."""
    import jax

    from .flops import count_flops
    from .sharding import use_mesh
    meshes = {getattr(x.sharding, "mesh", None) for x in jax.tree.leaves(args) if getattr(x, "sharding", None)}
    mesh = next((m for m in meshes if isinstance(m, jax.sharding.Mesh)), None)
    t0 = time.perf_counter()
    with use_mesh(mesh):
        compiled = fn.lower(*args, **kwargs).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    flops = count_flops(fn, *args, cond="mean", **kwargs)
    return StepPlan(step, int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes),
                    int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes), flops / n_edits, seconds)


def step_functions():
    from .evaluate import edit_batch
    from .train import train_step
    return {"edit": edit_batch, "train": train_step}


def make_plan(lcfg, mesh, *, model_name: str, dtype: str = "bfloat16", remat: bool = False, n_edits: int = 10,
              protocol: str = "sequential", method: str = "emsedit", rank: int | None = None,
              modules: tuple[str, ...] | None = None, device: str | None = None, seq_len: int = 24,
              answer_len: int = 4, steps: tuple[str, ...] = ("edit", "train"), stacked: bool = True) -> Plan:
    """The memory plan of `lcfg` (a models.ModelConfig) on `mesh` (see the module
    docstring). `modules` default to the CLI's (`editor.config.default_modules`); the
    editor is `method`'s, step-specific for the sequential protocol, as `train` builds it."""
    import jax.numpy as jnp

    from .editor.config import default_modules, method_config
    from .train import TrainConfig
    if device is not None and device not in DEVICE_MEMORY:
        raise ValueError(f"--device {device!r} is not known; choose from {', '.join(DEVICE_MEMORY)}")
    if jnp.dtype(dtype) == jnp.bfloat16 and lcfg.residual_dtype is None:
        lcfg = dataclasses.replace(lcfg, residual_dtype="float32")      # as the CLI loads bfloat16 models
    options = {"step_specific": protocol == "sequential", **({"rank": rank} if rank else {})}
    ecfg = method_config(method, modules or default_modules(lcfg), **options)
    tcfg = TrainConfig(protocol=protocol, n_edits=n_edits)
    inputs = step_inputs(lcfg, ecfg, tcfg, mesh, dtype=dtype, n_edits=n_edits, seq_len=seq_len,
                         answer_len=answer_len, stacked=stacked)
    fns = step_functions()
    out = []
    for step in steps:
        args, kwargs = inputs[step]
        out.append(analyse(step, fns[step], args, {**kwargs, "remat": remat}, n_edits))
    kinds = {d.platform for d in mesh.devices.flat}
    devices = f"{mesh.devices.size} {'/'.join(sorted(kinds))} device(s)"
    shape = dict(mesh.shape)
    model_axis, how = (shape["tensor"], "tp") if shape["tensor"] > 1 else (shape["fsdp"], "fsdp")
    return Plan(model_name, (shape["data"], model_axis), devices, jnp.dtype(dtype).name, n_edits,
                inputs["rows"], inputs["row_len"], tuple(out), device, how)


# ---------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `emsedit-jax plan`."""
    p.add_argument("--model", required=True, help="checkpoint folder (config.json alone is enough), hub id or "
                   "smollm2; only config.json is read")
    p.add_argument("--mesh", default="1,1", metavar="DATA,MODEL", help="device mesh (default 1,1); simulated on "
                   "CPU devices when there are not enough real ones")
    p.add_argument("--sharding", default="fsdp", choices=["fsdp", "tp"],
                   help="use of the mesh's MODEL devices: fully sharded data parallel (default) or tensor parallel")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="parameter dtype (default bfloat16; its residual stream in float32, as the CLI loads it)")
    p.add_argument("--remat", action="store_true", help="recompute LLM layer activations in the backward pass")
    p.add_argument("--n-edits", type=int, default=10, help="requests per edit batch (default 10)")
    p.add_argument("--protocol", default="sequential", choices=["sequential", "batch"],
                   help="sequential: step-specific hypernetworks; batch: one shared (default sequential)")
    p.add_argument("--method", default="emsedit", help="editing method (default emsedit)")
    p.add_argument("--rank", type=int, default=None, help="hypernetwork rank (default: the method's)")
    p.add_argument("--modules", default=None, help="comma-separated HF module names (default: the CLI's)")
    p.add_argument("--device", default=None, choices=sorted(DEVICE_MEMORY),
                   help="say whether the plan fits one device of this kind")
    p.add_argument("--seq-len", type=int, default=24, help="tokens per request and view (default 24)")
    p.add_argument("--answer-len", type=int, default=4, help="answer tokens per request and view (default 4)")
    p.add_argument("--steps", default="edit,train", help="steps to plan: edit, train or both (default edit,train)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON to FILE")


_CHILD = "EMSEDIT_PLAN_ARGS"


def run(args: argparse.Namespace) -> dict:
    """`emsedit-jax plan`: prints the plan's table (and writes --json). When JAX has
    fewer devices than the mesh needs, runs again in a child process with that many
    simulated CPU devices (their count is fixed when JAX starts)."""
    from .errors import UserError
    from .models.hf_io import read_config, resolve
    from .sharding import make_mesh, parse_mesh
    try:
        data, model = parse_mesh(args.mesh)
    except ValueError as e:
        raise UserError(str(e)) from None
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    if not steps or set(steps) - {"edit", "train"}:
        raise UserError(f"--steps takes edit, train or edit,train, not {args.steps!r}")
    cfg, _ = read_config(resolve(args.model, patterns=["config.json"]))
    import jax
    n = data * model
    if len(jax.devices()) < n:
        if os.environ.get(_CHILD):
            raise UserError(f"--mesh {args.mesh}: {n} devices needed, {len(jax.devices())} available")
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        options = {k: v for k, v in vars(args).items() if k != "func"}
        env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **{_CHILD: json.dumps(options)})
        proc = subprocess.run([sys.executable, "-c", "from emsedit_jax.plan import child; child()"], env=env,
                              stdout=subprocess.PIPE, text=True, check=False)
        lines = proc.stdout.rstrip("\n").split("\n")
        if proc.returncode:
            print("\n".join(lines), file=sys.stderr)
            raise SystemExit(proc.returncode)
        print("\n".join(lines[:-1]))
        return json.loads(lines[-1])
    mesh = make_mesh(data, model, strategy=getattr(args, "sharding", "fsdp"))
    modules = tuple(m.strip() for m in args.modules.split(",")) if args.modules else None
    plan = make_plan(cfg, mesh, model_name=str(args.model), dtype=args.dtype, remat=args.remat,
                     n_edits=args.n_edits, protocol=args.protocol, method=args.method, rank=args.rank,
                     modules=modules, device=args.device, seq_len=args.seq_len, answer_len=args.answer_len,
                     steps=steps)
    print(plan.table())
    out = plan.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def child() -> None:
    """The re-started `plan`: its table, then the plan as one JSON line for the parent."""
    out = run(argparse.Namespace(**json.loads(os.environ[_CHILD])))
    print(json.dumps(out))
