"""What makes a training run and its editor recognisable: content hashes of models and
arrays, the run identity written into a training folder, and the folder's lock.

- `model_identity`: the model an editor is made for (name, hash of its architecture,
  the shapes of the edited layers).
- `tree_sha256`: a checksum of a pytree of arrays (paths, dtypes, shapes and bytes).
- `claim_run`: refuses a training folder that holds a different run, naming the keys
  that differ, and records the identity of a new one.
- `RunLock`: one process at a time writes a training folder; the lock of a process that
  no longer runs is taken over.
- `use_deterministic_ops`: the XLA flags that make GPU runs bit-reproducible.

Reproducibility. On CPU the same command gives a bit-identical editor and the same
metrics in a new process: the split and the batch plan are seeded (split seed 0 by
default), the editor's initialisation comes from the training seed, the LAPACK library
runs on one thread (lapack_threads), XLA's CPU reductions are split by a fixed
partition of the machine's threads, and pytrees order dict keys. Across machines with
other thread counts or instruction sets the last bits may differ. On GPU, XLA's
reductions with atomics and its kernel autotuning (which times candidates) can differ
from one process to the next; `use_deterministic_ops` (CLI: --deterministic) turns on
XLA's deterministic ops and turns autotuning off, at a cost in speed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

__all__ = ["RunError", "config_sha256", "model_identity", "tree_sha256", "identity_diff", "check_run", "claim_run",
           "RunLock", "use_deterministic_ops"]

DETERMINISTIC_XLA_FLAGS = ("--xla_gpu_deterministic_ops=true", "--xla_gpu_autotune_level=0")


def use_deterministic_ops() -> None:
    """Adds DETERMINISTIC_XLA_FLAGS to XLA_FLAGS. It takes effect only if no JAX backend
    has started in this process yet (call it first thing)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in DETERMINISTIC_XLA_FLAGS if f not in flags])


class RunError(UserError):
    """A training folder or editor that does not belong to the run or model asked for."""


def write_json(path: str | Path, obj: Any, **dumps) -> None:
    """Writes `obj` as JSON to `path` through a temporary file renamed into place, so
    the file is either absent, the old one, or whole (never half written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, **dumps))
    os.replace(tmp, path)


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def config_sha256(lcfg) -> str:
    """Hash of a ModelConfig's architecture (the residual dtype, a numerics choice, is
    left out). A Flax model (models.flax_nnx) hashes its own description."""
    from .models.transformer import builtin
    if not builtin(lcfg):
        return _sha256_json(lcfg.architecture())
    fields = dataclasses.asdict(lcfg)
    fields.pop("residual_dtype", None)
    return _sha256_json(fields)


def model_identity(name: str | os.PathLike, lcfg, modules) -> dict[str, Any]:
    """The model an editor is made for: its name, architecture hash and, per edited
    module, the (in, out) shape of its kernel."""
    from .models.transformer import module_shape
    return {"name": str(name), "config_sha256": config_sha256(lcfg),
            "layer_shapes": {m: list(module_shape(lcfg, m)) for m in modules}}


def tree_sha256(tree) -> str:
    """SHA-256 over every leaf of a pytree in key-path order: path, dtype, shape and the
    bytes of the array."""
    import jax
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def identity_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def check_run(folder: str | Path, identity: dict, partial: bool = True) -> dict | None:
    """Compares `identity` with the one recorded in `folder/run.json` (None: no record):
    a RunError names the differing keys. `partial`: only the keys of `identity` are
    compared (a check before everything about the run is known)."""
    folder = Path(folder)
    identity = json.loads(json.dumps(identity, default=str))
    record = folder / "run.json"
    if not record.exists():
        return None
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{record}: unreadable run record ({e}); use another --out folder or delete it") from None
    if partial and isinstance(previous, dict):
        previous = {k: previous.get(k) for k in identity}
    diff = identity_diff(previous, identity) if isinstance(previous, dict) else ["everything"]
    if diff:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise RunError(f"{folder} holds another training run (it differs in {shown}); "
                       "use another --out folder, or delete this one to start over")
    return previous


def claim_run(folder: str | Path, identity: dict) -> dict:
    """Checks `identity` against the one recorded in `folder/run.json` and records it
    when there is none. A folder whose run differs in anything (finished or not) is a
    RunError naming the differing keys. Returns the identity as JSON round-trips it."""
    folder = Path(folder)
    identity = json.loads(json.dumps(identity, default=str))
    record = folder / "run.json"
    if check_run(folder, identity, partial=False) is None:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(record, identity, indent=1, sort_keys=True)
    return identity


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # it exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(folder):` holds `folder/.lock` (pid and host) while the block runs.
    A lock held by a live process is a RunError; one left by a process that has died
    (same host, pid not running) is taken over. A lock from another host cannot be
    checked and is a RunError that says which file to delete."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.file = self.folder / ".lock"

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.file.read_text())
                    pid, host = int(holder["pid"]), str(holder["host"])
                except (OSError, ValueError, KeyError, TypeError):
                    holder, pid, host = None, None, me["host"]
                if pid is not None and host != me["host"]:
                    raise RunError(f"{self.folder} is locked by process {pid} on host {host}; if no run is "
                                   f"writing it, delete {self.file}") from None
                if pid is not None and pid != me["pid"] and _alive(pid):
                    raise RunError(f"{self.folder} is being written by another process (pid {pid}); wait for it "
                                   "or use another --out folder") from None
                self.file.unlink(missing_ok=True)      # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            return self
        raise RunError(f"{self.folder}: cannot take the lock {self.file}")

    def __exit__(self, *exc):
        self.file.unlink(missing_ok=True)
        return False
