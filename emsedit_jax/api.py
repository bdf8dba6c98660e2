"""The Python API: load a model and an editor, edit facts, generate, save.

    import emsedit_jax as ej
    model = ej.load_model("smollm2")
    editor = ej.load_editor("runs/demo/editor", model)
    edited = ej.edit(model, editor, [ej.Fact("The capital of France is", "Rome")])
    print(ej.generate(edited, "The capital of France is"))
    edited.save("runs/edited")

`ej.edit(edited, editor, more_facts)` continues the same sequential stream: the new
batch is edited on top of the earlier ones, with the stream's key memory. An
`EditedModel` keeps the unedited model (`.base`) and the weight changes (`.deltas`, a
dict of module name -> array): rolling back is dropping them. `ej.train_editor`
meta-trains an editor and `ej.evaluate_editor` scores one with a protocol; both take the same configuration
dataclasses as the command line (EditorConfig, TrainConfig, EvalConfig) and the same
presets (`ej.train_editor(model, data, preset="counterfact")`, `ej.configs(preset="faithful",
model_cfg=model.config)`).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .checkpoint import load_editor as _load_editor_folder
from .checkpoint import save_editor, trained_hashes
from .data import EditRequest, check_lengths, load_requests
from .editor.config import EditorConfig
from .editor.steps import Deltas, EditorState, new_stream, zero_deltas
from .errors import UserError
from .evaluate import EvalConfig, EvalResult, edit_batch, run_protocol
from .models import Model, apply_deltas, save_hf
from .models import load_model as _load_model_folder
from .pipeline import encode_split
from .train import TrainConfig, configs, held_out
from .train import train as _train

__all__ = ["EditedModel", "Editor", "Fact", "edit", "evaluate_editor", "generate", "load_editor", "load_model",
           "train_editor"]


@dataclasses.dataclass(frozen=True)
class Fact:
    """A fact to write into the model: the completion of `prompt` becomes `target`.
    `subject` (the entity the prompt is about, as it appears in the prompt) is where an
    editor with keys at the subject (EditorConfig.key_positions, the "counterfact"
    preset) reads its keys; such an editor needs it, the others ignore it."""
    prompt: str
    target: str
    subject: str | None = None


@dataclasses.dataclass
class Editor:
    """A trained editor: its configuration, its parameters and the record of its training
    (editor.json: model, data, options)."""
    config: EditorConfig
    state: EditorState
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_hashes: list[str] | None = None      # content hashes of its training requests

    @property
    def chat_template(self) -> bool:
        """Whether it was trained on prompts wrapped in the tokenizer's chat template."""
        return bool(self.record.get("chat_template"))

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the editor folder (editor.json + state/) that `load_editor` reads."""
        return save_editor(Path(path), self.config, self.state, self.record, self.train_hashes)


@dataclasses.dataclass
class EditedModel:
    """A model with edits applied: `base` (untouched) + `deltas`. `stream` is the editor
    state after the edits (the key memory of the stream), used when editing further."""
    base: Model
    editor: Editor
    deltas: Deltas
    stream: EditorState
    facts: tuple[Fact, ...] = ()

    @property
    def config(self):
        return self.base.config

    @property
    def tokenizer(self):
        return self.base.tokenizer

    @property
    def params(self):
        """The edited parameters (base parameters + deltas)."""
        return apply_deltas(self.base.config, self.base.params, self.deltas)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the edited model as a Hugging Face folder (config, tokenizer,
        model.safetensors) that transformers and `load_model` read."""
        return save_hf(self.base, path, self.params)


def load_model(name: str | os.PathLike = "smollm2", *, dtype: str = "float32",
               residual_dtype: str | None = None, mesh=None, layer_layout: str | None = None) -> Model:
    """`name`: the embedded model ("smollm2"), a local Hugging Face folder, a hub id
    ('org/name', from the local Hugging Face cache or the hub), or 'package.module:function'
    returning a Model (a Flax model: `ej.from_nnx` / `ej.from_linen`). `dtype`: "float32" or
    "bfloat16" parameters; with bfloat16 the residual stream stays float32 unless
    `residual_dtype="bfloat16"` (transformers' all-bfloat16 numerics). `mesh` (a
    `sharding.make_mesh` mesh) reads every parameter straight into its shards.
    `layer_layout`: "list" or "stacked" (default by backend: `backend.layer_layout`)."""
    import jax.numpy as jnp
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dtype not in dtypes:
        raise UserError(f"dtype: expected float32 or bfloat16, got {dtype!r}")
    residual = residual_dtype or ("float32" if dtype == "bfloat16" else None)
    if layer_layout not in (None, "list", "stacked"):
        raise UserError(f"layer_layout: expected list or stacked, got {layer_layout!r}")
    stacked = None if layer_layout is None else layer_layout == "stacked"
    return _load_model_folder(name, dtype=dtypes[dtype], residual=residual, mesh=mesh, stacked=stacked)


def load_editor(path: str | os.PathLike, model: Model) -> Editor:
    """The editor folder written by `emsedit-jax train` / `ej.train_editor(..., out=...)` /
    `Editor.save`, for `model` (refused when made for another architecture)."""
    ecfg, state, record = _load_editor_folder(path, model.config, model_name=str(model.path))
    hashes = trained_hashes(path)
    return Editor(ecfg, state, record, None if hashes is None else sorted(hashes))


def _requests(facts: Sequence[Fact | tuple[str, str]]) -> list[EditRequest]:
    out = []
    for i, f in enumerate(facts):
        if not isinstance(f, Fact):
            f = Fact(*f)
        for name in ("prompt", "target"):
            value = getattr(f, name)
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"fact {i}: {name} must be a non-empty string, got {value!r}")
        out.append(EditRequest(prompt=f.prompt, target_new=f.target, rephrase=f.prompt, loc_prompt=f.prompt,
                               loc_answer=f.target, subject=f.subject, source=f"fact {i}"))
    return out


def edit(model: Model | EditedModel, editor: Editor, facts: Sequence[Fact | tuple[str, str]], *,
         chat_template: bool | None = None) -> EditedModel:
    """Edits `facts` (one batch) into `model`. Given an EditedModel, the batch continues
    its stream: the deltas accumulate and the key memory carries over. `chat_template`:
    wrap the prompts in the tokenizer's chat template (None: as the editor was trained)."""
    if isinstance(model, EditedModel):
        if model.editor.config != editor.config:
            raise UserError("edit: the model was edited with another editor; continue a stream with the same one")
        base, deltas, stream, done = model.base, model.deltas, model.stream, model.facts
    else:
        base, done = model, ()
        deltas, stream = zero_deltas(editor.config, base.config), new_stream(editor.config, base.config, editor.state)
    facts = tuple(f if isinstance(f, Fact) else Fact(*f) for f in facts)
    if not facts:
        return EditedModel(base, editor, deltas, stream, done)
    chat = editor.chat_template if chat_template is None else chat_template
    requests = check_lengths(base.tokenizer, _requests(facts), chat_template=chat).requests
    split = encode_split(base.tokenizer, requests, chat_template=chat)
    positions = editor.config.key_positions
    missing = np.flatnonzero(split.views["edit"].subject_pos < 0) if positions != "answer" else ()
    if len(missing):          # the pipeline would fall back to the answer positions
        i = int(missing[0])
        raise UserError(f"fact {i}: this editor reads its keys at the subject (key_positions={positions!r}): give "
                        f"the subject as it appears in the prompt (Fact(prompt, target, subject); emsedit-jax edit "
                        f"--subject), got subject {facts[i].subject!r}")
    rows = np.arange(len(requests))
    layout = split.layout([rows])
    deltas, stream = edit_batch(stream, base.params, split.batch(rows, layout).edit, deltas, ecfg=editor.config,
                                lcfg=base.config, n_answer=layout.edit.n_answer)
    return EditedModel(base, editor, deltas, stream, done + facts)


def generate(model: Model | EditedModel, prompts: str | Sequence[str], max_new_tokens: int = 8, *,
             chat_template: bool = False) -> str | list[str]:
    """Greedy continuation of each prompt (the new text, up to the first end of
    sequence); a string for a string. `chat_template`: wrap each prompt in the
    tokenizer's chat template (instruct models)."""
    from .evaluate import generate as _generate
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens: expected a whole number >= 1, got {max_new_tokens!r}")
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    base = model.base if isinstance(model, EditedModel) else model
    texts = _generate(base, model.params, prompts, max_new_tokens, chat_template=chat_template, chunk=len(prompts))
    return texts[0] if single else texts


def _data(model: Model, data, fmt: str) -> list[EditRequest]:
    if isinstance(data, (str, os.PathLike)):
        data = load_requests(data, fmt).requests
    return check_lengths(model.tokenizer, list(data)).requests


def train_editor(model: Model, data, config: TrainConfig | None = None, *,
                 editor_config: EditorConfig | None = None, preset: str = "default",
                 out: str | os.PathLike | None = None, format: str = "auto", progress: bool = False) -> Editor:
    """Meta-trains an editor on `data` (EditRequests, or a data file in `format`).
    `config`: TrainConfig (default: `preset`'s); `editor_config`: EditorConfig (default:
    EMSEdit under `preset` on its default modules, step-specific for the sequential
    protocol). `preset`: "default", "counterfact" (keys at the subject in the middle
    layers: what `emsedit-jax train --dataset counterfact` uses, the better editor for
    counterfactual data scored by logit comparison) or "faithful" (the authors' setting).
    `out`: run folder (checkpoints, then out/editor); None trains in a
    temporary folder. With `config.select_every` (the default of both protocols) the last
    requests (one validation stream or batch) are held out, when there are enough
    (train.held_out), and the best scored editor is kept (a trained one only if it beats
    the untrained one by config.select_margin standard errors), as `emsedit-jax train`
    does."""
    protocol = (config or TrainConfig()).protocol
    preset_editor, preset_train = configs(preset=preset, model_cfg=model.config, protocol=protocol,
                                          step_specific=protocol == "sequential")
    config, editor_config = config or preset_train, editor_config or preset_editor
    requests = _data(model, data, format)
    val = None
    n_val = held_out(config, len(requests))
    if n_val:
        requests, val = requests[:-n_val], encode_split(model.tokenizer, requests[-n_val:])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp if out is None else out)
        _train(model, editor_config, config, encode_split(model.tokenizer, requests), folder,
               run_meta={"model_name": str(model.path)}, model_name=str(model.path), progress=progress,
               val_split=val)
        hashes = trained_hashes(folder / "editor")
        ecfg, state, record = _load_editor_folder(folder / "editor", model.config, model_name=str(model.path))
    return Editor(ecfg, state, record, None if hashes is None else sorted(hashes))


def evaluate_editor(model: Model, editor: Editor, data, config: EvalConfig | None = None, *,
                    metric: str = "zsre", format: str = "auto", progress: bool = False, **fields) -> EvalResult:
    """Edits the requests of `data` (EditRequests or a file) with a protocol and scores
    them, and the unedited model on the same requests. `config` or `fields` (any
    EvalConfig field: protocol="batch", num_seq=..., n_edits=...) choose the protocol;
    `metric`: "zsre" (token accuracy) or "counterfact" (logit comparison). Returns the
    EvalResult (.metrics, .baseline in %, timings, the final deltas)."""
    ev = dataclasses.replace(config, **fields) if config else EvalConfig(**fields)
    ecfg = ev.editor_config(editor.config)
    if ecfg.needs_prior and not editor.state.prior:
        raise UserError("evaluate_editor: loc_prior / null_space need C0, which this editor does not hold (it was "
                        "trained without a locality prior); the command line estimates it from the training data")
    if ecfg.needs_prior and ecfg.prior_slots != editor.config.prior_slots:
        raise UserError(f"evaluate_editor: this editor's C0 was taken at prior_positions="
                        f"{editor.config.prior_positions!r}, not {ecfg.prior_positions!r}; C0 must be estimated again "
                        "from the training requests: `emsedit-jax evaluate --prior-positions`")
    split = encode_split(model.tokenizer, _data(model, data, format))
    return run_protocol(model, ecfg, editor.state, split, protocol=ev.protocol, num_seq=ev.num_seq,
                        n_edits=ev.n_edits, metric=metric, full_curve=ev.full_curve, curve_every=ev.curve_every,
                        progress=progress, capture_chunk=ev.capture_chunk, buckets=ev.buckets, fluency_tokens=ev.fluency,
                        prob_scores=ev.prob_scores)
