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
from .models.hf_io import CheckpointError


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


def save_editor(directory: Path, ecfg: EditorConfig, state: EditorState, meta: dict[str, Any]) -> Path:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        target = directory / "state"
        if target.exists():
            shutil.rmtree(target)
        ckptr.save(target, {"nets": state.nets, "stats": state.stats})
    record = {"editor": dataclasses.asdict(ecfg), **{k: v for k, v in meta.items() if k != "editor"}}
    (directory / "editor.json").write_text(json.dumps(record, indent=1, default=str))
    return directory


def read_editor_record(directory: str | Path) -> dict[str, Any]:
    """The editor.json of an editor folder; CheckpointError says what is wrong with it."""
    directory = Path(directory).absolute()
    record_file = directory / "editor.json"
    if not record_file.is_file():
        raise CheckpointError(f"{record_file}: missing; is {directory} an editor folder written by "
                              "'emsedit-jax train'?")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{record_file}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("editor"), dict):
        raise CheckpointError(f"{record_file}: expected an object with the editor's configuration under 'editor'")
    return record


def editor_config_of(record: dict[str, Any], record_file: str | Path) -> EditorConfig:
    """The EditorConfig an editor.json describes; CheckpointError names the file."""
    fields = dict(record["editor"])
    known = {f.name for f in dataclasses.fields(EditorConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"{record_file}: 'editor' has unknown field(s) {unknown}")
    if isinstance(fields.get("modules"), list):
        fields["modules"] = tuple(fields["modules"])
    try:
        return EditorConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{record_file}: {e}") from None


def load_editor(directory: str | Path, lcfg) -> tuple[EditorConfig, EditorState, dict[str, Any]]:
    """Reads an editor folder written by `save_editor` (for the model config `lcfg`)."""
    from .editor.steps import init_editor
    directory = Path(directory).absolute()
    record_file = directory / "editor.json"
    record = read_editor_record(directory)
    ecfg = editor_config_of(record, record_file)
    template = init_editor(ecfg, lcfg, jax.random.key(0))
    target = {"nets": template.nets, "stats": template.stats}
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(directory / "state", _abstract(target))
        except ValueError as e:
            raise CheckpointError(f"{directory / 'state'}: the saved arrays do not fit the editor described in "
                             f"{record_file}; for example an editor saved by an emsedit-jax whose hypernetworks were "
                             "stacked arrays 'A', 'B', ... rather than one parameter set per step, which must be "
                             f"retrained: {e}") from e
    restored = _restore_like(target, restored)
    stats = {k: Stats(*v) for k, v in restored["stats"].items()}
    return ecfg, EditorState(restored["nets"], stats, template.key_gram), record
