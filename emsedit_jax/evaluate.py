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
  Beside them ROME's probability scores (efficacy, paraphrase and neighbourhood score
  and magnitude over all paraphrase and neighbourhood prompts; `metrics`).
- PS (portability) when requests carry portability questions, per kind when there
  are several; fluency (generation entropy before and after) when asked for.
The unedited model is scored on the same requests with the same code. Every score is
kept per request (`EvalResult.per_request`, `per_request_lines`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import metrics as M
from .data import TeacherForced, encode_texts, prompt_ids
from .editor.capture import (IGNORE, Batch, answer_slots, capture, edited_logits, first_layer, pad_rows,
                             prefix_hidden)
from .editor.config import EditorConfig
from .editor.steps import Deltas, EditorState, masked_keys, multi_step_edit, new_stream, zero_deltas
from .models.config import ModelConfig
from .models.hf_io import Model
from .options import check_fields, option
from .pipeline import VIEWS, EncodedSplit, Layout, pack, view_layout
from .sharding import (constrain_deltas, constrain_editor, place_batch, place_deltas, place_editor, place_params,
                       place_rows, to_host, use_mesh)

Metric = Literal["zsre", "counterfact"]


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How an editor is evaluated (run_protocol's options). `key_memory` / `loc_prior` /
    `null_space` / `max_update` / `prior_positions` None keep the editor's values; a
    value overrides them (test-time choices)."""
    protocol: Literal["sequential", "batch"] = option("sequential", "editing protocol")
    num_seq: int = option(10, "batches of a sequential stream (batch protocol: 1)", check="positive")
    n_edits: int = option(10, "requests per edit batch", check="positive")
    full_curve: bool = option(False, "score after every batch of the stream")
    curve_every: int = option(1, "with --full-curve (or --plot), score after every N-th batch (and the last)",
                              check="positive", metavar="N")
    buckets: int = option(1, "distinct edit-batch shapes to compile (less padding, more compiles)", check="positive")
    capture_chunk: int | None = option(None, "edit in microbatches of ROWS packed rows: the capture of keys and value "
                                       "gradients, the hypernetwork and the solve's sums (less memory, same result)",
                                       check="positive", metavar="ROWS",
                                       default_text="all rows at once")
    key_memory: float | None = option(None, "override the editor's key memory MU (see train --key-memory)",
                                      check="nonneg", metavar="MU", default_text="the editor's")
    loc_prior: float | None = option(None, "start each stream's key memory at NU C0, C0 the mean k k^T of the keys "
                                     "at the training requests' locality prompts: dW = (U^T U + e^lamda I + NU C0 + "
                                     "MU G)^-1 U^T D (needs a key memory; an extension)", check="nonneg",
                                     metavar="NU", default_text="the editor's (0: none)")
    null_space: float | None = option(None, "override the editor's null-space projection TAU (see train "
                                      "--null-space)", check="nonneg", metavar="TAU", default_text="the editor's")
    max_update: float | None = option(None, "override the editor's trust region RHO (see train --max-update)",
                                      check="nonneg", metavar="RHO", default_text="the editor's")
    prior_positions: Literal["keys", "all"] | None = option(
        None, "override where C0 takes the preserved prompts' keys (see train --prior-positions)",
        default_text="the editor's")
    prob_scores: bool | None = option(None, "also report ROME's probability scores (efficacy, paraphrase and "
                                      "neighbourhood score and magnitude, from whole-target probabilities of the new "
                                      "and true targets)", default_text="on for CounterFact, off for the others")
    fluency: int = option(0, "also score fluency: n-gram entropy of TOKENS greedily generated tokens on each "
                          "request's generation prompts, edited and unedited (0: off; slow)", check="nonneg",
                          metavar="TOKENS")

    def __post_init__(self):
        check_fields(self)

    def editor_config(self, ecfg: EditorConfig) -> EditorConfig:
        """The editor's config with this evaluation's key memory / locality prior / trust region."""
        overrides = {k: getattr(self, k) for k in ("key_memory", "loc_prior", "null_space", "max_update",
                                                   "prior_positions")
                     if getattr(self, k) is not None}
        if self.key_memory == 0 and self.loc_prior is None:
            overrides["loc_prior"] = 0.0          # the paper's solve: the prior goes with the memory
        return dataclasses.replace(ecfg, **overrides) if overrides else ecfg
SCORE_CHUNK = 25
METRIC_NAMES = {"edit": "ES", "rephrase": "GS", "loc": "LS"}


@functools.partial(jax.jit, static_argnames=("ecfg", "lcfg", "n_answer", "remat", "chunk"))
def edit_batch(state: EditorState, params, batch: Batch, deltas: Deltas, *, ecfg: EditorConfig,
               lcfg: ModelConfig, n_answer: int, remat: bool = False, chunk: int | None = None
               ) -> tuple[Deltas, EditorState]:
    """Applies the T-step edit of one batch (its edit view) to params + deltas.
    `remat` recomputes the LLM layers' activations in the backward pass; `chunk` runs
    the unedited lower layers, the capture, the hypernetwork and the solve's sums in
    microbatches of that many rows (both save memory, same result up to rounding).
    One device or a mesh: the inputs' placement decides (sharding.place_*), and under
    `sharding.use_mesh(mesh)` the new deltas are split like their kernels and the editor
    state by `partition.editor_spec`. With `chunk` on a mesh, a multiple of the row axes
    keeps every microbatch spread over them."""
    if chunk is not None:       # whole microbatches: no padding copies of the activations, keys or slots
        batch = pad_rows(batch, -(-batch.input_ids.shape[0] // chunk) * chunk)
    prefix = prefix_hidden(lcfg, params, batch, first_layer(lcfg, ecfg.modules), remat, chunk)
    deltas, state, _ = multi_step_edit(ecfg, lcfg, params, state, batch, deltas, n_answer=n_answer, prefix=prefix,
                                       remat=remat, chunk=chunk)
    return constrain_deltas(lcfg, deltas), constrain_editor(state)


@functools.partial(jax.jit, static_argnames=("ecfg", "lcfg", "n_answer"))
def _key_gram(params, batch: Batch, *, ecfg: EditorConfig, lcfg: ModelConfig, n_answer: int):
    """Per kernel shape, sum of k k^T (K, d_in, d_in) over the edited modules' keys at the
    batch's key slots (ecfg.key_positions) on the unedited model, and the number of
    slots. Only the keys are returned, so XLA drops the capture's backward pass."""
    cap = capture(lcfg, params, batch, ecfg.modules, n_answer=n_answer, key_positions=ecfg.key_positions)
    keys = masked_keys(ecfg, lcfg, cap)
    return {k: jnp.einsum("kni,knj->kij", u, u) for k, u in keys.items()}, jnp.sum(cap.mask)


def every_token(batch: Batch) -> Batch:
    """`batch` with every token of each sequence but its first marked as an answer slot
    (the key slots of C0 with EditorConfig.prior_positions "all"; up to S per row)."""
    s = batch.input_ids.shape[1]
    positions = jnp.broadcast_to(jnp.arange(s), batch.input_ids.shape) if batch.positions is None \
        else batch.positions
    marked = (batch.attention_mask > 0) & (positions > 0)
    return batch._replace(labels=jnp.where(marked, 0, IGNORE).astype(batch.labels.dtype))


def locality_gram(model: Model, ecfg: EditorConfig, split: EncodedSplit, *, n_edits: int = 10,
                  progress: bool = True, view: str = "loc") -> dict[str, jax.Array]:
    """C0 of the locality prior (EditorConfig.loc_prior) and the null-space projection:
    per kernel shape, the mean k k^T (K, d_in, d_in) of the edited modules' keys in
    `split`'s `view` (default: the locality prompts) on the unedited model, at every
    token but each sequence's first (ecfg.prior_positions "all") or at the editor's key
    slots ("keys"). Pass the training requests, never the ones edited."""
    from tqdm.auto import tqdm
    if len(split) == 0:
        raise ValueError("locality_gram needs at least one request")
    batches = [np.arange(i, min(i + n_edits, len(split))) for i in range(0, len(split), n_edits)]
    layout = split.layout(batches)
    all_tokens = ecfg.prior_positions == "all"
    kcfg = dataclasses.replace(ecfg, key_positions="answer") if all_tokens else ecfg
    total, count = None, 0
    for rows in tqdm(batches, desc="locality prior", disable=not progress, unit="batch"):
        batch = getattr(split.batch(rows, layout), view)
        n_answer = getattr(layout, view).n_answer
        if all_tokens:
            batch, n_answer = every_token(batch), batch.input_ids.shape[1]
        gram, n = _key_gram(model.params, batch, ecfg=kcfg, lcfg=model.config, n_answer=n_answer)
        total = gram if total is None else {k: total[k] + gram[k] for k in total}
        count += int(n)
    return {k: g / count for k, g in total.items()}


PRIOR_SOURCES = ("loc", "wide")


def preserved_requests(requests: Sequence, source: str = "loc") -> list:
    """Facts to preserve, as requests whose edit view (prompt -> target_new) is the fact:
    "loc": the requests' locality prompts with their answers; "wide": those, and the
    requests' own prompts and paraphrases with their true answers (when the data gives
    target_true), their subject kept so subject keys are found (duplicates dropped)."""
    from .data import EditRequest
    if source not in PRIOR_SOURCES:
        raise ValueError(f"prior source must be one of {PRIOR_SOURCES}, not {source!r}")
    facts = [(r.loc_prompt, r.loc_answer, None, r.source) for r in requests]
    if source == "wide":
        for r in requests:
            if r.target_true:
                facts += [(r.prompt, r.target_true, r.subject, r.source), (r.rephrase, r.target_true, r.subject,
                                                                         r.source)]
    seen, out = set(), []
    for prompt, answer, subject, src in facts:
        if (prompt, answer) in seen:
            continue
        seen.add((prompt, answer))
        out.append(EditRequest(prompt=prompt, target_new=answer, rephrase=prompt, loc_prompt=prompt,
                               loc_answer=answer, subject=subject, source=src))
    return out


def preserved_gram(model: Model, ecfg: EditorConfig, requests: Sequence, *, source: str = "loc",
                   n_edits: int = 10, progress: bool = True, chat_template: bool = False) -> dict[str, jax.Array]:
    """C0 over the preserved facts of `requests` (preserved_requests; the training
    requests, never the ones edited), keys at ecfg.key_positions."""
    from .pipeline import encode_split
    facts = encode_split(model.tokenizer, preserved_requests(requests, source), chat_template=chat_template)
    return locality_gram(model, ecfg, facts, n_edits=n_edits, progress=progress, view="edit")


def _each_model(lcfg: ModelConfig, params, batch: Batch, models: Sequence[Deltas], n_answer: int):
    """(logits, targets, mask) of params + each of `models` (a tuple of deltas) at the
    answer slots. The layers below the lowest edited one are the same for all of them
    and run once (an edited model and its unedited baseline score for the price of one
    prefix)."""
    modules = sorted({name for deltas in models for name in deltas})
    prefix = prefix_hidden(lcfg, params, batch, first_layer(lcfg, modules)) if modules else None
    return [edited_logits(lcfg, params, batch, deltas, n_answer=n_answer, prefix=prefix) for deltas in models]


@functools.partial(jax.jit, static_argnames=("lcfg", "n_answer"))
def slot_scores(params, models: Sequence[Deltas], batch: Batch, alt: jax.Array, *, lcfg: ModelConfig, n_answer: int):
    """Per answer slot of params + each of `models` (a tuple of deltas): argmax == label
    and logit(label) > logit(alt), each (M, R, A); whether the comparison exists, the
    slot mask and the segment (request) id, each (R, A)."""
    positions, _, mask = answer_slots(batch.labels, n_answer)
    alt_ids = jnp.take_along_axis(alt, positions, axis=1)
    segment = jnp.take_along_axis(batch.attention_mask, positions, axis=1)
    correct, beats = [], []
    for logits, targets, _ in _each_model(lcfg, params, batch, models, n_answer):
        lt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        la = jnp.take_along_axis(logits, jnp.maximum(alt_ids, 0)[..., None], axis=-1)[..., 0]
        correct.append(jnp.argmax(logits, -1) == targets)
        beats.append(lt > la)
    return jnp.stack(correct), jnp.stack(beats), mask & (alt_ids >= 0), mask, segment


def _per_request(values: np.ndarray, valid: np.ndarray, segment: np.ndarray, n: int) -> np.ndarray:
    """Mean of `values` over the valid slots of each request (segment k+1 -> request k)."""
    seg = segment[valid] - 1
    num = np.bincount(seg, weights=values[valid].astype(np.float64), minlength=n)
    den = np.bincount(seg, minlength=n)
    return np.where(den > 0, num / np.maximum(den, 1), np.nan)


@dataclasses.dataclass
class Probes:
    """The extra teacher-forced sequences of the probability and portability scores:
    sequence p belongs to request `request[p]`, metric group `group[p]` ("edit",
    "para", "neigh" or "port/<kind>"), item `item[p]` of that group, and `role[p]`
    ("new" / "true": which target follows the prompt; "answer": a portability answer)."""
    request: np.ndarray
    group: list[str]
    item: list[int]
    role: list[str]
    tf: TeacherForced


def build_probes(tokenizer, requests, *, prob_scores: bool, chat_template: bool = False) -> Probes | None:
    """Probes of `requests`: with `prob_scores`, the new and the true target after the
    edit prompt, every paraphrase and every neighbourhood prompt (of requests with a
    true target; the locality prompt is a neighbour when its answer is the true
    target); the portability items of every request that has them. None if
    there is nothing to score (so data without these fields cost nothing)."""
    rows: list[tuple[int, str, int, str, str, str]] = []
    for i, r in enumerate(requests):
        if prob_scores and r.target_true is not None:
            # Neighbours share the relation and the true object (CounterFact); a locality
            # prompt with another answer (ZsRE's unrelated questions) is no neighbour.
            neighbours = r.neighbours or ((r.loc_prompt,) if r.loc_answer == r.target_true else ())
            groups = (("edit", (r.prompt,)), ("para", r.paraphrases or (r.rephrase,)), ("neigh", neighbours))
            for group, prompts in groups:
                for j, prompt in enumerate(prompts):
                    rows += [(i, group, j, "new", prompt, r.target_new), (i, group, j, "true", prompt, r.target_true)]
        for j, (kind, question, answer) in enumerate(r.portability):
            rows.append((i, f"port/{kind}", j, "answer", question, answer))
    if not rows:
        return None
    request, group, item, role, prompts, targets = zip(*rows)
    return Probes(np.asarray(request), list(group), list(item), list(role),
                  encode_texts(tokenizer, list(prompts), list(targets), chat_template=chat_template))


@functools.partial(jax.jit, static_argnames=("lcfg", "n_answer"))
def slot_logprobs(params, models: Sequence[Deltas], batch: Batch, *, lcfg: ModelConfig, n_answer: int):
    """Per answer slot of params + each of `models`: log P(label) and argmax == label,
    each (M, R, A); the slot mask and segment id (R, A)."""
    positions, _, mask = answer_slots(batch.labels, n_answer)
    segment = jnp.take_along_axis(batch.attention_mask, positions, axis=1)
    logp, correct = [], []
    for logits, targets, _ in _each_model(lcfg, params, batch, models, n_answer):
        logp.append(jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0])
        correct.append(jnp.argmax(logits, -1) == targets)
    return jnp.stack(logp), jnp.stack(correct), mask, segment


def _probe_values(model: Model, probes: Probes, chunks: list[np.ndarray], layout_chunks: list[np.ndarray],
                  models: tuple[Deltas, ...], mesh=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per model of `models`: whole-target log-probability and token accuracy of the
    probes in `chunks` (lists of probe indices; NaN for the others). The layout holds
    every chunk of `layout_chunks`."""
    vl = view_layout(probes.tf, layout_chunks)
    logp = np.full((len(models), len(probes.request)), np.nan)
    acc = np.full((len(models), len(probes.request)), np.nan)
    for c in chunks:
        batch, _ = pack(probes.tf, c, vl, "probes")
        lts, corrects, mask, seg = to_host(slot_logprobs(
            model.params, models, place_batch(Batch(*batch), mesh), lcfg=model.config, n_answer=vl.n_answer))
        seg = seg[mask] - 1
        n = np.bincount(seg, minlength=len(c))
        for k, (lt, correct) in enumerate(zip(lts, corrects)):
            lp = np.bincount(seg, weights=lt[mask].astype(np.float64), minlength=len(c))
            ok = np.bincount(seg, weights=correct[mask].astype(np.float64), minlength=len(c))
            logp[k, c] = np.where(n > 0, lp, np.nan)
            acc[k, c] = np.where(n > 0, ok / np.maximum(n, 1), np.nan)
    return list(zip(logp, acc))


def probe_metrics(probes: Probes, rows: np.ndarray, logp: np.ndarray, acc: np.ndarray) -> dict[str, np.ndarray]:
    """Per-request probability and portability scores (fractions; see `metrics`) of
    requests `rows` from their probes' values."""
    by_request: dict[int, dict[str, dict[int, dict[str, float]]]] = {}
    for p in range(len(probes.request)):
        if not np.isnan(logp[p]):
            value = acc[p] if probes.role[p] == "answer" else logp[p]
            groups = by_request.setdefault(int(probes.request[p]), {})
            groups.setdefault(probes.group[p], {}).setdefault(probes.item[p], {})[probes.role[p]] = value
    kinds = sorted({g for g in probes.group if g.startswith("port/")})
    names = {"edit": ("efficacy_score", "efficacy_magnitude"), "para": ("paraphrase_score", "paraphrase_magnitude"),
             "neigh": ("neighborhood_score", "neighborhood_magnitude")}
    out: dict[str, np.ndarray] = {}
    if any(g in names for g in probes.group):
        out |= {name: np.full(len(rows), np.nan) for pair in names.values() for name in pair}
    if kinds:
        out["PS"] = np.full(len(rows), np.nan)
        if len(kinds) > 1:
            out |= {f"PS/{k[5:]}": np.full(len(rows), np.nan) for k in kinds}
    for k, r in enumerate(rows):
        groups = by_request.get(int(r), {})
        for group, (score, magnitude) in names.items():
            items = [v for v in groups.get(group, {}).values() if "new" in v and "true" in v]
            if items:
                new, true = [v["new"] for v in items], [v["true"] for v in items]
                a, b = (true, new) if group == "neigh" else (new, true)
                out[score][k], out[magnitude][k] = M.prob_score(a, b)
        port = {g: [v["answer"] for v in items.values()] for g, items in groups.items() if g.startswith("port/")}
        if port:
            out["PS"][k] = float(np.mean([a for accs in port.values() for a in accs]))
            if len(kinds) > 1:
                for g, accs in port.items():
                    out[f"PS/{g[5:]}"][k] = float(np.mean(accs))
    return out


GEN_CHUNK = 25


def generate(model: Model, params, prompts: Sequence[str], max_new_tokens: int, *, chat_template: bool = False,
             chunk: int = GEN_CHUNK) -> list[str]:
    """Greedy continuations (text, up to the first eos) of `prompts` under `params`, in
    chunks of one shape (one compile)."""
    from .data import pad_id_of
    from .models import greedy_generate
    ids = prompt_ids(model.tokenizer, prompts, chat_template=chat_template)
    width = -(-max(map(len, ids)) // 16) * 16
    pad, eos = pad_id_of(model.tokenizer), getattr(model.tokenizer, "eos_token_id", None)
    texts = []
    for c in range(0, len(ids), chunk):
        rows = ids[c:c + chunk]
        buf = np.full((chunk, width), pad, np.int32)
        mask = np.zeros_like(buf)
        for i, e in enumerate(rows + [[pad]] * (chunk - len(rows))):
            buf[i, :len(e)], mask[i, :len(e)] = e, 1
        out = greedy_generate(model.config, params, buf, mask, max_new_tokens, pad)
        for row in out[:len(rows)]:
            row = list(row)
            if eos is not None and eos in row:
                row = row[:row.index(eos)]
            texts.append(model.tokenizer.decode(row, skip_special_tokens=True))
    return texts


def fluency_scores(model: Model, requests, rows: np.ndarray, deltas: Deltas, max_new_tokens: int, *,
                   chat_template: bool = False) -> np.ndarray:
    """Per request, the mean generation entropy (metrics.generation_entropy) of prompt +
    greedy continuation over its generation prompts (the edit prompt when it has none),
    under params + deltas."""
    from .models import apply_deltas
    params = apply_deltas(model.config, model.params, deltas)
    owner, prompts = [], []
    for k, r in enumerate(rows):
        ps = requests[r].generation_prompts or (requests[r].prompt,)
        owner += [k] * len(ps)
        prompts += list(ps)
    texts = generate(model, params, prompts, max_new_tokens, chat_template=chat_template)
    ent = np.asarray([M.generation_entropy(p + t) for p, t in zip(prompts, texts)])
    owner = np.asarray(owner)
    return np.bincount(owner, weights=ent, minlength=len(rows)) / np.bincount(owner, minlength=len(rows))


def _chunks(rows: np.ndarray, chunk: int) -> list[np.ndarray]:
    return [rows[i:i + chunk] for i in range(0, len(rows), chunk)]


def score_requests(model: Model, split: EncodedSplit, rows: Sequence[int], deltas: Deltas | Sequence[Deltas],
                   metric: Metric, chunk: int = SCORE_CHUNK, *, probes: Probes | None = None,
                   fluency_tokens: int = 0, layout_rows: Sequence[int] | None = None,
                   mesh=None) -> dict[str, np.ndarray] | list[dict[str, np.ndarray]]:
    """Per-request scores (fractions; fluency in bits) of params + deltas on requests
    `rows`: ES / GS / LS, the probes' scores (build_probes) and with `fluency_tokens` > 0
    the fluency of that many generated tokens. `deltas` a sequence of deltas (say an
    edited model and zero_deltas, its baseline): a list of scores, one per model, the
    layers below the lowest edited one run once for all. Shapes are laid out for the
    chunks of `layout_rows` (default `rows`; pass a superset to reuse one compile). With a
    `mesh` (model.params placed on it, as run_protocol does) the scored rows are split
    over it too, built on every process from the rows it holds, and every process gets
    the scores."""
    single = isinstance(deltas, Mapping)
    models = tuple(place_deltas(model.config, d, mesh) for d in ([deltas] if single else deltas))
    rows = np.asarray(rows)
    chunks = _chunks(rows, chunk)
    layout_chunks = _chunks(np.asarray(rows if layout_rows is None else layout_rows), chunk)
    layout = split.layout(layout_chunks)
    out = [{METRIC_NAMES[v]: [] for v in VIEWS} for _ in models]
    for c in chunks:
        for view in VIEWS:
            vl = getattr(layout, view)
            batch, alt = split.pack(view, c, vl)
            batch, alt = place_batch(batch, mesh), place_rows(alt, mesh, IGNORE)
            correct, beats, has_alt, mask, seg = to_host(
                slot_scores(model.params, models, batch, alt, lcfg=model.config, n_answer=vl.n_answer))
            for k in range(len(models)):
                vals = _per_request(correct[k], mask, seg, len(c)) if metric == "zsre" else \
                    _per_request(beats[k], has_alt, seg, len(c))
                out[k][METRIC_NAMES[view]].append(vals)
    scores = [{name: np.concatenate(v) for name, v in o.items()} for o in out]
    if probes is not None:
        def probe_chunks(rs):
            return [p for p in (np.flatnonzero(np.isin(probes.request, c)) for c in rs) if len(p)]
        mine = probe_chunks(chunks)
        if mine:
            values = _probe_values(model, probes, mine, probe_chunks(layout_chunks) or mine, models, mesh)
            for s, (logp, acc) in zip(scores, values):
                s |= probe_metrics(probes, rows, logp, acc)
    if fluency_tokens > 0:
        for s, d in zip(scores, models):
            s["fluency"] = fluency_scores(model, split.requests, rows, d, fluency_tokens,
                                          chat_template=split.chat_template)
    return scores[0] if single else scores


def summarise(per_request: dict[str, np.ndarray]) -> dict[str, float]:
    return M.summarise(per_request)


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
    per_request: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)           # edited
    per_request_baseline: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # unedited
    n_edits: int = 0


def per_request_lines(result: EvalResult, requests) -> list[dict[str, Any]]:
    """One record per edited request, in stream order: its id (case_id, else its
    source), source, batch and position in the batch, and every score edited and
    unedited, in the units of the aggregates (None where it has none). The mean of a
    metric over the lines that have it is the aggregate in `result.metrics`."""
    scale = {k: 1 if k in M.NOT_PERCENT else 100 for k in result.per_request}

    def values(per_request, i):
        return {k: None if np.isnan(v[i]) else float(v[i]) * scale[k] for k, v in per_request.items()}

    out = []
    for i in range(result.n_requests):
        r = requests[i]
        out.append({"id": r.case_id if r.case_id is not None else r.source, "source": r.source,
                    "batch": i // result.n_edits, "position": i % result.n_edits,
                    "edited": values(result.per_request, i), "unedited": values(result.per_request_baseline, i)})
    return out


def run_protocol(model: Model, ecfg: EditorConfig, state: EditorState, split: EncodedSplit, *,
                 protocol: Literal["sequential", "batch"], num_seq: int, n_edits: int, metric: Metric,
                 full_curve: bool = False, progress: bool = True, mesh=None, remat: bool = False,
                 curve_every: int = 1,
                 capture_chunk: int | None = None, buckets: int = 1,
                 key_prior: dict[str, jax.Array] | None = None, prob_scores: bool | None = None,
                 fluency_tokens: int = 0) -> EvalResult:
    """Edits the first num_seq * n_edits requests of `split` (sequential) or the first
    n_edits at once (batch), then scores every edited request, and the unedited model.
    `prob_scores` (default: for the "counterfact" metric) adds ROME's probability
    scores; portability is scored when requests have it; `fluency_tokens` > 0 adds the
    fluency of that many greedily generated tokens (not in the curve: it is slow).
    `mesh` (a `sharding.make_mesh` mesh; None: one device) places the LLM parameters,
    the deltas and the batches on it (the same jitted steps run either way); `remat`
    and `capture_chunk` trade compute for memory;
    `buckets` > 1 packs the batches in that many layouts (less padding, more compiles);
    `key_prior`: C0 (preserved_gram), needed with ecfg.loc_prior or ecfg.null_space.
    The first batch of each layout compiles it: its time is reported apart."""
    with use_mesh(mesh):
        return _run_protocol(model, ecfg, state, split, protocol, num_seq, n_edits, metric, full_curve, curve_every,
                             progress, mesh, remat, capture_chunk, buckets, key_prior, prob_scores, fluency_tokens)


def _run_protocol(model, ecfg, state, split, protocol, num_seq, n_edits, metric, full_curve, curve_every, progress,
                  mesh, remat, capture_chunk, buckets, key_prior, prob_scores, fluency_tokens) -> EvalResult:
    lcfg = model.config
    model = dataclasses.replace(model, params=place_params(lcfg, model.params, mesh))
    if protocol == "batch":
        num_seq = 1
    need = num_seq * n_edits
    if len(split) < need:
        raise ValueError(f"the protocol needs {need} test requests, the data has {len(split)}")
    batches = [np.arange(i * n_edits, (i + 1) * n_edits) for i in range(num_seq)]
    edited = np.arange(need)
    if prob_scores is None:
        prob_scores = metric == "counterfact"
    probes = build_probes(model.tokenizer, split.requests[:need], prob_scores=prob_scores,
                          chat_template=split.chat_template)
    score = functools.partial(score_requests, model, split, metric=metric, probes=probes, layout_rows=edited,
                              mesh=mesh)
    layouts: list[Layout] = split.layouts(batches, buckets=buckets)
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
        if full_curve and i < num_seq - 1 and (i + 1) % curve_every == 0:
            curve.append({"batches": i + 1, **summarise(score(np.arange((i + 1) * n_edits), deltas))})
    per_request, per_request_baseline = score(edited, (deltas, zero_deltas(ecfg, lcfg)), fluency_tokens=fluency_tokens)
    metrics, baseline = summarise(per_request), summarise(per_request_baseline)
    if full_curve:
        curve.append({"batches": num_seq, **{k: v for k, v in metrics.items() if k != "fluency"}})
    per_edit = float(np.mean(times) / n_edits) if times else float(compile_s / n_edits)
    return EvalResult(metrics, baseline, need, per_edit, compile_s, curve, deltas, state, per_request,
                      per_request_baseline, n_edits)


def mquake_accuracy(model: Model, ecfg: EditorConfig, state: EditorState, requests, *, n_cases: int,
                    progress: bool = True, key_prior: dict[str, jax.Array] | None = None,
                    chat_template: bool = False) -> dict[str, float]:
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
    rsplit = encode_split(model.tokenizer, rewrites, chat_template=chat_template)
    qsplit = encode_split(model.tokenizer, questions, chat_template=chat_template)
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
        correct, _, _, mask, seg = jax.device_get(slot_scores(
            model.params, (deltas, zero), qb, jnp.asarray(alt), lcfg=model.config, n_answer=q_layout.n_answer))
        for name, c in zip(("edited", "unedited"), correct):
            acc = _per_request(c, mask, seg, len(qg))
            solved[name].append(bool(np.any(acc >= 1.0 - 1e-9)))
    return {"multi_hop_accuracy": 100 * float(np.mean(solved["edited"])),
            "multi_hop_accuracy_unedited": 100 * float(np.mean(solved["unedited"])), "n_cases": len(chosen)}
