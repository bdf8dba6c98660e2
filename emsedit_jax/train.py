"""Meta-training of an editor: the jitted training step, the two schedules, and
checkpoint / resume.

Schedules:
- "default": an optax update (global-norm clip + Adam) after every batch, several
  epochs over a seeded shuffle. Sequential protocol: the LLM keeps the edits of the
  `num_seq` batches of a stream (as at test time) and starts clean at the next stream.
- "faithful": the authors' schedule. Sequential: the gradients of a whole stream are
  summed and one Adam step is taken at its end, and the regulariser weight is beta**2.
  Batch: for each edit step t, the loss of W_0 + dW_t alone, then an optimiser step.

RLEdit, sequential protocol: the loop also carries a buffer of the stream's earlier
batches (editor.memory) whose weighted losses join each batch's loss; on resume it is
rebuilt from the batch plan.

A run is fully determined by (model, editor config, train config, data): the batch plan
is derived from the seed up front, so a killed run restarted with the same command
resumes from its last checkpoint and ends with the same parameters. The folder's
`run.json` holds the run's identity (runs.claim_run): the model's name, architecture
hash and edited layer shapes, the editor and train configs, the content hash of the
training requests, and whatever the caller adds (data file hash, split, dtypes); a run
that differs in anything is refused, finished or not. `.lock` keeps a second process
out while one trains.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
import optax

from .checkpoint import CheckpointStore, save_editor
from .data.records import request_hash
from .editor import memory as mem
from .editor.config import EditorConfig
from .editor.objective import EditBatch, NAnswer, meta_loss
from .editor.steps import EditorState, init_editor, new_stream, zero_deltas
from .errors import ConfigError, UserError
from .metrics import NOT_PERCENT
from .models.config import ModelConfig
from .models.hf_io import Model
from .options import check_fields, option
from .pipeline import EncodedSplit, Layout
from .runs import RunLock, claim_run, model_identity
from .sharding import (constrain_deltas, constrain_editor, place_batch, place_deltas, place_editor, place_params,
                       to_host, use_mesh)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How an editor is meta-trained. The defaults are the working ones; the authors'
    values are the "faithful" preset (PRESETS)."""
    protocol: Literal["sequential", "batch"] = option(
        "sequential", "editing protocol trained for (sequential: step-specific hypernetworks)")
    schedule: Literal["default", "faithful"] = option(
        "default", "default: an Adam step per batch; faithful: the authors' (one step per stream, beta squared)")
    n_edits: int = option(10, "requests per edit batch", check="positive")
    num_seq: int = option(10, "batches per sequential stream", check="positive")
    epochs: int = option(1, "passes over the training requests", check="positive")
    meta_lr: float = option(1e-4, "Adam learning rate of the hypernetworks", check="positive")
    clip: float = option(1.0, "global gradient-norm clip", check="positive")
    seed: int = option(0, "seed of the editor's initialisation and the batch order", check="nonneg")
    checkpoint_every: int = option(10, "batches between checkpoints", check="positive")
    max_row_len: int = option(512, "packed row length cap (tokens)", check="positive")
    buckets: int = option(1, "distinct batch shapes to compile: more buckets, less padding, more compiles "
                          "(RLEdit's memory needs 1)", check="positive")
    select_every: int | None = option(
        None, "hold out the last --n-val training requests and score the editor on them before training and every "
        "BATCHES batches; keep the best (ES + GS + LS) editor (0: none)", check="nonneg", metavar="BATCHES",
        default_text="1 for the batch protocol, --num-seq (once per stream) for sequential: meta-training can make "
        "the editor worse, and at the defaults it has not beaten the editor it starts from")
    select_margin: float = option(
        2.0, "a later editor replaces the best validated one only if it scores higher by more than this many "
        "standard errors of their paired per-request difference (0: any higher score)", check="nonneg",
        metavar="SE")

    def __post_init__(self):
        if self.select_every is None:
            object.__setattr__(self, "select_every", 1 if self.protocol == "batch" else self.num_seq)
        check_fields(self)

    @property
    def beta_power(self) -> int:
        return 2 if self.schedule == "faithful" else 1


def held_out(tcfg: TrainConfig, n_requests: int, n_val: int | None = None, explicit: bool = False) -> int:
    """How many of the last training requests selection by validation holds out: `n_val`
    or one validation stream (sequential) or batch; 0 without selection. Selection on by
    default (not `explicit`) is skipped when fewer than that plus one training batch
    remain; asked for explicitly, too few requests are an error."""
    if not tcfg.select_every:
        return 0
    need = tcfg.n_edits * (tcfg.num_seq if tcfg.protocol == "sequential" else 1)
    n_val = n_val or need
    if n_val < need:
        raise ConfigError(f"--n-val {n_val}: the validation edits need at least {need} held-out requests")
    if n_requests >= n_val + tcfg.n_edits:
        return n_val
    if explicit:
        raise ConfigError(f"--select-every: holding out {n_val} requests to validate on needs more than the "
                          f"{n_requests} training requests (at least {n_val + tcfg.n_edits})")
    return 0


# Named sets of EditorConfig and TrainConfig values. "faithful" is the authors' setting:
# linear step size eta_0 1e-6, beta 0.5 (applied squared), meta learning rate 1e-5, one
# Adam step per stream, rank 1024, T = 2 and the paper's ridge solve (no key memory);
# with the embedded model it barely edits, so the defaults use a larger step size, learnt
# in log space, a weaker regulariser, rank 256, T = 3 and the key memory with its
# locality prior.
# "counterfact" takes keys and value gradients at the subject's last token, in the middle
# layers, with T = 6 (EditorConfig.key_positions, editor.config.default_modules): on
# counterfactual data edits at the answer positions of the last layers also flip the
# unrelated facts that share the edited relation; it is the default of CounterFact data
# (cli.DATASET_PRESET). Token-accuracy data (ZsRE) keep "default": there an edit at the
# subject barely moves the answer's tokens.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "counterfact": {"key_positions": "subject"},
    "faithful": {"lr_init": 1e-6, "log_step_size": False, "beta": 0.5, "schedule": "faithful", "meta_lr": 1e-5,
                 "epochs": 1, "rank": 1024, "key_memory": 0.0, "steps": 2,
                 "max_update": 0.0, "train_max_update": 0.0},
}


def configs(modules=None, method: str = "emsedit", *, preset: str = "default", model_cfg: ModelConfig | None = None,
            **fields) -> tuple[EditorConfig, TrainConfig]:
    """The (EditorConfig, TrainConfig) of a run: `preset`'s values over the defaults, then
    `fields` (any field of either, by name). `method` may name a step count ('malmen2').
    `modules` None: the defaults for the resolved key positions of `model_cfg`'s model
    (editor.config.default_modules)."""
    from .editor.config import method_config
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    values = {**PRESETS[preset], **fields}
    if modules is None:
        from .editor.config import default_modules
        if model_cfg is None:
            raise ConfigError("configs: give the modules to edit or the model's config (model_cfg)")
        modules = default_modules(model_cfg, values.get("key_positions", "answer"))
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    editor_names = {f.name for f in dataclasses.fields(EditorConfig)}
    unknown = sorted(set(values) - train_names - editor_names)
    if unknown:
        raise ConfigError(f"unknown configuration field(s) {unknown}")
    tcfg = TrainConfig(**{k: v for k, v in values.items() if k in train_names})
    return method_config(method, modules, **{k: v for k, v in values.items() if k in editor_names}), tcfg


def batch_plan(n_requests: int, tcfg: TrainConfig) -> list[list[np.ndarray]]:
    """Per epoch, the index arrays of its batches (seeded; incomplete batches dropped)."""
    if n_requests < tcfg.n_edits:
        raise UserError(f"{n_requests} training requests cannot fill one batch of {tcfg.n_edits} (--n-edits); "
                        "give more training requests (--n-train) or a smaller --n-edits")
    rng = np.random.default_rng(tcfg.seed)
    plan = []
    for _ in range(tcfg.epochs):
        perm = rng.permutation(n_requests)
        plan.append([perm[i * tcfg.n_edits:(i + 1) * tcfg.n_edits] for i in range(n_requests // tcfg.n_edits)])
    return plan


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """The optimiser of a run: the same object for runs that differ only in what it does
    not depend on (seed, epochs, ...), so the jitted train_step, which takes it as a
    static argument, is not recompiled for every run of a process."""
    every = tcfg.num_seq if (tcfg.schedule == "faithful" and tcfg.protocol == "sequential") else None
    return _optimizer(tcfg.clip, tcfg.meta_lr, every)


@functools.cache
def _optimizer(clip: float, meta_lr: float, every_k: int | None) -> optax.GradientTransformation:
    tx = optax.chain(optax.clip_by_global_norm(clip), optax.adam(meta_lr))
    if every_k is not None:
        tx = optax.MultiSteps(tx, every_k_schedule=every_k, use_grad_mean=False)
    return tx


@functools.partial(jax.jit, static_argnames=("ecfg", "lcfg", "tx", "n_answer", "beta_power", "only_step", "remat"),
                   donate_argnames=("nets", "opt_state"))
def train_step(nets, stats, opt_state, params, batch: EditBatch, deltas, memory: mem.Memory | None = None,
               key_gram: dict | None = None, protect: dict | None = None, *, ecfg: EditorConfig, lcfg: ModelConfig,
               tx: optax.GradientTransformation, n_answer: NAnswer, beta_power: int = 1,
               only_step: int | None = None, remat: bool = False):
    """One meta-training update. Returns (nets, stats, opt_state, deltas, metrics, key_gram).
    `memory`: RLEdit's buffer of the stream's earlier batches (None: no backtracking);
    `key_gram`: the key memory of the stream so far (None or {}: none); `protect`: the
    null-space projections (EditorConfig.null_space; None or {}: none). One device or a
    mesh: the inputs' placement decides (sharding.place_*), and under
    `sharding.use_mesh(mesh)` the new deltas are split like their kernels and the editor
    state by `partition.editor_spec`."""
    (loss, aux), grads = jax.value_and_grad(meta_loss, has_aux=True)(
        nets, stats, ecfg.training(), lcfg, params, batch, deltas, n_answer, beta_power=beta_power,
        only_step=only_step, memory=memory, key_gram=key_gram, remat=remat, protect=protect)
    updates, opt_state = tx.update(grads, opt_state, nets)
    nets = optax.apply_updates(nets, updates)
    metrics = {"loss": loss, "gen_loss": aux.gen_loss, "reg_loss": aux.reg_loss,
               "grad_norm": optax.tree.norm(grads), "step_norms": aux.step_norms}
    if memory is not None:
        metrics["memory_loss"] = aux.memory_loss
    nets, stats, opt_state, key_gram = constrain_editor((nets, aux.stats, opt_state, aux.key_gram))
    return nets, stats, opt_state, constrain_deltas(lcfg, aux.deltas), metrics, key_gram


@dataclasses.dataclass
class TrainResult:
    state: EditorState
    history: list[dict[str, Any]]
    seconds_per_edit: float       # steady state (first, compiling batch excluded)
    compile_seconds: float
    n_edits_seen: int


def train(model: Model, ecfg: EditorConfig, tcfg: TrainConfig, split: EncodedSplit, out_dir: str | Path, *,
          run_meta: dict | None = None, identity: dict | None = None, model_name: str | None = None,
          progress: bool = True, stop_after: int | None = None, remat: bool = False, mesh=None,
          key_prior: dict | None = None, val_split: EncodedSplit | None = None, metric: str = "zsre") -> TrainResult:
    """Meta-trains an editor on `split`, checkpointing to `out_dir/checkpoints` and
    writing the final editor to `out_dir/editor`. Resumes if a checkpoint exists.
    `identity`: what else identifies the run (data file hash, split, dtypes, ...), added
    to the model, configs and training requests; `model_name` names the model in it
    (default: its folder). `run_meta` is only recorded in editor.json. `stop_after`
    (batches) simulates an interruption, for tests. `mesh` (a `sharding.make_mesh`
    mesh; None: one device) places the LLM parameters, the batches, deltas and editor
    state on it (the same jitted step runs either way); `remat` recomputes the LLM
    layers' activations in the backward pass.
    `key_prior`: C0 for ecfg.loc_prior / ecfg.null_space (None: evaluate.preserved_gram of
    the training requests' locality prompts): every stream starts from it, as at test
    time, and the saved editor keeps it (EditorState.prior).
    Selection by validation (tcfg.select_every > 0 and `val_split`, held-out training
    requests): before the first batch (the untrained editor), every select_every batches
    and at the end, the editor edits `val_split` with the training protocol and is
    scored ES + GS + LS (`metric`, evaluate.run_protocol); the editor saved is the best
    scored one (each validation is in `history`); the editor's list of the requests it has
    seen (train_requests.json) holds the validation requests too. Not kept across a resume."""
    out = Path(out_dir)
    with RunLock(out), use_mesh(mesh):
        return _train(model, ecfg, tcfg, split, out, run_meta=run_meta, identity=identity,
                      model_name=model_name, progress=progress, stop_after=stop_after, remat=remat, mesh=mesh,
                      key_prior=key_prior, val_split=val_split, metric=metric)


def _train(model: Model, ecfg: EditorConfig, tcfg: TrainConfig, split: EncodedSplit, out: Path, *,
           run_meta, identity, model_name, progress, stop_after, remat, mesh, key_prior, val_split,
           metric) -> TrainResult:
    hashes = [request_hash(r) for r in split.requests]
    identity = {**(identity or {}), "editor": dataclasses.asdict(ecfg), "train": dataclasses.asdict(tcfg),
                "model": model_identity(model_name or model.path, model.config, ecfg.modules),
                "n_train": len(split),
                "train_requests_sha256": hashlib.sha256(" ".join(hashes).encode()).hexdigest()}
    identity = claim_run(out, identity)
    lcfg = model.config
    if ecfg.needs_prior and key_prior is None:
        from .evaluate import preserved_gram
        key_prior = preserved_gram(model, ecfg, split.requests, n_edits=tcfg.n_edits, progress=False,
                                   chat_template=split.chat_template)
    model = dataclasses.replace(model, params=place_params(lcfg, model.params, mesh))
    plan = batch_plan(len(split), tcfg)
    # A stream of num_seq batches has at most num_seq - 1 earlier batches to remember.
    slots = min(ecfg.memory_slots, tcfg.num_seq - 1) if tcfg.protocol == "sequential" else 0
    flat = [b for epoch in plan for b in epoch]
    # RLEdit's memory stacks earlier batches, so they share one layout.
    layouts = split.layouts(flat, tcfg.max_row_len, 1 if slots else tcfg.buckets)     # in `flat`'s order
    tx = make_optimizer(tcfg)
    key = jax.random.key(tcfg.seed)
    state = init_editor(ecfg, lcfg, key)
    opt_state = tx.init(state.nets)
    deltas = zero_deltas(ecfg, lcfg)
    store = CheckpointStore(out / "checkpoints", identity)
    position, history = (0, 0), []
    restored = store.restore_latest(_checkpoint_tree(state, opt_state, deltas))
    if restored is not None:
        tree, meta = restored
        protect = new_stream(ecfg, lcfg, state, key_prior).protect
        state = EditorState(tree["nets"], tree["stats"], tree.get("key_gram", {}), protect)
        opt_state, deltas = tree["opt"], tree["deltas"]
        position, history = tuple(meta["position"]), meta["history"]

    total = sum(len(e) for e in plan)
    done = position[0] * len(plan[0]) + position[1]
    bar = _progress(total, done, progress)
    times, compile_s, n_batches_run, compiled = [], 0.0, 0, set()
    only_steps = list(range(ecfg.steps)) if (tcfg.schedule == "faithful" and tcfg.protocol == "batch") else [None]
    memory = None
    select = tcfg.select_every > 0 and val_split is not None and len(val_split) > 0
    best = _validate(model, ecfg, tcfg, state, val_split, metric, key_prior, done, history, mesh) if select else None
    keep_better = functools.partial(_keep_better, margin=tcfg.select_margin)
    for epoch in range(position[0], tcfg.epochs):
        first = position[1] if epoch == position[0] else 0
        for b in range(first, len(plan[epoch])):
            if tcfg.protocol == "batch" or b % tcfg.num_seq == 0:
                deltas, state = zero_deltas(ecfg, lcfg), new_stream(ecfg, lcfg, state, key_prior)
            # Placed like the step's outputs (a no-op for those): one compile per layout.
            state, opt_state = place_editor((state, opt_state), mesh)
            deltas = place_deltas(lcfg, deltas, mesh)
            layout = layouts[epoch * len(plan[0]) + b]
            raw = split.batch(plan[epoch][b], layout)
            if slots and (b % tcfg.num_seq == 0 or memory is None):
                memory = _stream_memory(split, layout, plan[epoch], b, tcfg.num_seq, slots, ecfg.time_decay, raw)
            batch = place_batch(raw, mesh)
            if memory is not None:
                memory = place_batch(memory, mesh)
            t0 = time.perf_counter()
            for only in only_steps:
                nets, stats, opt_state, new_deltas, metrics, key_gram = train_step(
                    state.nets, state.stats, opt_state, model.params, batch, deltas, memory, state.key_gram,
                    **({"protect": state.protect} if state.protect else {}), ecfg=ecfg, lcfg=lcfg, tx=tx,
                    n_answer=layout.n_answer, beta_power=tcfg.beta_power,
                    only_step=only, remat=remat)
                state = EditorState(nets, stats, key_gram, state.protect)
            deltas = new_deltas
            if slots:
                memory = mem.push(memory, batch, b % tcfg.num_seq, ecfg.time_decay)
            metrics = {k: v.tolist() for k, v in to_host(metrics).items()}
            dt = time.perf_counter() - t0
            if layout not in compiled:
                compile_s += dt     # the first batch of each layout in a process compiles it
                compiled.add(layout)
            else:
                times.append(dt)
            n_batches_run += 1
            history.append({"epoch": epoch, "batch": b, "seconds": dt, **metrics})
            if select and (done + n_batches_run) % tcfg.select_every == 0 and done + n_batches_run < total:
                best = keep_better(best, _validate(model, ecfg, tcfg, state, val_split, metric, key_prior,
                                                   done + n_batches_run, history, mesh))
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", gen=f"{metrics['gen_loss']:.3f}")
            step_no = epoch * len(plan[0]) + b + 1
            nxt = (epoch, b + 1) if b + 1 < len(plan[epoch]) else (epoch + 1, 0)
            if step_no % tcfg.checkpoint_every == 0 or step_no == total:
                store.save(step_no, _checkpoint_tree(state, opt_state, deltas),
                           {"position": list(nxt), "history": history})
            if stop_after is not None and n_batches_run >= stop_after:
                bar.close()
                store.close()
                return TrainResult(state, history, _per_edit(times, tcfg), compile_s, n_batches_run * tcfg.n_edits)
    bar.close()
    try:        # the last checkpoint is written in the background meanwhile
        meta = {}
        if select:
            best = keep_better(best, _validate(model, ecfg, tcfg, state, val_split, metric, key_prior, total,
                                               history, mesh))
            state = best.state
            meta = {"selected_after_batches": best.batches, "selected_score": best.score}
        if ecfg.needs_prior:
            state = state._replace(prior=dict(key_prior))
        if n_batches_run or not (out / "editor" / "editor.json").is_file():    # else: finished before, same run
            # run_meta last: its split (n_train of the data, validation requests included) is
            # what `evaluate` re-splits the training file by; identity's n_train counts the
            # requests trained on
            save_editor(out / "editor", ecfg, state, {**identity, **(run_meta or {}), **meta,
                                                      "train_seconds_per_edit": _per_edit(times, tcfg)},
                        hashes + ([request_hash(r) for r in val_split.requests] if select else []))
    finally:
        store.close()
    return TrainResult(state, history, _per_edit(times, tcfg), compile_s, n_batches_run * tcfg.n_edits)


class Validated(NamedTuple):
    score: float                # ES + GS + LS on the validation split
    state: EditorState
    batches: int                # batches trained
    per_request: np.ndarray     # each request's ES + GS + LS (a metric it lacks counts 0)


def _keep_better(best: Validated, new: Validated, margin: float) -> Validated:
    """`new` if it beats `best` by more than `margin` standard errors of the paired
    per-request difference of their scores, else `best`. The untrained editor is
    validated first, so an editor that training moved only within the validation noise
    is not kept (selecting the maximum of noisy scores favours lucky editors)."""
    diff = new.per_request - best.per_request
    se = float(np.std(diff, ddof=1) / np.sqrt(diff.size)) if diff.size > 1 else 0.0
    return new if new.score - best.score > margin * se else best


def _validate(model: Model, ecfg: EditorConfig, tcfg: TrainConfig, state: EditorState, val_split: EncodedSplit,
              metric: str, key_prior, batches: int, history: list, mesh=None) -> Validated:
    """Scores the editor on `val_split` (ES + GS + LS); the scores join `history`."""
    from .evaluate import run_protocol
    res = run_protocol(model, ecfg, state, val_split, protocol=tcfg.protocol, num_seq=tcfg.num_seq,
                       n_edits=tcfg.n_edits, metric=metric, progress=False, key_prior=key_prior, prob_scores=False,
                       mesh=mesh)
    score = float(sum(res.metrics.values()))
    history.append({"validation_after_batches": batches, **res.metrics})
    kept = jax.tree.map(lambda x: x.copy(), (state.nets, state.stats))   # train_step donates the nets
    per_request = sum(np.nan_to_num(np.asarray(v, np.float64)) * (1 if k in NOT_PERCENT else 100)
                      for k, v in res.per_request.items())
    return Validated(score, EditorState(*kept), batches, per_request)


def _checkpoint_tree(state: EditorState, opt_state, deltas) -> dict:
    """What a checkpoint holds: the editor (with its key memory, if on), the optimiser
    and the current stream's deltas."""
    tree = {"nets": state.nets, "stats": state.stats, "opt": opt_state, "deltas": deltas}
    return {**tree, "key_gram": state.key_gram} if state.key_gram else tree


def _stream_memory(split: EncodedSplit, layout: Layout, epoch_plan: list[np.ndarray], b: int, num_seq: int,
                   slots: int, time_decay: float, batch: EditBatch) -> mem.Memory:
    """RLEdit's buffer before batch `b`: the stream's earlier batches pushed in order (at
    a stream's start, or to rebuild it on resume: the same arrays either way)."""
    start = b - b % num_seq
    memory = mem.empty_memory(batch if b == start else split.batch(epoch_plan[start], layout), slots)
    for j in range(max(start, b - slots), b):
        memory = mem.push(memory, split.batch(epoch_plan[j], layout), j - start, time_decay)
    return memory


def _per_edit(times: list[float], tcfg: TrainConfig) -> float:
    return float(np.mean(times) / tcfg.n_edits) if times else float("nan")


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="meta-train", unit="batch")
