"""Checkpoints (Orbax) and the trained-editor artefact.

- `CheckpointStore`: the training run's `CheckpointManager`. Each checkpoint holds the
  hypernetwork parameters, normaliser statistics, optimiser state and the carried
  deltas (a pytree), and a JSON record of the data position and history. The run's
  identity (configs, model, data size) is stored beside it; resuming a different run
  into the same folder is an error.
- `save_editor` / `load_editor`: the final editor, one folder: `editor.json` (every
  resolved setting of the run, the model it is made for, a checksum of its arrays),
  `state/` (parameters, statistics and, for an editor trained with a locality prior,
  the C0 it was trained with) and `train_requests.json` (content hashes of the
  requests it was trained on). `load_editor` refuses an editor whose arrays do not match
  their checksum or that was made for a model of another architecture.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from .data.records import file_sha256
from .editor.config import EditorConfig
from .editor.normalizer import Stats
from .editor.steps import EditorState
from .models.hf_io import CheckpointError
from .runs import RunError, model_identity, tree_sha256, write_json


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
                raise RunError(f"{self.directory} holds checkpoints of a different run (differs in {diff}); "
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


TRAIN_REQUESTS = "train_requests.json"


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def save_editor(directory: Path, ecfg: EditorConfig, state: EditorState, meta: dict[str, Any],
                train_hashes: list[str] | None = None) -> Path:
    """Writes the editor folder. `meta` should hold "model" (runs.model_identity); the
    checksum of the arrays is added as "state_sha256", and `train_hashes` (content
    hashes of the training requests, data.request_hash) go to train_requests.json. In a
    multi-process run every process calls it (the arrays may be split over all of them)
    and process 0 writes the files beside the arrays."""
    from .sharding import to_host
    directory = Path(directory).absolute()
    tree = {"nets": state.nets, "stats": state.stats, **({"prior": state.prior} if state.prior else {})}
    target = directory / "state"
    first = jax.process_index() == 0
    if first:
        directory.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
    _barrier(f"emsedit_jax save_editor {directory}")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, tree)
        ckptr.wait_until_finished()
    checksum = tree_sha256(to_host(tree))
    if first:
        if train_hashes is not None:
            (directory / TRAIN_REQUESTS).write_text(json.dumps({"hashes": list(train_hashes)}))
        record = {"editor": dataclasses.asdict(ecfg), **{k: v for k, v in meta.items() if k != "editor"},
                  "state_sha256": checksum, "state_files_sha256": _files_sha256(directory / "state"),
                  "has_prior": bool(state.prior)}
        # written last and whole: the folder is complete once editor.json exists
        write_json(directory / "editor.json", record, indent=1, default=str)
    _barrier(f"emsedit_jax save_editor {directory} done")
    return directory


def _files_sha256(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`, by relative path: any changed byte of the
    saved state shows, even one that would not change a restored value."""
    return {f.relative_to(folder).as_posix(): file_sha256(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def read_editor_record(directory: str | Path) -> dict[str, Any]:
    """The editor.json of an editor folder (CheckpointError if missing or unreadable)."""
    directory = Path(directory).absolute()
    record_file = directory / "editor.json"
    if not record_file.is_file():
        raise CheckpointError(f"{record_file}: missing; is {directory} an editor folder written by "
                              "'emsedit-jax train'?")
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{record_file}: not a valid editor record ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("editor"), dict):
        raise CheckpointError(f"{record_file}: not a valid editor record (no 'editor' settings)")
    return record


def trained_hashes(directory: str | Path) -> set[str] | None:
    """Content hashes of the requests an editor was trained on (None for an editor
    saved without them)."""
    f = Path(directory) / TRAIN_REQUESTS
    if not f.is_file():
        return None
    try:
        return set(json.loads(f.read_text())["hashes"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable list of training requests ({e})") from None


def check_model(record: dict, directory, lcfg, model_name: str | None = None) -> None:
    """Refuses an editor made for a model of another architecture (config hash or edited
    layer shapes), naming both models."""
    made_for = record.get("model")
    if not isinstance(made_for, dict) or "config_sha256" not in made_for:
        return
    here = model_identity(model_name or "the given model", lcfg, made_for.get("layer_shapes") or ())
    names = {"config_sha256": "architecture (config hash)", "layer_shapes": "edited layer shapes"}
    what = [names[k] for k in names if made_for.get(k) != here[k]]
    if what:
        raise RunError(f"{directory}: this editor was made for model {made_for.get('name')!r} (config sha256 "
                       f"{str(made_for['config_sha256'])[:12]}), not for {here['name']!r} (config sha256 "
                       f"{here['config_sha256'][:12]}): the {' and the '.join(what)} "
                       f"{'differ' if len(what) > 1 else 'differs'}; pass --model {made_for.get('name')}")


def load_editor(directory: str | Path, lcfg, model_name: str | None = None, mesh=None
                ) -> tuple[EditorConfig, EditorState, dict[str, Any]]:
    """Reads an editor folder written by `save_editor` for the model config `lcfg`
    (`model_name`: how the caller names that model, for messages). Refuses an editor
    made for another architecture and one whose arrays fail their checksum. With a
    `mesh` (`sharding.make_mesh`) the arrays are restored straight onto it
    (`sharding.editor_shardings`); without, onto the default device."""
    from .editor.steps import empty_key_gram, init_editor
    from .sharding import editor_shardings, to_host
    directory = Path(directory).absolute()
    record = read_editor_record(directory)
    record_file = directory / "editor.json"
    check_model(record, directory, lcfg, model_name)
    try:
        fields = dict(record["editor"])
        fields["modules"] = tuple(fields["modules"])
        for speed_only in ("solve", "hypernet"):        # chosen by the backend that loads it
            fields.pop(speed_only, None)
        ecfg = EditorConfig(**fields)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{record_file}: invalid editor settings ({e})") from None
    files = record.get("state_files_sha256")
    if files is not None and _files_sha256(directory / "state") != files:
        raise CheckpointError(f"{directory / 'state'}: the files do not match the checksums in {record_file} "
                              "(they were changed or damaged after training); retrain or restore a copy")
    template = jax.eval_shape(lambda: init_editor(ecfg, lcfg, jax.random.key(0)))
    target = {"nets": template.nets, "stats": template.stats}
    if record.get("has_prior"):      # C0 of an editor trained with a locality prior: the key memory's shapes
        target["prior"] = jax.eval_shape(lambda: empty_key_gram(dataclasses.replace(ecfg, key_memory=1.0), lcfg))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), target)
    else:
        abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), target,
                                editor_shardings(target, mesh))
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(directory / "state", abstract)
        except ValueError as e:
            raise CheckpointError(f"{directory / 'state'}: the saved arrays do not fit the editor described in "
                                  f"{record_file}; for example an editor saved by an emsedit-jax whose hypernetworks "
                                  "were stacked arrays 'A', 'B', ... rather than one parameter set per step, which "
                                  f"must be retrained: {e}") from None
        except Exception as e:    # unreadable or corrupted array files
            raise CheckpointError(f"{directory / 'state'}: cannot read the editor's arrays "
                                  f"({type(e).__name__}: {str(e)[:200]}); the folder is damaged") from None
    restored = _restore_like(target, restored)
    want = record.get("state_sha256")
    if want is not None and tree_sha256(to_host(restored)) != want:
        raise CheckpointError(f"{directory / 'state'}: the arrays do not match the checksum in {record_file} "
                              "(the files were changed or damaged after training); retrain or restore a copy")
    stats = {k: Stats(*v) for k, v in restored["stats"].items()}
    state = EditorState(restored["nets"], stats, empty_key_gram(ecfg, lcfg), {}, restored.get("prior", {}))
    return ecfg, state, record
