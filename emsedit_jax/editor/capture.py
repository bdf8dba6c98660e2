"""The edit hook: loss, keys and value gradients of the edited modules.

For a batch of teacher-forced sequences, one forward and one backward pass give at
every answer position i and edited module l the key u_i (module input, d_in) and the
value gradient g_i = dL/d(module output) (d_out). The value gradient is taken as the
gradient of the loss with respect to a zero "probe" added to the module output at the
answer positions; the keys come back as auxiliary output. The model being edited is
always `params` plus `deltas` (one (d_in, d_out) array per module), never a mutated copy.

Shapes: B sequences, S positions, A answer slots (static), V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp

from ..models.config import ModelConfig
from ..models.layers import Array, ModuleEdit, Params, default_positions
from ..models.transformer import builtin, context, embed, head, module_shape, parse_module, run_layers

IGNORE = -100


class Batch(NamedTuple):
    """Teacher-forced sequences: position p predicts labels[p]. Rows are either one
    right-padded sequence each (attention_mask 0/1, positions None = 0..S-1) or several
    packed sequences (attention_mask = segment id 1, 2, ... per sequence, 0 on padding,
    positions restarting at 0 in each segment)."""
    input_ids: Array                # (B, S) int32
    attention_mask: Array           # (B, S) int32
    labels: Array                   # (B, S) int32, IGNORE outside the answers
    positions: Array | None = None  # (B, S) int32
    subject: Array | None = None    # (B, S) int32, 1 at key slots of EditorConfig.key_positions="subject"


class Capture(NamedTuple):
    loss: Array                  # () mean cross-entropy of the answer tokens
    keys: dict[str, Array]       # module -> (B, A, d_in)
    grads: dict[str, Array]      # module -> (B, A, d_out)
    mask: Array                  # (B, A) bool, False on padding slots


def answer_slots(labels: Array, n_answer: int) -> tuple[Array, Array, Array]:
    """The first `n_answer` answer positions of each row.
    labels (B, S) -> positions (B, A) int32, targets (B, A) int32, mask (B, A) bool.
    Rows with fewer answer tokens are padded with position 0 and mask False."""
    valid = labels != IGNORE
    positions = jax.vmap(lambda v: jnp.nonzero(v, size=n_answer, fill_value=0)[0])(valid)
    positions = positions.astype(jnp.int32)
    mask = jnp.arange(n_answer)[None, :] < valid.sum(axis=1, keepdims=True)
    targets = jnp.where(mask, jnp.take_along_axis(labels, positions, axis=1), 0)
    return positions, targets, mask


def token_nll(logits: Array, targets: Array, mask: Array) -> Array:
    """Mean negative log-likelihood over the unmasked slots. logits (B, A, V)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1)


def check_inputs(cfg: ModelConfig, batch: Batch, deltas: Mapping[str, Array] | None) -> None:
    """Trace-time shape checks of the editor's entry points (free under jit): the
    batch's arrays are all (B, S), each delta is its module's (d_in, d_out)."""
    chex.assert_rank(batch.input_ids, 2)
    chex.assert_equal_shape([x for x in batch if x is not None])
    for name, delta in (deltas or {}).items():
        chex.assert_shape(delta, module_shape(cfg, name), custom_message=f"delta of {name}")


def _positions(batch: Batch) -> Array:
    return default_positions(batch.attention_mask) if batch.positions is None else batch.positions


class Prefix(NamedTuple):
    """Hidden state (B, S, D) at the input of layer `start` (a Python int), computed by
    the unedited layers below it. Reused by every pass whose edits are all >= start."""
    hidden: Array
    start: int


def first_layer(cfg: ModelConfig, modules: Sequence[str]) -> int:
    """The lowest layer touched by `modules`: everything below it is edit-independent."""
    if not builtin(cfg):
        return 0
    return min(parse_module(cfg, m)[0] for m in modules)


def prefix_hidden(cfg: ModelConfig, params: Params, batch: Batch, start: int, remat: bool = False,
                  chunk: int | None = None) -> Prefix | None:
    """Runs the unedited layers [0, start) once (no gradient flows into them), in
    microbatches of `chunk` rows if given (memory: a batch of thousands of edits would
    otherwise hold every row's attention scores; the same result). None for a model
    without a layer split (flax_nnx): every pass then runs the whole model."""
    if not builtin(cfg):
        return None

    def run(rows: Batch) -> Array:
        pos = _positions(rows)
        ctx = context(cfg, rows.attention_mask, pos)
        return run_layers(cfg, params, embed(cfg, params, rows.input_ids, pos), ctx, stop=start, remat=remat)[0]

    b = batch.input_ids.shape[0]
    if chunk is None or chunk >= b:
        h = run(batch)
    else:
        n = -(-b // chunk)
        rows = jax.tree.map(functools.partial(_split, n=n), pad_rows(batch, n * chunk))
        h = _merge(jax.lax.map(run, rows), b)
    return Prefix(jax.lax.stop_gradient(h), start)


def _run(cfg, params, batch, edits_by_name, positions, prefix: Prefix | None, remat):
    if not builtin(cfg):
        return cfg.run(params, batch.input_ids, batch.attention_mask, _positions(batch), edits_by_name, positions)
    edits: dict[int, dict[str, ModuleEdit]] = {}
    for name, edit in edits_by_name.items():
        layer, suffix = parse_module(cfg, name)
        edits.setdefault(layer, {})[suffix] = edit
    if prefix is not None and edits and min(edits) < prefix.start:
        raise ValueError(f"an edit at layer {min(edits)} lies below the cached prefix (layer {prefix.start})")
    pos = _positions(batch)
    ctx = context(cfg, batch.attention_mask, pos)
    hidden, start = (embed(cfg, params, batch.input_ids, pos), 0) if prefix is None else prefix
    h, keys = run_layers(cfg, params, hidden, ctx, start=start, edits=edits, remat=remat)
    logits = head(cfg, params, h, positions)
    return logits, {name: keys[parse_module(cfg, name)] for name, e in edits_by_name.items()
                    if e.positions is not None}


def edited_logits(cfg: ModelConfig, params: Params, batch: Batch, deltas: Mapping[str, Array] | None,
                  *, n_answer: int, prefix: Prefix | None = None, remat: bool = False
                  ) -> tuple[Array, Array, Array]:
    """Logits of params + deltas at the answer slots: logits (B, A, V) in float32,
    targets (B, A), mask (B, A). `prefix` skips the unedited lower layers."""
    check_inputs(cfg, batch, deltas)
    positions, targets, mask = answer_slots(batch.labels, n_answer)
    edits = {name: ModuleEdit(delta=d) for name, d in (deltas or {}).items()}
    logits, _ = _run(cfg, params, batch, edits, positions, prefix, remat)
    return logits, targets, mask


def edited_loss(cfg: ModelConfig, params: Params, batch: Batch, deltas: Mapping[str, Array] | None,
                *, n_answer: int, prefix: Prefix | None = None, remat: bool = False) -> Array:
    """Mean cross-entropy of the answer tokens under params + deltas."""
    return token_nll(*edited_logits(cfg, params, batch, deltas, n_answer=n_answer, prefix=prefix, remat=remat))


def capture(cfg: ModelConfig, params: Params, batch: Batch, modules: Sequence[str],
            deltas: Mapping[str, Array] | None = None, *, n_answer: int,
            prefix: Prefix | None = None, remat: bool = False, chunk: int | None = None,
            key_positions: str = "answer") -> Capture:
    """Loss, keys and value gradients of `modules` on params + deltas (jittable;
    `modules` and `n_answer` are static). With `prefix` the unedited lower layers
    are not recomputed. `chunk` (static, rows) runs the forward and backward passes in
    microbatches of that many rows, one after the other, to bound activation memory;
    the result is that of the whole batch. `key_positions` (key_slots): where the keys
    and value gradients are taken; the loss is always the answer tokens'."""
    if chunk is not None and chunk < batch.input_ids.shape[0]:
        return _capture_chunked(cfg, params, batch, modules, deltas, n_answer=n_answer, prefix=prefix,
                                remat=remat, chunk=chunk, key_positions=key_positions)
    modules = tuple(modules)
    deltas = dict(deltas or {})
    check_inputs(cfg, batch, deltas)
    positions, targets, mask = answer_slots(batch.labels, n_answer)
    slots, slot_mask = key_slots(batch, key_positions, n_answer)
    b = batch.input_ids.shape[0]

    def loss_fn(probes):
        edits = {name: ModuleEdit(deltas.get(name), slots, probes[name]) for name in modules}
        edits |= {name: ModuleEdit(d) for name, d in deltas.items() if name not in edits}
        logits, keys = _run(cfg, params, batch, edits, positions, prefix, remat)
        return token_nll(logits, targets, mask), keys

    # Probes (and so value gradients) in float32, or float64 for a float64 model.
    dtype = jnp.promote_types(jnp.float32, jax.tree.leaves(params)[0].dtype)
    probes = {name: jnp.zeros((b, slots.shape[1], module_shape(cfg, name)[1]), dtype) for name in modules}
    (loss, keys), grads = jax.value_and_grad(loss_fn, has_aux=True)(probes)
    return Capture(loss, keys, grads, slot_mask)


def key_slots(batch: Batch, key_positions: str, n_answer: int) -> tuple[Array, Array]:
    """Where the keys and value gradients are taken: positions (B, A') int32 and mask
    (B, A') bool. "answer": the answer slots (A' = n_answer); "subject": the positions
    marked in `batch.subject` (A' = n_answer; a request has one subject slot, or its
    answer slots when it has no subject); "both": the union (A' = 2 n_answer)."""
    if key_positions == "answer":
        positions, _, mask = answer_slots(batch.labels, n_answer)
        return positions, mask
    if batch.subject is None:
        raise ValueError(f"key_positions={key_positions!r} needs the batch's subject marks (pipeline.EncodedSplit.pack)")
    marks = batch.subject > 0
    n = n_answer
    if key_positions == "both":
        marks, n = marks | (batch.labels != IGNORE), 2 * n_answer
    elif key_positions != "subject":
        raise ValueError(f"key_positions must be 'answer', 'subject' or 'both', not {key_positions!r}")
    positions = jax.vmap(lambda v: jnp.nonzero(v, size=n, fill_value=0)[0])(marks).astype(jnp.int32)
    mask = jnp.arange(n)[None, :] < marks.sum(axis=1, keepdims=True)
    return positions, mask


def pad_rows(batch: Batch, n_rows: int) -> Batch:
    """`batch` with empty rows appended up to `n_rows` rows: no tokens (attention_mask
    0), no answer slots (labels IGNORE), so they change no loss, key or statistic."""
    extra = n_rows - batch.input_ids.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad a batch of {batch.input_ids.shape[0]} rows to {n_rows}")
    if extra == 0:
        return batch

    def pad(x, fill):
        return None if x is None else jnp.concatenate([x, jnp.full((extra, *x.shape[1:]), fill, x.dtype)])

    return Batch(pad(batch.input_ids, 0), pad(batch.attention_mask, 0), pad(batch.labels, IGNORE),
                 pad(batch.positions, 0), pad(batch.subject, 0))


def _split(x: Array, n: int) -> Array:
    """(n * chunk, ...) -> (n, chunk, ...): microbatch j holds rows j, j + n, j + 2n, ..."""
    return x.reshape(-1, n, *x.shape[1:]).swapaxes(0, 1)


def _merge(x: Array, b: int) -> Array:
    """(n, chunk, ...) -> the first b rows, in their order before _split."""
    return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])[:b]


def _capture_chunked(cfg: ModelConfig, params: Params, batch: Batch, modules: Sequence[str],
                     deltas: Mapping[str, Array] | None, *, n_answer: int, prefix: Prefix | None,
                     remat: bool, chunk: int, key_positions: str = "answer") -> Capture:
    """`capture` over microbatches of `chunk` rows (a `lax.map`). Rows never attend to
    each other, so a microbatch's keys are the batch's; its value gradients are those of
    its own mean loss, rescaled by (its answer slots / the batch's) to be the gradients
    of the batch's mean loss. Microbatch j holds rows j, j + n, j + 2n, ... (n
    microbatches), so rows split over devices stay split within every microbatch."""
    b = batch.input_ids.shape[0]
    n = -(-b // chunk)
    padded = pad_rows(batch, n * chunk)
    total = jnp.maximum(jnp.sum(answer_slots(batch.labels, n_answer)[2]), 1).astype(jnp.float32)

    split, merge = functools.partial(_split, n=n), functools.partial(_merge, b=b)

    hidden = None
    if prefix is not None:
        hidden = jnp.concatenate([prefix.hidden, jnp.zeros((n * chunk - b, *prefix.hidden.shape[1:]),
                                                           prefix.hidden.dtype)])

    def one(xs):
        rows, h = xs
        cap = capture(cfg, params, rows, modules, deltas, n_answer=n_answer, remat=remat,
                      prefix=None if prefix is None else Prefix(h, prefix.start), key_positions=key_positions)
        weight = jnp.maximum(jnp.sum(answer_slots(rows.labels, n_answer)[2]), 1).astype(jnp.float32) / total
        grads = {m: g * weight.astype(g.dtype) for m, g in cap.grads.items()}
        return cap.loss * weight.astype(cap.loss.dtype), cap.keys, grads, cap.mask

    loss, keys, grads, mask = jax.lax.map(one, jax.tree.map(split, (padded, hidden)))
    return Capture(jnp.sum(loss), jax.tree.map(merge, keys), jax.tree.map(merge, grads), merge(mask))
