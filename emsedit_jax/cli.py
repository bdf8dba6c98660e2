"""Command line: `emsedit-jax {demo,train,evaluate,edit,generate,plan}`.

train -> an editor folder (editor.json + state/, checkpoints/ while training);
evaluate -> results.json (metrics, unedited baseline, timing, resolved options);
edit -> greedy completions before and after editing facts, optionally saved as a
Hugging Face checkpoint; plan -> memory per device and FLOPs per edit on a device mesh,
from config.json alone.

Every flag is a field of an option dataclass (EditorConfig, TrainConfig, EvalConfig, or
the groups below) and takes its default and help text from it (`options.add_options`):
adding a flag is adding a field. Every command prints the resolved options it ran with
("configuration:"); `--config FILE` (JSON or YAML) reads them back, flags given beside it
win. Mistakes in what was given (flags, files, data) end with one line and exit status 2
(`--debug` shows the traceback); everything is checked before the model loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Sequence

from .editor.config import EditorConfig, default_modules
from .errors import ConfigError, UserError
from .evaluate import EvalConfig
from .options import CliField, add_options, coerce, expected, option
from .train import PRESETS, TrainConfig

__all__ = ["DATASET_FORMAT", "DATASET_METRIC", "DATASET_PRESET", "build_parser", "console", "dataset_preset",
           "default_modules", "main", "parse_args", "parse_modules"]

# Token accuracy ("zsre") for data whose locality prompts are unrelated facts with their
# own answers (the demo); the logit comparison for CounterFact.
DATASET_METRIC = {"zsre": "zsre", "counterfact": "counterfact", "mquake": "counterfact", "demo": "zsre",
                  "user": "zsre", "knowedit": "zsre"}
DATASET_FORMAT = {"zsre": "zsre", "counterfact": "auto", "mquake": "mquake", "demo": "counterfact", "user": "user",
                  "knowedit": "knowedit"}
# The preset a dataset trains with when --preset is not given (train.PRESETS): keys at the
# subject for CounterFact (experiments/README.md, "Defaults").
DATASET_PRESET = {"counterfact": "counterfact"}
DEFAULT_MODEL = "smollm2"


# ---------------------------------------------------------------- option groups
@dataclasses.dataclass(frozen=True)
class ModelOptions:
    model: str | None = option(None, "embedded model name (smollm2), Hugging Face folder, hub id 'org/name', or "
                               "package.module:factory returning a Model (a Flax model: models.flax_nnx.from_nnx, "
                               "models.flax_linen.from_linen)",
                               default_text=f"{DEFAULT_MODEL}; evaluate, edit, generate: the editor's model")
    dtype: Literal["float32", "bfloat16"] | None = option(
        None, "dtype of the LLM's parameters", default_text="float32; evaluate, edit, generate: the editor's")
    residual_dtype: Literal["float32", "bfloat16"] | None = option(
        None, "dtype of the residual stream (with --dtype bfloat16 every matmul still runs in bfloat16); "
        "bfloat16 = transformers' all-bfloat16 numerics", default_text="float32")
    chat_template: bool | None = option(
        None, "wrap every prompt in the tokenizer's chat template (one user turn, then the assistant header) for "
        "instruct models", default_text="raw prompts; evaluate and edit: as the editor was trained")
    layer_layout: Literal["list", "stacked"] | None = option(
        None, "LLM layers as one tree each (unrolled) or stacked on a layer axis (scanned)",
        default_text="by backend: list on CPU, stacked on GPU / TPU")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    dataset: Literal["zsre", "counterfact", "mquake", "demo", "user", "knowedit"] | None = option(
        None, "format and metric of the data", default_text="evaluate: the editor's; train: required")
    data: str | None = option(None, "data file (or hub dataset id 'org/name')",
                              default_text="the shipped demo data with --dataset demo; evaluate: the editor's")
    test_data: str | None = option(None, "separate test file", default_text="--data is split")
    n_train: int | None = option(None, "training requests (MQuAKE: cases) of --data", check="positive",
                                 default_text="half of --data")
    n_test: int | None = option(None, "test requests (MQuAKE: cases)", check="positive", default_text="the rest")
    split_seed: int | None = option(None, "seed of the train/test split of --data", check="nonneg",
                                    default_text="0; evaluate: the editor's, else 0")
    skip_invalid: bool = option(False, "skip (and count) invalid records instead of stopping")


@dataclasses.dataclass(frozen=True)
class ModuleOptions:
    modules: tuple[str, ...] | None = option(None, "comma-separated Hugging Face names of the linear modules to edit",
                                             default_text="six MLP input projections at 0.6 of the depth")
    layers: str | None = option(None, "layer range like 18-23 (with the default module or --module)")
    module: str | None = option(None, "module suffix like mlp.up_proj (with the default layers or --layers)")
    step_specific: bool | None = option(None, "one hypernetwork per edit step",
                                        default_text="on with --protocol sequential")


@dataclasses.dataclass(frozen=True)
class PriorOptions:
    prior_source: Literal["loc", "wide"] | None = option(
        None, "the preserved facts C0 (--loc-prior, --null-space) is estimated from: loc = the training requests' "
        "locality prompts, wide = those and the training requests' prompts and paraphrases with their true answers",
        default_text="loc; evaluate: the editor's")


@dataclasses.dataclass(frozen=True)
class ScaleOptions:
    mesh: str | None = option(None, "device mesh, e.g. 1,4: batch rows split over DATA devices, LLM parameters "
                              "split over MODEL devices as --sharding says", metavar="DATA,MODEL",
                              default_text="one device")
    sharding: Literal["fsdp", "tp"] = option(
        "fsdp", "use of the mesh's MODEL devices: fsdp = fully sharded data parallel (every parameter split along "
        "the hidden size, batch rows split too), tp = tensor parallel (attention heads and MLP units split, rows not)")
    distributed: bool = option(False, "multi-host run: call jax.distributed.initialize first (TPU pods, SLURM, "
                               "Open MPI)")
    remat: bool = option(False, "recompute LLM layer activations in the backward pass (less memory, more compute)")
    deterministic: bool = option(False, "GPU: bit-reproducible kernels (XLA's deterministic ops, no autotuning by "
                                 "timing); slower. CPU runs are reproducible without it")


@dataclasses.dataclass(frozen=True)
class CommonOptions:
    config: str | None = option(None, "JSON or YAML file of options, e.g. the configuration a run printed or its "
                                "results.json / editor.json; flags given beside it win", metavar="FILE")
    quiet: bool = option(False, "no progress bars")
    compile_cache: bool = option(True, "JAX's persistent compilation cache: a later run with the same shapes loads "
                                 "its compiled steps instead of compiling (--no-compile-cache: compile everything)")
    compile_cache_dir: str | None = option(None, "folder of the compilation cache", metavar="DIR",
                                           default_text="$EMSEDIT_JAX_COMPILE_CACHE, else ~/.cache/emsedit_jax/xla")
    debug: bool = option(False, "show the traceback of errors in the input")


@dataclasses.dataclass(frozen=True)
class TrainRun:
    out: str | None = option(None, "run folder (checkpoints/, editor/)", required=True, default_text="required")
    preset: Literal[tuple(PRESETS)] | None = option(  # type: ignore[valid-type]
        None, "named set of editor and training values under the flags (faithful: the authors' step size, "
        "regulariser, meta learning rate and schedule; counterfact: keys at the subject in the middle layers, "
        "T = 6)", default_text="the dataset's: counterfact for --dataset counterfact, else default")
    n_val: int | None = option(None, "held-out training requests for --select-every", check="positive",
                               default_text="one validation stream or batch")
    evaluate: bool = option(False, "then evaluate the editor in this process, as `evaluate --editor OUT/editor --out "
                            "OUT/results.json` with the protocol, batch size and stream length it was trained "
                            "for (the model loaded once for both)")


@dataclasses.dataclass(frozen=True)
class EvaluateRun:
    editor: str | None = option(None, "editor folder written by train", required=True, default_text="required")
    plot: str | None = option(None, "PNG of every metric's curve over the stream, unedited beside (implies "
                              "--full-curve)", metavar="FILE")
    per_request: str | None = option(None, "also write one line per edited request: its id, batch and position in "
                                     "the stream, and every metric edited and unedited", metavar="FILE.jsonl")
    allow_train_overlap: bool = option(False, "score test requests the editor was trained on (refused otherwise; "
                                       "the overlap count is always in results.json)")
    out: str | None = option(None, "results.json to write", metavar="FILE", default_text="none: print only")


@dataclasses.dataclass(frozen=True)
class EditRun:
    editor: str | None = option(None, "editor folder written by train", required=True, default_text="required")
    fact: list | None = option(None, "a fact to edit (repeatable)", required=True, default_text="required",
                               action="append", nargs=2, metavar=("PROMPT", "NEW_TARGET"))
    subject: list | None = option(None, "the subject of each --fact, in their order (editors with keys at the "
                                  "subject, like CounterFact's, need one per fact)", action="append")
    prompt: list | None = option(None, "extra prompt to complete before and after (repeatable)", action="append")
    max_new_tokens: int = option(8, "tokens to generate per prompt", check="positive")
    save: str | None = option(None, "save the edited model as a Hugging Face folder", metavar="FOLDER")


@dataclasses.dataclass(frozen=True)
class GenerateRun:
    prompt: list | None = option(None, "prompt to complete (repeatable)", required=True, default_text="required",
                                 action="append")
    max_new_tokens: int = option(8, "tokens to generate per prompt", check="positive")
    editor: str | None = option(None, "editor folder: generate with the model it was trained for (no edit)")


@dataclasses.dataclass(frozen=True)
class DemoRun:
    model: str = option(DEFAULT_MODEL, "model to edit")
    out: str = option("runs/demo", "run folder")
    preset: Literal[tuple(PRESETS)] = option("default", "named set of editor and training values")  # type: ignore
    epochs: int | None = option(None, "passes over the training requests", check="positive",
                                default_text="TrainConfig's")
    n_train: int = option(361, "training requests", check="positive")
    n_test: int = option(100, "test requests", check="positive")
    num_seq: int = option(10, "batches of 10 edits in the evaluated stream", check="positive")


# command -> its option groups as (section of the printed configuration, dataclass, fields left out)
TRAIN_EDITOR_SKIP: tuple[str, ...] = ()
COMMANDS: dict[str, tuple[str, list[tuple[str, type, tuple[str, ...]]]]] = {
    "train": ("meta-train an editor", [
        ("model", ModelOptions, ()), ("data", DataOptions, ()), ("editor", ModuleOptions, ()),
        ("editor", EditorConfig, TRAIN_EDITOR_SKIP), ("editor", PriorOptions, ()), ("train", TrainConfig, ()),
        ("scale", ScaleOptions, ()),
        ("run", TrainRun, ()), ("run", CommonOptions, ())]),
    "evaluate": ("edit held-out requests and score them", [
        ("model", ModelOptions, ()), ("data", DataOptions, ()), ("evaluate", EvalConfig, ()),
        ("evaluate", PriorOptions, ()),
        ("scale", ScaleOptions, ()), ("run", EvaluateRun, ()), ("run", CommonOptions, ())]),
    "edit": ("edit facts and show completions before and after", [
        ("model", ModelOptions, ()), ("run", EditRun, ()), ("run", CommonOptions, ())]),
    "generate": ("greedy completions of prompts", [
        ("model", ModelOptions, ()), ("run", GenerateRun, ()), ("run", CommonOptions, ())]),
    "demo": ("train EMSEdit on the demo data and evaluate sequential editing", [
        ("run", DemoRun, ()), ("run", CommonOptions, ("config",))]),
}
NOT_PRINTED = ("config", "debug")
REQUIRED = {"train": ("dataset",)}       # required by a command though optional in the option group


PLAN_HELP = ("memory per device and FLOPs per edit of editing and training on a mesh, from config.json alone "
             "(no weights, no accelerator needed)")


class Parser(argparse.ArgumentParser):
    """The parser, with the derived fields of each command (for --config and the
    printed configuration)."""
    fields: dict[str, dict[str, tuple[str, CliField]]]
    commands: dict[str, argparse.ArgumentParser]


def build_parser() -> Parser:
    ap = Parser(prog="emsedit-jax", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True, metavar="{" + ",".join([*COMMANDS, "plan"]) + "}")
    ap.fields, ap.commands = {}, {}
    for name, (help_text, groups) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        fields = {}
        for section, cls, skip in groups:
            for f in add_options(p, cls, skip=skip, title=f"{section} options ({cls.__name__})"):
                fields.setdefault(f.name, (section, f))
        p.set_defaults(func=globals()[f"cmd_{name}"])
        ap.fields[name], ap.commands[name] = fields, p
    from .plan import add_arguments     # plan: its own flags (plan.add_arguments)
    p = sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP)
    add_arguments(p)
    p.set_defaults(func=cmd_plan)
    ap.fields["plan"], ap.commands["plan"] = {}, p
    return ap


# ---------------------------------------------------------------- parsing
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags of `argv`, over the values of --config FILE and --preset, over the
    dataclass defaults; required options and every value checked."""
    ap = build_parser()
    args = ap.parse_args(argv)
    fields = ap.fields[args.command]
    file_values = read_config_file(args.config, args.command, fields) if getattr(args, "config", None) else {}
    preset = getattr(args, "preset", None) or file_values.get("preset") or dataset_preset(
        getattr(args, "dataset", None) or file_values.get("dataset"),
        getattr(args, "method", None) or file_values.get("method"))
    defaults = {k: v for k, v in PRESETS[preset].items() if k in fields} if "preset" in fields else {}
    defaults.update(file_values)
    if defaults:
        ap.commands[args.command].set_defaults(**defaults)
        args = ap.parse_args(argv)
    missing = [f.flag for _, f in fields.values()
               if (f.required or f.name in REQUIRED.get(args.command, ())) and getattr(args, f.name) is None]
    if missing:
        ap.commands[args.command].error(f"the following arguments are required: {', '.join(missing)}")
    if "preset" in fields:
        args.preset = preset
    if getattr(args, "plot", None):
        args.full_curve = True
    return args


def dataset_preset(dataset: str | None, method: str | None = None) -> str:
    """The preset a run trains with when none is named: DATASET_PRESET's for EMSEdit; the
    baselines keep their papers' setting on every dataset."""
    from .editor.config import parse_method
    if method and parse_method(method)[0] != "emsedit":
        return "default"
    return DATASET_PRESET.get(dataset, "default")


def read_config_file(path: str, command: str, fields: dict[str, tuple[str, CliField]]) -> dict[str, Any]:
    """The options in a JSON or YAML file: a printed configuration ({"command": ...,
    section: {option: value}}), or a results.json / editor.json holding one under
    "config" / "options". Values are checked like flags; an option the command does not
    have is an error unless the file is another command's (then it is ignored)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = file.read_text(encoding="utf-8", errors="replace")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001  (json and yaml errors: reported with the file)
        kind = "YAML" if file.suffix.lower() in (".yaml", ".yml") else "JSON"
        raise ConfigError(f"--config {path}: not valid {kind}: {' '.join(str(e).split())}") from e
    if isinstance(raw, dict) and "command" not in raw:
        raw = next((raw[k] for k in ("config", "options") if isinstance(raw.get(k), dict)), raw)
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected an object of options, got {type(raw).__name__}")
    other_command = raw.get("command") not in (None, command)
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "command":
            continue
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for name, v in items:
            flat[name.replace("-", "_")] = v
    out = {}
    for name, value in flat.items():
        if name not in fields or name in NOT_PRINTED:
            if other_command or name in NOT_PRINTED:
                continue
            raise ConfigError(f"--config {path}: {name!r} is not an option of {command}")
        _, f = fields[name]
        try:
            out[name] = coerce(value, f.hint, f.check)
        except ValueError:
            raise ConfigError(f"--config {path}: {name}: expected {expected(f.hint, f.check)}, "
                              f"got {value!r}") from None
    return out


def resolved_options(args: argparse.Namespace) -> dict[str, Any]:
    """The command's options as printed and saved: {"command": ..., section: {option:
    value}}; `--config` reads it back."""
    out: dict[str, Any] = {"command": args.command}
    for name, (section, _) in build_parser().fields[args.command].items():
        if name not in NOT_PRINTED:
            value = getattr(args, name)
            out.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    return out


def _config(cls, args, **overrides):
    """cls from the parsed options; a ConfigError names the flag instead of the field."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    try:
        return cls(**{**values, **overrides})
    except ConfigError as e:
        message = str(e)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            message = message.replace(f"{cls.__name__}.{f.name}", flag)
        raise ConfigError(message) from e


# ---------------------------------------------------------------- checks before work
def check_writable(path: str | os.PathLike, flag: str, *, folder: bool) -> None:
    """That `path` (a folder, or a file to be written) can be created or written, before
    any work: a file can be created in it (a folder) or in its nearest existing
    ancestor. Nothing is left behind."""
    p = Path(path).expanduser().absolute()
    if p.exists() and folder != p.is_dir():
        raise ConfigError(f"{flag} {path}: " + ("exists and is not a folder" if folder else
                                                 "is a folder, expected a file name"))
    parent = p if p.is_dir() else p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path}: {parent} is a file, so {p.relative_to(parent)} cannot be created")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from None


def model_config(name: str):
    """The ModelConfig of --model from its config.json alone (no weights read); None for
    a model factory (package.module:factory), known only once built."""
    from .models.hf_io import is_factory, read_config, resolve
    return None if is_factory(name) else read_config(resolve(name))[0]


def parse_modules(spec, layers: str | None, module: str | None, cfg, key_positions: str = "answer"
                  ) -> tuple[str, ...]:
    """--modules / --layers / --module -> module names, each checked against the model's
    config (layer in range, a linear module of the family); the defaults are those of
    `key_positions` (default_modules)."""
    from .models import parse_module
    from .models.transformer import builtin
    if not builtin(cfg) and (layers is not None or module is not None):
        raise ConfigError("--layers/--module name layers of Hugging Face models; for a Flax model pass --modules "
                          "(module paths like layers.18.mlp.up_proj)")
    if spec:
        names = tuple(s.strip() for s in spec.split(",") if s.strip()) if isinstance(spec, str) else tuple(spec)
        flag = "--modules"
    else:
        base = default_modules(cfg, key_positions)
        names, flag = base, "--layers" if layers else "--module"
        if layers is not None or module is not None:
            suffix = module or base[0].split(".", 3)[-1]
            idx = [int(m.split(".")[2]) for m in base]
            if layers:
                lo, _, hi = layers.partition("-")
                try:
                    idx = range(int(lo), int(hi or lo) + 1)
                except ValueError:
                    raise ConfigError(f"--layers {layers}: expected a layer or a range like 18-23") from None
                if not idx:
                    raise ConfigError(f"--layers {layers}: an empty range")
            names = tuple(f"{cfg.layer_prefix}.{i}.{suffix}" for i in idx)
    for name in names:
        try:
            parse_module(cfg, name)
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from None
    return names


# ---------------------------------------------------------------- loading
_LAST_MODEL: list = []      # [(key, Model)]: the model the last command of this process loaded


def _folder_stamp(name: str) -> tuple:
    """(file, size, mtime) of every file of a local model folder; () for other names."""
    p = Path(name).expanduser()
    if not p.is_dir():
        return ()
    stats = ((f, f.stat()) for f in p.rglob("*") if f.is_file())
    return tuple(sorted((str(f.relative_to(p)), st.st_size, st.st_mtime_ns) for f, st in stats))


def _load_model(args, mesh=None):
    """The --model in --dtype (api.load_model); with a mesh, every parameter is read
    straight into its shards. Commands run one after another in one process (`train
    --evaluate`, `demo`) share the load: the last model loaded is kept and given again
    for the same name, dtypes, layout and mesh while its folder's files are unchanged
    (a model factory is called every time)."""
    from .api import load_model
    from .models.hf_io import is_factory
    if is_factory(args.model) and (args.dtype != "float32" or args.residual_dtype or mesh is not None):
        raise ConfigError("--dtype, --residual-dtype and --mesh apply to checkpoints; a model factory "
                          f"({args.model}) sets its own dtypes")
    layout = getattr(args, "layer_layout", None)
    if is_factory(args.model):
        return load_model(args.model, layer_layout=layout)
    key = (model_name(args.model), args.dtype, args.residual_dtype, layout, mesh, _folder_stamp(args.model))
    if _LAST_MODEL and _LAST_MODEL[0][0] == key:
        return _LAST_MODEL[0][1]
    _LAST_MODEL.clear()         # the old model is released before the new one loads
    model = load_model(args.model, dtype=args.dtype, residual_dtype=args.residual_dtype, mesh=mesh,
                       layer_layout=layout)
    _LAST_MODEL.append((key, model))
    return model


def model_name(name: str) -> str:
    """How a run records --model: the absolute path of a local folder, else the name
    (embedded model or hub id)."""
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else str(name)


def _load_data(args):
    """(train requests, test requests, data record) from --data/--test-data and the split
    options. The record holds each file's absolute path, SHA-256 and every skipped or
    repeated record, and the split actually used."""
    from .data import load_requests, request_hash, split_requests
    from .data.records import split_units
    if args.dataset is None:
        raise ConfigError("--dataset is required (zsre, counterfact, mquake, demo, user or knowedit)")
    fmt = DATASET_FORMAT[args.dataset]
    data = args.data or (str(demo_data_path()) if args.dataset == "demo" else None)
    if data is None:
        raise ConfigError(f"--data is required with --dataset {args.dataset}")
    loaded = report_load(load_requests(data, fmt, skip_invalid=args.skip_invalid))
    reqs = loaded.requests
    seed = 0 if args.split_seed is None else args.split_seed
    record = {"data": _file_record(loaded), "test_data": None}
    if args.test_data:
        test_loaded = report_load(load_requests(args.test_data, fmt, skip_invalid=args.skip_invalid))
        record["test_data"] = _file_record(test_loaded)
        train = reqs[:args.n_train] if args.n_train else reqs
        test = test_loaded.requests[:args.n_test] if args.n_test else test_loaded.requests
        record["split"] = {"n_train": len(train), "n_test": len(test), "split_seed": None}
    else:
        # An MQuAKE case's rewrites stay together (its multi-hop questions need all of them).
        by_case = args.dataset == "mquake"
        n_units = len(split_units(reqs, by_case))
        n_train = args.n_train or n_units // 2
        n_test = args.n_test or n_units - n_train
        record["split"] = {"n_train": n_train, "n_test": n_test, "split_seed": seed, "by_case": by_case}
        train, test = split_requests(reqs, n_train, n_test, seed, by_case=by_case)
    trained = {request_hash(r) for r in train}
    record["train_test_overlap"] = sum(request_hash(r) in trained for r in test)
    if record["train_test_overlap"]:
        print(f"{record['train_test_overlap']} test request(s) have the same content as a training request",
              file=sys.stderr)
    return train, test, record


def _file_record(loaded) -> dict:
    return {"path": loaded.path, "sha256": loaded.sha256, "n_records": loaded.n_records,
            "n_requests": len(loaded.requests), "skipped": loaded.skipped, "duplicates": loaded.duplicates}


def report_load(loaded, shown: int = 3):
    """Prints how many records of a file were skipped or repeat an earlier request, with
    the first few reasons (all of them stay in `loaded` for the run's JSON record)."""
    for what, items in (("skipped invalid record(s)", loaded.skipped),
                        ("request(s) repeating an earlier one (kept)", loaded.duplicates)):
        if items:
            print(f"{loaded.path}: {len(items)} {what}:", file=sys.stderr)
            for line in items[:shown]:
                print(f"  {line}", file=sys.stderr)
            if len(items) > shown:
                print(f"  ... and {len(items) - shown} more", file=sys.stderr)
    return loaded


def demo_data_path() -> Path:
    return Path(__file__).parent / "data" / "demo_counterfacts.json"


def _editor_defaults(args, record):
    """Fills options not given from the editor's training record: the model and whether
    prompts are wrapped in its chat template, and the data and split unless --data
    names other data (then nothing of the training data is kept)."""
    keys = ["model_name", "skip_invalid", "chat_template"]
    if getattr(args, "data", None) is None:
        keys += ["dataset", "data", "test_data", "n_train", "n_test", "split_seed"]
    for key in keys:
        attr = "model" if key == "model_name" else key
        if hasattr(args, attr) and getattr(args, attr) in (None, False) and record.get(key) is not None:
            setattr(args, attr, record[key])
    _model_dtypes(args, record)


def _model_dtypes(args, record: dict | None = None) -> None:
    """--dtype not given: the dtype the editor's LLM was trained in (with its residual
    stream dtype where that is not float32, the one either dtype implies, unless
    --residual-dtype is given), else float32."""
    if args.dtype is None and record and record.get("dtype") in ("float32", "bfloat16"):
        args.dtype = record["dtype"]
        if args.residual_dtype is None and record.get("residual_dtype") not in (None, "float32"):
            args.residual_dtype = record["residual_dtype"]
    args.dtype = args.dtype or "float32"


def _print_table(metrics: dict, baseline: dict, title: str) -> str:
    """One row per metric computed, the unedited model beside the edited one."""
    from .metrics import unit

    def cell(d, k):
        return "-" if k not in d else f"{d[k]:.2f}" if unit(k) == "bits" else f"{d[k]:.1f}"
    lines = [f"{title}", "", "| metric | unit | unedited | edited |", "|---|---|---:|---:|"]
    lines += [f"| {k} | {unit(k)} | {cell(baseline, k)} | {cell(metrics, k)} |" for k in metrics]
    text = "\n".join(lines)
    print(text)
    return text


def _check_tokenised(model, train, test, skip_invalid, chat_template=False):
    """Validates lengths of every request before any long work."""
    from .data import check_lengths
    out = []
    for reqs in (train, test):
        res = check_lengths(model.tokenizer, reqs, skip_invalid=skip_invalid, chat_template=chat_template)
        if res.skipped:
            print(f"skipped {len(res.skipped)} over-long request(s)", file=sys.stderr)
        out.append(res.requests)
    return out


def _scale_setup(args):
    """Starts multi-host JAX if asked (before anything touches a device), then builds
    the --mesh mesh (None without one)."""
    from .runs import use_deterministic_ops
    from .sharding import maybe_initialize_distributed, mesh_from_spec
    if args.deterministic:
        use_deterministic_ops()
    maybe_initialize_distributed(args.distributed)
    return mesh_from_spec(args.mesh, args.sharding)


# ---------------------------------------------------------------- commands
def train_editor_config(args, model_cfg) -> EditorConfig:
    """The EditorConfig of `train`: the method's defaults (EMSEdit 2 steps + norm
    regulariser, MEND / MALMEN / RLEdit 1 step + KL), step-specific hypernetworks for
    the sequential protocol (they matter only when steps > 1), the modules checked
    against the model's config."""
    modules = parse_modules(args.modules, args.layers, args.module, model_cfg, args.key_positions)
    step_specific = args.protocol == "sequential" if args.step_specific is None else args.step_specific
    return _config(EditorConfig, args, modules=modules, step_specific=step_specific)


def train_config(args) -> TrainConfig:
    return _config(TrainConfig, args)


def cmd_train(args) -> dict:
    from .evaluate import preserved_gram
    from .pipeline import encode_split
    from .runs import check_run
    from .train import held_out, train
    check_writable(args.out, "--out", folder=True)
    args.model = args.model or DEFAULT_MODEL
    _model_dtypes(args)
    args.chat_template = bool(args.chat_template)
    args.prior_source = args.prior_source or "loc"
    cfg = model_config(args.model)
    tcfg = train_config(args)
    ecfg = train_editor_config(args, cfg) if cfg is not None else None
    train_reqs, test_reqs, data = _load_data(args)        # data errors before the model loads
    # the last n_val training requests are held out to select on (train.held_out; a bad
    # --n-val is refused here, before the model loads)
    n_val = held_out(tcfg, len(train_reqs), args.n_val, explicit=args.select_every is not None)
    if tcfg.select_every and not n_val:
        tcfg = dataclasses.replace(tcfg, select_every=0)
    residual = args.residual_dtype or ("float32" if args.dtype == "bfloat16" else args.dtype)
    # Everything that makes this run this run (runs.claim_run adds the model, the editor
    # config and the training requests' content hash); --mesh and --remat change only
    # the cost. A folder holding another run is refused before the model loads.
    identity = {"dataset": args.dataset, "skip_invalid": args.skip_invalid,
                "data_sha256": data["data"]["sha256"], "n_skipped": len(data["data"]["skipped"]),
                "test_data_sha256": (data["test_data"] or {}).get("sha256"), "split": data["split"],
                "dtype": args.dtype, "residual_dtype": residual, "chat_template": args.chat_template,
                "deterministic": args.deterministic, "prior_source": args.prior_source, "n_val": n_val}
    check_run(args.out, {**identity, "train": dataclasses.asdict(tcfg)})
    mesh = _scale_setup(args)
    model = _load_model(args, mesh)
    ecfg = ecfg or train_editor_config(args, model.config)
    for f in dataclasses.fields(ecfg):          # the resolved values are what is printed and recorded
        if hasattr(args, f.name) and f.name not in TRAIN_EDITOR_SKIP:
            setattr(args, f.name, getattr(ecfg, f.name))
    args.layers = args.module = None
    train_reqs, test_reqs = _check_tokenised(model, train_reqs, test_reqs, args.skip_invalid, args.chat_template)
    if n_val and n_val >= len(train_reqs):            # requests skipped as too long since
        raise ConfigError(f"--n-val {n_val}: needs fewer than the {len(train_reqs)} training requests")
    val_reqs = train_reqs[len(train_reqs) - n_val:]
    train_reqs = train_reqs[:len(train_reqs) - n_val]
    options = resolved_options(args)
    run_meta = {"model_name": model_name(args.model), "dataset": args.dataset, "data": data["data"]["path"],
                "test_data": (data["test_data"] or {}).get("path"), **data["split"], "dtype": args.dtype,
                "residual_dtype": residual, "skip_invalid": args.skip_invalid, "mesh": args.mesh,
                "sharding": args.sharding, "remat": args.remat, "chat_template": args.chat_template, "data_files": data,
                "prior_source": args.prior_source, "n_val": len(val_reqs), "options": options}
    print("configuration:", json.dumps(options, indent=1))
    t0 = time.perf_counter()
    key_prior = None
    if ecfg.needs_prior:        # C0 of the training requests' preserved facts, as evaluate computes it
        key_prior = preserved_gram(model, ecfg, train_reqs, source=args.prior_source, n_edits=tcfg.n_edits,
                                   progress=not args.quiet, chat_template=args.chat_template)
    result = train(model, ecfg, tcfg, encode_split(model.tokenizer, train_reqs, chat_template=args.chat_template),
                   args.out, run_meta=run_meta, identity=identity, model_name=model_name(args.model),
                   progress=not args.quiet, mesh=mesh, remat=args.remat, key_prior=key_prior,
                   metric=DATASET_METRIC[args.dataset],
                   val_split=encode_split(model.tokenizer, val_reqs, chat_template=args.chat_template)
                   if val_reqs else None)
    if not result.n_edits_seen:
        print(f"{args.out} already holds this finished run; its editor is unchanged", file=sys.stderr)
    summary = {"train_seconds_per_edit": result.seconds_per_edit, "compile_seconds": result.compile_seconds,
               "wall_seconds": time.perf_counter() - t0, "editor": str(Path(args.out) / "editor")}
    print(json.dumps(summary, indent=1))
    if args.evaluate:
        summary["evaluation"] = main(["evaluate", "--editor", summary["editor"], "--out",
                                      str(Path(args.out) / "results.json"), "--protocol", tcfg.protocol,
                                      "--n-edits", str(tcfg.n_edits), "--num-seq", str(tcfg.num_seq),
                                      *_passed_on(args)])
    return summary


PASSED_ON = ("dtype", "residual_dtype", "layer_layout", "mesh", "sharding", "remat", "deterministic", "quiet",
             "compile_cache", "compile_cache_dir")


def _passed_on(args, names: Sequence[str] = PASSED_ON) -> list[str]:
    """The flags that give a command run from another (`train --evaluate`'s evaluation,
    the demo's steps) the values of `args` for `names`; by default the model's dtypes
    and layout, the mesh and the run options (an evaluation takes the model, data,
    split and chat template from the editor's record; the distributed runtime is already
    up)."""
    flags = []
    for name in names:
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def _exclude_trained(args, record: dict, data: dict, test_reqs):
    """Test requests without those the editor was trained on, and the overlap record.

    On the editor's own training file the test requests are taken from the complement
    of its training requests (by content hash); on any other data, a test request the
    editor was trained on is an error unless --allow-train-overlap. The overlap count
    always goes to results.json."""
    from .checkpoint import trained_hashes
    from .data import request_hash
    trained = trained_hashes(args.editor)
    info = {"train_overlap": None, "left_out_as_trained": 0,
            "same_file_as_training": data["test_data"] is None
            and data["data"]["sha256"] == record.get("data_sha256")}
    if data["test_data"] is None and record.get("data_sha256") and data["data"]["path"] == record.get("data") \
            and not info["same_file_as_training"]:
        print(f"note: {data['data']['path']} changed since the editor was trained on it (its SHA-256 differs)",
              file=sys.stderr)
    if trained is None:       # an editor saved without its training requests
        print(f"{args.editor}: the editor does not list its training requests; overlap not checked", file=sys.stderr)
        return test_reqs, info
    if info["same_file_as_training"] and not args.allow_train_overlap:
        kept = [r for r in test_reqs if request_hash(r) not in trained]
        info["left_out_as_trained"] = len(test_reqs) - len(kept)
        if len(kept) < len(test_reqs):
            print(f"left out {len(test_reqs) - len(kept)} test request(s) the editor was trained on", file=sys.stderr)
        test_reqs = kept
    overlap = [r for r in test_reqs if request_hash(r) in trained]
    info["train_overlap"] = len(overlap)
    if overlap and not args.allow_train_overlap:
        raise UserError(f"{len(overlap)} of the {len(test_reqs)} test requests were used to train the editor "
                        f"{args.editor} (first: {overlap[0].source}); evaluate on other requests, or pass "
                        "--allow-train-overlap to score them anyway")
    return test_reqs, info


def cmd_evaluate(args) -> dict:
    from .checkpoint import read_editor_record
    from .evaluate import mquake_accuracy, preserved_gram, run_protocol
    from .pipeline import encode_split
    from .runs import write_json
    record = read_editor_record(args.editor)
    _editor_defaults(args, record)
    args.model = args.model or DEFAULT_MODEL
    args.chat_template = bool(args.chat_template)
    for flag, path in (("--out", args.out), ("--plot", args.plot), ("--per-request", args.per_request)):
        if path:
            check_writable(path, flag, folder=False)
    ev = _config(EvalConfig, args)
    key_memory = record["editor"].get("key_memory", 0) if ev.key_memory is None else ev.key_memory
    if ev.loc_prior and not key_memory:
        raise ConfigError("--loc-prior NU starts the key memory at NU C0: it needs --key-memory MU > 0")
    args.prior_source = args.prior_source or record.get("prior_source") or "loc"
    train_reqs, test_reqs, data = _load_data(args)
    mesh = _scale_setup(args)
    model = _load_model(args, mesh)
    trained, state, record = _load_editor_for(args, model)
    ecfg = ev.editor_config(trained)
    test_reqs, overlap = _exclude_trained(args, record, data, test_reqs)
    chat = args.chat_template
    train_reqs, test_reqs = _check_tokenised(model, train_reqs if ecfg.needs_prior else [], test_reqs,
                                             args.skip_invalid, chat)
    options = resolved_options(args)
    print("configuration:", json.dumps(options, indent=1))
    info = {"editor": dataclasses.asdict(ecfg), "editor_dir": str(args.editor), "train": record.get("train"),
            "residual_dtype": model.config.residual_dtype or args.dtype, "chat_template": chat,
            "loc_prior_requests": len(train_reqs) if ecfg.needs_prior else None,
            "prior_source": args.prior_source if ecfg.needs_prior else None,
            "prob_scores": ev.prob_scores if ev.prob_scores is not None else
            DATASET_METRIC.get(args.dataset) == "counterfact", **overlap}
    key_prior, prior_s = None, None
    # The C0 the editor was trained with, unless this evaluation asks for another one.
    own_prior = bool(state.prior) and args.prior_source == (record.get("prior_source") or "loc") \
        and ecfg.prior_slots == trained.prior_slots
    info["prior_from_editor"] = ecfg.needs_prior and own_prior
    if ecfg.needs_prior and not own_prior:  # C0 from the training requests' preserved facts, never the test ones
        if not train_reqs:
            raise ConfigError("--loc-prior / --null-space need training requests (the editor's --data split, or "
                              "--data with --test-data) to estimate C0 from")
        t0 = time.perf_counter()
        key_prior = preserved_gram(model, ecfg, train_reqs, source=args.prior_source, n_edits=ev.n_edits,
                                   progress=not args.quiet, chat_template=chat)
        prior_s = time.perf_counter() - t0
    if args.dataset == "mquake":
        result = mquake_accuracy(model, ecfg, state, test_reqs, n_cases=ev.n_edits * ev.num_seq,
                                 progress=not args.quiet, key_prior=key_prior, chat_template=chat)
        out = {"metrics": result, "config": options, **info, "data_files": data}
    else:
        split = encode_split(model.tokenizer, test_reqs, chat_template=chat)
        res = run_protocol(model, ecfg, state, split, protocol=ev.protocol, num_seq=ev.num_seq,
                           n_edits=ev.n_edits, metric=DATASET_METRIC[args.dataset], full_curve=ev.full_curve,
                           curve_every=ev.curve_every, progress=not args.quiet, mesh=mesh, remat=args.remat, capture_chunk=ev.capture_chunk,
                           buckets=ev.buckets, key_prior=key_prior, fluency_tokens=ev.fluency,
                           prob_scores=ev.prob_scores)
        out = {"metrics": res.metrics, "baseline": res.baseline,
               "timing": {"train_seconds_per_edit": record.get("train_seconds_per_edit"),
                          "edit_seconds_per_edit": res.edit_seconds_per_edit,
                          "edit_compile_seconds": res.edit_compile_seconds,
                          "loc_prior_seconds": prior_s},
               "config": options, **info, "n_requests": res.n_requests, "curve": res.curve, "data_files": data}
        n_seq = 1 if ev.protocol == "batch" else ev.num_seq
        _print_table(res.metrics, res.baseline, f"{args.dataset} {ev.protocol} {n_seq}x{ev.n_edits}")
        if args.plot and res.curve:
            plot_curve(res.curve, args.plot, res.baseline)
        if args.per_request:
            from .evaluate import per_request_lines
            Path(args.per_request).parent.mkdir(parents=True, exist_ok=True)
            with open(args.per_request, "w", encoding="utf-8") as f:
                for line in per_request_lines(res, split.requests):
                    f.write(json.dumps(line) + "\n")
            print(f"wrote {args.per_request} ({res.n_requests} requests)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, out, indent=1)    # never a half-written results file
        print(f"wrote {args.out}")
    return out


def plot_curve(curve: list[dict], path: str, baseline: dict | None = None) -> None:
    """One panel per metric of the curve: its value after each edited batch (over every
    request edited so far), the unedited model's value as a dashed line."""
    import math

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import unit
    names = [k for k in curve[-1] if k != "batches"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    x = [c["batches"] for c in curve]
    for ax, k in zip(axes.flat, names):
        ax.plot(x, [c.get(k, float("nan")) for c in curve], marker="o", label="edited")
        if baseline and k in baseline:
            ax.axhline(baseline[k], color="grey", linestyle="--", label="unedited")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("edited batches", fontsize=8)
        ax.set_ylabel(unit(k), fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def _load_editor_for(args, model):
    """load_editor for --model (refused when the editor was made for another
    architecture); a same-architecture model of another name is named on stderr."""
    from .checkpoint import load_editor
    ecfg, state, record = load_editor(args.editor, model.config, model_name=model_name(args.model))
    made_for = (record.get("model") or {}).get("name") if isinstance(record.get("model"), dict) else None
    if made_for is not None and made_for != model_name(args.model):
        print(f"note: the editor {args.editor} was trained for {made_for}; --model {args.model} has the same "
              "architecture and edited layer shapes", file=sys.stderr)
    return ecfg, state, record


def _model_from_editor(args) -> None:
    """--model and --dtype default to the model and dtype the editor (--editor) was
    trained with."""
    from .checkpoint import read_editor_record
    record = read_editor_record(args.editor) if getattr(args, "editor", None) else None
    if args.model is None and record:
        args.model = record.get("model_name")
    args.model = args.model or DEFAULT_MODEL
    _model_dtypes(args, record)


def cmd_edit(args) -> dict:
    from . import api
    _model_from_editor(args)
    if args.save:
        check_writable(args.save, "--save", folder=True)
    subjects = list(args.subject or [])
    if subjects and len(subjects) != len(args.fact):
        raise ConfigError(f"--subject: {len(subjects)} given for {len(args.fact)} --fact; give one per fact, in order")
    model = _load_model(args)
    if args.save and model.config.family in ("nnx", "linen"):
        raise ConfigError("--save writes a Hugging Face checkpoint; a Flax model's edited parameters are "
                          "models.apply_deltas(model.config, model.params, deltas), to save as you save that model")
    editor = api.load_editor(args.editor, model)
    chat = bool(args.chat_template or editor.chat_template)     # as the editor was trained
    facts = [api.Fact(p, t, subjects[i] if subjects else None) for i, (p, t) in enumerate(args.fact)]
    edited = api.edit(model, editor, facts, chat_template=chat)
    prompts = [p for p, _ in args.fact] + list(args.prompt or [])
    before = api.generate(model, prompts, max_new_tokens=args.max_new_tokens, chat_template=chat)
    after = api.generate(edited, prompts, max_new_tokens=args.max_new_tokens, chat_template=chat)
    for p, b, a in zip(prompts, before, after):
        print(f"{p!r}\n  before: {b!r}\n  after:  {a!r}")
    if args.save:
        edited.save(args.save)
        print(f"saved the edited model to {args.save}")
    return {"before": before, "after": after}


def cmd_generate(args) -> dict:
    from . import api
    _model_from_editor(args)
    t0 = time.perf_counter()
    model = _load_model(args)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    outs = api.generate(model, args.prompt, max_new_tokens=args.max_new_tokens, chat_template=bool(args.chat_template))
    t_gen = time.perf_counter() - t1
    for p, o in zip(args.prompt, outs):
        print(f"{p!r} -> {o!r}")
    print(f"load {t_load:.1f} s, generate {t_gen:.1f} s ({args.max_new_tokens} tokens x {len(args.prompt)} prompts, "
          "first call includes compilation)")
    return {"completions": outs}


def cmd_demo(args) -> dict:
    """Train EMSEdit at the defaults on the shipped demo data with the embedded model,
    then evaluate sequential editing on held-out requests and print the table, the
    unedited model beside."""
    out = Path(args.out)
    common = ["--model", args.model, "--dataset", "demo", "--n-train", str(args.n_train), "--n-test",
              str(args.n_test), "--split-seed", "0"]
    common += _passed_on(args, ("quiet", "compile_cache", "compile_cache_dir"))
    epochs = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    main(["train", *common, "--out", str(out), "--preset", args.preset, *epochs, "--n-edits", "10",
          "--num-seq", "10"])
    return main(["evaluate", "--editor", str(out / "editor"), *common, "--num-seq", str(args.num_seq), "--n-edits",
                 "10", "--out", str(out / "results.json")])


def cmd_plan(args) -> dict:
    from .plan import run
    return run(args)


# ---------------------------------------------------------------- entry points
def main(argv: Sequence[str] | None = None):
    """Runs one command; returns its result. Errors propagate (console() reports them)."""
    args = parse_args(argv)
    if getattr(args, "compile_cache", False):       # JAX's persistent compilation cache
        from .compile_cache import enable
        enable(args.compile_cache_dir)
    return args.func(args)


def console(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `emsedit-jax` script: exit status 0 on success, 2 with one line
    on stderr for a mistake in the input (UserError; the traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from .lapack_threads import limit
    try:
        limit()
        main(argv)
    except UserError as e:
        if "--debug" in argv:
            raise
        print(f"emsedit-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(console())
