"""Checkpoints (Orbax) and the trained-editor artefact.

- `CheckpointStore`: the training run's `CheckpointManager`. Each checkpoint holds the
  hypernetwork parameters, normaliser statistics, optimiser state and the carried
  deltas (a pytree), and a JSON record of the data position and history. The run's
  identity (configs, model, data size) is stored beside it; resuming a different run
  into the same folder is an error.
- `save_editor` / `load_editor`: the final editor, one folder: `editor.json` (every
  resolved setting of the run) and `state/` (parameters and statistics).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from .editor.config import EditorConfig
from .editor.normalizer import Stats
from .editor.steps import EditorState


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _restore_like(target, restored):
    """Restored leaves on the target's tree structure (keeps NamedTuple node types)."""
    return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))


class CheckpointStore:
    def __init__(self, directory: Path, identity: dict[str, Any], max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        ident_file = self.directory / "run.json"
        identity = json.loads(json.dumps(identity))
        if ident_file.exists():
            previous = json.loads(ident_file.read_text())
            if previous != identity:
                diff = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
                raise ValueError(f"{self.directory} holds checkpoints of a different run (differs in {diff}); "
                                 "use another --out folder or delete it")
        else:
            ident_file.write_text(json.dumps(identity, indent=1))
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def save(self, step: int, tree, meta: dict) -> None:
        # The save is asynchronous and writes `meta` later: snapshot it now, so that a
        # caller appending to its history meanwhile cannot change what this step records.
        meta = json.loads(json.dumps(meta))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore_latest(self, target):
        step = self.manager.latest_step()
        if step is None:
            return None
        r = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(target)),
                                                               meta=ocp.args.JsonRestore()))
        return _restore_like(target, r.state), r.meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def save_editor(directory: Path, ecfg: EditorConfig, state: EditorState, meta: dict[str, Any]) -> Path:
    """Writes the editor folder. In a multi-process run every process calls it (the
    arrays may be split over all of them); process 0 writes editor.json."""
    directory = Path(directory).absolute()
    target = directory / "state"
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
    _barrier(f"emsedit_jax save_editor {directory}")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, {"nets": state.nets, "stats": state.stats})
    if jax.process_index() == 0:
        record = {"editor": dataclasses.asdict(ecfg), **{k: v for k, v in meta.items() if k != "editor"}}
        (directory / "editor.json").write_text(json.dumps(record, indent=1, default=str))
    _barrier(f"emsedit_jax save_editor {directory} done")
    return directory


def load_editor(directory: str | Path, lcfg, mesh=None) -> tuple[EditorConfig, EditorState, dict[str, Any]]:
    """Reads an editor folder written by `save_editor` (for the model config `lcfg`);
    with a `mesh` (`sharding.make_mesh`), the arrays are restored straight onto it."""
    from .editor.steps import init_editor
    directory = Path(directory).absolute()
    record_file = directory / "editor.json"
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file}: missing; is {directory} an editor folder written by "
                                "'emsedit-jax train'?")
    record = json.loads(record_file.read_text())
    fields = dict(record["editor"])
    fields["modules"] = tuple(fields["modules"])
    for speed_only in ("solve", "hypernet"):        # chosen by the backend that loads it
        fields.pop(speed_only, None)
    ecfg = EditorConfig(**fields)
    template = jax.eval_shape(lambda: init_editor(ecfg, lcfg, jax.random.key(0)))
    target = {"nets": template.nets, "stats": template.stats}
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    else:
        from .sharding import editor_shardings
        abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), target,
                                editor_shardings(target, mesh))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(directory / "state", abstract)
        except ValueError as e:
            raise ValueError(f"{directory / 'state'}: the saved arrays do not fit the editor described in "
                             f"{record_file}; for example an editor saved by an emsedit-jax whose hypernetworks were "
                             "stacked arrays 'A', 'B', ... rather than one parameter set per step, which must be "
                             f"retrained: {e}") from e
    restored = _restore_like(target, restored)
    stats = {k: Stats(*v) for k, v in restored["stats"].items()}
    from .editor.steps import empty_key_gram
    return ecfg, EditorState(restored["nets"], stats, empty_key_gram(ecfg, lcfg)), record
