"""Editing protocols and metrics.

Protocols: sequential (`num_seq` batches of `n_edits` requests applied one after the
other, never reset; scored after the last batch over every request edited so far,
optionally after each batch: the "full curve") and batch (one batch of `n_edits`).

Metrics, in % and averaged over requests:
- "zsre": ES / GS / LS = teacher-forced token accuracy of the new target on the edit
  prompt / the paraphrase, and of the locality answer on the locality prompt.
- "counterfact": ES / GS = fraction of answer positions where the new target's token
  has a higher logit than the true target's token at the same position; LS = fraction
  of the locality prompt's answer positions where the true token beats the new one.
The unedited model is scored on the same requests with the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .editor.capture import IGNORE, Batch, answer_slots, capture, edited_logits, first_layer, prefix_hidden
from .editor.config import EditorConfig
from .editor.steps import Deltas, EditorState, masked_keys, multi_step_edit, new_stream, zero_deltas
from .models.config import ModelConfig
from .models.hf_io import Model
from .pipeline import VIEWS, EncodedSplit, Layout
from .sharding import (constrain_deltas, constrain_editor, place_batch, place_deltas, place_editor, place_params, place_rows,
                       to_host, use_mesh)

Metric = Literal["zsre", "counterfact"]
SCORE_CHUNK = 25
METRIC_NAMES = {"edit": "ES", "rephrase": "GS", "loc": "LS"}


@functools.partial(jax.jit, static_argnames=("ecfg", "lcfg", "n_answer", "remat", "chunk"))
def edit_batch(state: EditorState, params, batch: Batch, deltas: Deltas, *, ecfg: EditorConfig,
               lcfg: ModelConfig, n_answer: int, remat: bool = False, chunk: int | None = None
               ) -> tuple[Deltas, EditorState]:
    """Applies the T-step edit of one batch (its edit view) to params + deltas.
    `remat` recomputes the LLM layers' activations in the backward pass; `chunk` runs
    the capture in microbatches of that many rows (both save memory, same result).
    One device or a mesh: the inputs' placement decides (sharding.place_*), and under
    `sharding.use_mesh(mesh)` the new deltas are split like their kernels and the editor
    state by `partition.editor_spec`. With `chunk`
    on a mesh, a multiple of the row axes keeps every microbatch spread over them."""
    prefix = prefix_hidden(lcfg, params, batch, first_layer(lcfg, ecfg.modules), remat)
    deltas, state, _ = multi_step_edit(ecfg, lcfg, params, state, batch, deltas, n_answer=n_answer, prefix=prefix,
                                       remat=remat, chunk=chunk)
    return constrain_deltas(lcfg, deltas), constrain_editor(state)


@functools.partial(jax.jit, static_argnames=("ecfg", "lcfg", "n_answer"))
def _answer_key_gram(params, batch: Batch, *, ecfg: EditorConfig, lcfg: ModelConfig, n_answer: int):
    """Per kernel shape, sum of k k^T (K, d_in, d_in) over the edited modules' keys at the
    batch's answer slots on the unedited model, and the number of slots. Only the keys
    are returned, so XLA drops the capture's backward pass."""
    cap = capture(lcfg, params, batch, ecfg.modules, n_answer=n_answer)
    keys = masked_keys(ecfg, lcfg, cap)
    return {k: jnp.einsum("kni,knj->kij", u, u) for k, u in keys.items()}, jnp.sum(cap.mask)


def locality_gram(model: Model, ecfg: EditorConfig, split: EncodedSplit, *, n_edits: int = 10,
                  progress: bool = True) -> dict[str, jax.Array]:
    """C0 of the locality prior (EditorConfig.loc_prior): per kernel shape, the mean k k^T
    (K, d_in, d_in) of the edited modules' keys at the answer slots of `split`'s locality
    prompts, on the unedited model. Pass the training requests, never the ones edited."""
    from tqdm.auto import tqdm
    if len(split) == 0:
        raise ValueError("locality_gram needs at least one request")
    batches = [np.arange(i, min(i + n_edits, len(split))) for i in range(0, len(split), n_edits)]
    layout = split.layout(batches)
    total, count = None, 0
    for rows in tqdm(batches, desc="locality prior", disable=not progress, unit="batch"):
        gram, n = _answer_key_gram(model.params, split.batch(rows, layout).loc, ecfg=ecfg, lcfg=model.config,
                                   n_answer=layout.loc.n_answer)
        total = gram if total is None else {k: total[k] + gram[k] for k in total}
        count += int(n)
    return {k: g / count for k, g in total.items()}


@functools.partial(jax.jit, static_argnames=("lcfg", "n_answer"))
def slot_scores(params, deltas: Deltas, batch: Batch, alt: jax.Array, *, lcfg: ModelConfig, n_answer: int):
    """Per answer slot: argmax == label, logit(label) > logit(alt), and whether the
    comparison exists; plus the slot mask and segment (request) id. All (R, A)."""
    logits, targets, mask = edited_logits(lcfg, params, batch, deltas, n_answer=n_answer)
    positions, _, _ = answer_slots(batch.labels, n_answer)
    alt_ids = jnp.take_along_axis(alt, positions, axis=1)
    has_alt = mask & (alt_ids >= 0)
    lt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    la = jnp.take_along_axis(logits, jnp.maximum(alt_ids, 0)[..., None], axis=-1)[..., 0]
    segment = jnp.take_along_axis(batch.attention_mask, positions, axis=1)
    return jnp.argmax(logits, -1) == targets, lt > la, has_alt, mask, segment


def _per_request(values: np.ndarray, valid: np.ndarray, segment: np.ndarray, n: int) -> np.ndarray:
    """Mean of `values` over the valid slots of each request (segment k+1 -> request k)."""
    seg = segment[valid] - 1
    num = np.bincount(seg, weights=values[valid].astype(np.float64), minlength=n)
    den = np.bincount(seg, minlength=n)
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def score_requests(model: Model, split: EncodedSplit, rows: Sequence[int], deltas: Deltas, metric: Metric,
                   chunk: int = SCORE_CHUNK, mesh=None) -> dict[str, np.ndarray]:
    """Per-request ES / GS / LS (fractions) of params + deltas on requests `rows`. With a
    `mesh` (model.params placed on it, as run_protocol does) the scored rows are split
    over it too, and every process gets the scores."""
    rows = np.asarray(rows)
    deltas = place_deltas(model.config, deltas, mesh)
    chunks = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    layout = split.layout(chunks)
    out = {METRIC_NAMES[v]: [] for v in VIEWS}
    for c in chunks:
        for view in VIEWS:
            vl = getattr(layout, view)
            batch, alt = split.pack(view, c, vl)
            batch, alt = place_batch(batch, mesh), place_rows(alt, mesh, IGNORE)
            correct, beats, has_alt, mask, seg = to_host(
                slot_scores(model.params, deltas, batch, alt, lcfg=model.config, n_answer=vl.n_answer))
            if metric == "zsre":
                vals = _per_request(correct, mask, seg, len(c))
            else:
                vals = _per_request(beats, has_alt, seg, len(c))
            out[METRIC_NAMES[view]].append(vals)
    return {k: np.concatenate(v) for k, v in out.items()}


def summarise(per_request: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(100 * np.nanmean(v)) for k, v in per_request.items()}


@dataclasses.dataclass
class EvalResult:
    metrics: dict[str, float]
    baseline: dict[str, float]
    n_requests: int
    edit_seconds_per_edit: float
    edit_compile_seconds: float
    curve: list[dict[str, Any]]
    deltas: Deltas
    state: EditorState


def run_protocol(model: Model, ecfg: EditorConfig, state: EditorState, split: EncodedSplit, *,
                 protocol: Literal["sequential", "batch"], num_seq: int, n_edits: int, metric: Metric,
                 full_curve: bool = False, progress: bool = True, mesh=None, remat: bool = False,
                 capture_chunk: int | None = None, buckets: int = 1,
                 key_prior: dict[str, jax.Array] | None = None) -> EvalResult:
    """Edits the first num_seq * n_edits requests of `split` (sequential) or the first
    n_edits at once (batch), then scores every edited request, and the unedited model.
    `mesh` (a `sharding.make_mesh` mesh; None: one device) places the LLM parameters,
    the deltas and the batches on it (the same jitted steps run either way); `remat`
    and `capture_chunk` trade compute for memory;
    `buckets` > 1 packs the batches in that many layouts (less padding, more compiles);
    `key_prior`: C0 of the locality prior (locality_gram), needed with ecfg.loc_prior.
    The first batch of each layout compiles it: its time is reported apart."""
    if protocol == "batch":
        num_seq = 1
    need = num_seq * n_edits
    if len(split) < need:
        raise ValueError(f"the protocol needs {need} test requests, the data has {len(split)}")
    batches = [np.arange(i * n_edits, (i + 1) * n_edits) for i in range(num_seq)]
    layouts: list[Layout] = split.layouts(batches, buckets=buckets)
    lcfg = model.config
    with use_mesh(mesh):
        model = dataclasses.replace(model, params=place_params(lcfg, model.params, mesh))
        deltas = place_deltas(lcfg, zero_deltas(ecfg, lcfg), mesh)
        state = new_stream(ecfg, lcfg, state, key_prior)
        from tqdm.auto import tqdm
        times, compile_s, curve, compiled = [], 0.0, [], set()
        for i, rows in enumerate(tqdm(batches, desc=f"{protocol} editing", disable=not progress, unit="batch")):
            layout = layouts[i]
            # Placed like the step's outputs (a no-op for those): one compile per layout.
            state = place_editor(state, mesh)
            batch = place_batch(split.batch(rows, layout).edit, mesh)
            t0 = time.perf_counter()
            deltas, state = edit_batch(state, model.params, batch, deltas, ecfg=ecfg, lcfg=lcfg,
                                       n_answer=layout.edit.n_answer, remat=remat, chunk=capture_chunk)
            jax.block_until_ready(deltas)
            dt = time.perf_counter() - t0
            if layout not in compiled:
                compile_s += dt
                compiled.add(layout)
            else:
                times.append(dt)
            if full_curve and i < num_seq - 1:
                curve.append({"batches": i + 1, **summarise(score_requests(
                    model, split, np.arange((i + 1) * n_edits), deltas, metric, mesh=mesh))})
        edited = np.arange(need)
        metrics = summarise(score_requests(model, split, edited, deltas, metric, mesh=mesh))
        baseline = summarise(score_requests(model, split, edited, zero_deltas(ecfg, lcfg), metric, mesh=mesh))
    if full_curve:
        curve.append({"batches": num_seq, **metrics})
    per_edit = float(np.mean(times) / n_edits) if times else float(compile_s / n_edits)
    return EvalResult(metrics, baseline, need, per_edit, compile_s, curve, deltas, state)


def mquake_accuracy(model: Model, ecfg: EditorConfig, state: EditorState, requests, *, n_cases: int,
                    progress: bool = True, key_prior: dict[str, jax.Array] | None = None) -> dict[str, float]:
    """Multi-hop accuracy on MQuAKE: the rewrites of each case are batch-edited together
    (from the unedited model), then each of the case's multi-hop questions is answered
    teacher-forced; a case counts as solved if any question's new answer is predicted
    token for token. Returns edited and unedited accuracy in %. `key_prior`: as in
    run_protocol."""
    from tqdm.auto import tqdm

    from .data import EditRequest
    from .pipeline import encode_split
    cases: dict[Any, list] = {}
    for r in requests:
        cases.setdefault(r.case_id, []).append(r)
    chosen = [v for v in cases.values() if v[0].hop_questions][:n_cases]
    if not chosen:
        raise ValueError("no MQuAKE cases with multi-hop questions in the data")
    rewrites = [r for case in chosen for r in case]
    questions = [EditRequest(prompt=q, target_new=case[0].hop_answer, rephrase=q, loc_prompt=q,
                             loc_answer=case[0].hop_answer, source=f"case {case[0].case_id} question {i}")
                 for case in chosen for i, q in enumerate(case[0].hop_questions)]
    rsplit, qsplit = encode_split(model.tokenizer, rewrites), encode_split(model.tokenizer, questions)
    r_groups, q_groups, r0, q0 = [], [], 0, 0
    for case in chosen:
        r_groups.append(np.arange(r0, r0 + len(case)))
        q_groups.append(np.arange(q0, q0 + len(case[0].hop_questions)))
        r0, q0 = r0 + len(case), q0 + len(case[0].hop_questions)
    r_layout, q_layout = rsplit.layout(r_groups), qsplit.layout(q_groups).edit
    solved = {"edited": [], "unedited": []}
    zero, state = zero_deltas(ecfg, model.config), new_stream(ecfg, model.config, state, key_prior)
    for rg, qg in tqdm(list(zip(r_groups, q_groups)), desc="MQuAKE cases", disable=not progress):
        batch = rsplit.batch(rg, r_layout)
        deltas, _ = edit_batch(state, model.params, batch.edit, zero, ecfg=ecfg, lcfg=model.config,
                               n_answer=r_layout.edit.n_answer)
        qb, alt = qsplit.pack("edit", qg, q_layout)
        qb = Batch(*(jnp.asarray(a) for a in qb))
        for name, d in (("edited", deltas), ("unedited", zero)):
            correct, _, _, mask, seg = jax.device_get(slot_scores(
                model.params, d, qb, jnp.asarray(alt), lcfg=model.config, n_answer=q_layout.n_answer))
            acc = _per_request(correct, mask, seg, len(qg))
            solved[name].append(bool(np.any(acc >= 1.0 - 1e-9)))
    return {"multi_hop_accuracy": 100 * float(np.mean(solved["edited"])),
            "multi_hop_accuracy_unedited": 100 * float(np.mean(solved["unedited"])), "n_cases": len(chosen)}
