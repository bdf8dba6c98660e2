"""Edit requests: loading, format detection and validation.

Every supported data set is turned into a flat list of :class:`EditRequest`. All
records are validated before :func:`load_requests` returns, so a long training run
never starts on a file that would fail half-way through.  Local files are read with
the standard library's ``json`` (JSON Lines line by line): values keep their JSON
types, so a bad field is only its own record's error.  ``datasets`` is used for hub
ids (``org/name``) only.

Supported formats (``fmt``):

``"zsre"``
    ZsRE in the MEND format: ``src`` (prompt), ``alt`` (new target), ``rephrase``,
    ``loc`` (locality prompt, kept as is with its ``"nq question: "`` prefix),
    ``loc_ans``, ``answers`` (``answers[0]`` is the true answer), ``subject``;
    optionally EasyEdit's ``portability`` (below).
``"counterfact"``
    CounterFact, flat EasyEdit/MEND format: ``prompt``, ``target_new``,
    ``ground_truth``, ``subject``, ``rephrase_prompt``, ``locality_prompt``,
    ``locality_ground_truth``, ``case_id``; optionally ``portability``.
``"counterfact_rome"`` (alias ``"rome"``)
    CounterFact, ROME/MEMIT format: ``requested_rewrite{prompt, subject,
    target_new{str}, target_true{str}}``, ``paraphrase_prompts[]``,
    ``neighborhood_prompts[]``, optionally ``generation_prompts[]``.  The first
    paraphrase is the rephrase, the first neighbourhood prompt the locality prompt,
    whose answer is the true target; all of them are kept (``paraphrases``,
    ``neighbours``) for the probability scores.
``"knowedit"``
    EasyEdit's KnowEdit records: ``prompt``, ``target_new``, ``subject``,
    ``ground_truth`` (optional: a string, a list of aliases or a list of alias
    lists; the first string is the true target), ``rephrase_prompt`` /
    ``paraphrase_prompt`` / ``rephrase`` (optional: the prompt itself when absent),
    the locality probe as ``locality_prompt`` + ``locality_ground_truth`` or a
    ``locality`` object of kinds (its first item), and ``portability``.
``"mquake"``
    MQuAKE: one request per entry of ``requested_rewrite[]``, all with the case's
    ``case_id``; the case's multi-hop ``questions`` and ``new_answer`` go on its
    first request.  The locality probe is an original single-hop fact that no case
    of the file edits; see :func:`_parse_mquake`.
``"user"``
    A JSON or JSONL file whose records use either the CounterFact-flat or the ZsRE
    field names (detected from the first record).  Unlike the standard formats the
    true target (``ground_truth`` / ``answers``) may be left out.
``"auto"``
    Detect one of the standard formats from the first record's keys.

``portability`` (ZsRE, flat CounterFact, KnowEdit) comes in two shapes: one object
``{"New Question": ..., "New Answer": ...}`` (EasyEdit's ZsRE; kind
``"portability"``), or KnowEdit's object of kinds, ``{"Reasoning": [{"prompt": ...,
"ground_truth": ...}, ...], "Subject_Aliasing": [...], ...}`` (an item's
``ground_truth`` in any of the forms above).  Each item becomes a (kind, question,
answer) triple of ``EditRequest.portability``.

Surrounding whitespace is stripped from every text field: the tokenisation adds
exactly one space between a prompt and its target (some ZsRE ``alt`` targets and the
ROME-format targets start with a space).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import UserError

__all__ = [
    "EditRequest",
    "DataError",
    "LoadResult",
    "FORMATS",
    "load_requests",
    "read_records",
    "resolve_data_path",
    "file_sha256",
    "request_hash",
    "find_duplicates",
    "detect_format",
    "split_requests",
]


@dataclasses.dataclass(frozen=True)
class EditRequest:
    """One edit: a prompt with its new target, a paraphrase and a locality probe.

    ``hop_questions`` / ``hop_answer`` are only set for MQuAKE, on the first request
    of each case: the multi-hop questions and the answer expected once all the
    case's edits are applied.  ``source`` says where the request came from
    (``"file.json#12"``) and is used in error messages.

    Optional extras, read when a file has them: ``paraphrases`` / ``neighbours``, all
    the paraphrase / neighbourhood prompts of a ROME-format record (``rephrase`` and
    ``loc_prompt`` are the first ones; a neighbour's answer is ``target_true``);
    ``generation_prompts`` for the fluency measure; ``portability``, (kind, question,
    answer) triples whose answers should follow from the edit.
    """

    prompt: str
    target_new: str
    rephrase: str
    loc_prompt: str
    loc_answer: str
    target_true: str | None = None
    subject: str | None = None
    case_id: str | int | None = None
    hop_questions: tuple[str, ...] = ()
    hop_answer: str | None = None
    source: str = ""
    paraphrases: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    generation_prompts: tuple[str, ...] = ()
    portability: tuple[tuple[str, str, str], ...] = ()


class DataError(UserError):
    """Invalid input data.

    The message always names the file (or request source), the record index (and
    line, for JSON Lines), the case id when there is one, and the offending field.
    The parts are also kept as attributes.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        index: int | None = None,
        case_id: Any = None,
        field: str | None = None,
        line: int | None = None,
    ):
        self.reason = reason
        self.file = file
        self.index = index
        self.case_id = case_id
        self.field = field
        self.line = line
        where = []
        if file is not None:
            where.append(str(file))
        if index is not None:
            where.append(f"record {index}" + (f" (line {line})" if line is not None else ""))
        if case_id is not None:
            where.append(f"case_id={case_id!r}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


def raise_first(errors: Sequence["DataError"], what: str, hint: str) -> None:
    """Raises the first of `errors`, saying how many more there are (no-op if none)."""
    if not errors:
        return
    first = errors[0]
    if len(errors) == 1:
        raise first
    raise DataError(f"{first.reason} (and {len(errors) - 1} more {what}; {hint})", file=first.file,
                    index=first.index, case_id=first.case_id, field=first.field, line=first.line)


@dataclasses.dataclass
class LoadResult:
    """Requests that passed validation, the reasons for those that were skipped, the
    requests that repeat an earlier one, and the file read: its absolute resolved path
    (or the hub id) and SHA-256 (None for a hub data set)."""

    requests: list[EditRequest]
    skipped: list[str] = dataclasses.field(default_factory=list)
    duplicates: list[str] = dataclasses.field(default_factory=list)
    path: str | None = None
    sha256: str | None = None
    n_records: int | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)


FORMATS = ("auto", "zsre", "counterfact", "counterfact_rome", "mquake", "knowedit", "user")
_ALIASES = {
    "rome": "counterfact_rome",
    "cf": "counterfact",
    "counterfact_flat": "counterfact",
    "zsre_mend": "zsre",
    "easyedit": "knowedit",
}
# What detection looks for, per format (for the message when nothing matches).
_EXPECTED = {
    "zsre": "src, alt, rephrase, loc, loc_ans, answers",
    "counterfact": "prompt, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth",
    "counterfact_rome": "requested_rewrite{...}, paraphrase_prompts, neighborhood_prompts",
    "mquake": "requested_rewrite[...], questions, new_answer",
    "knowedit": "prompt, target_new, and a locality or portability object",
}
_ZSRE_KEYS = frozenset({"src", "alt", "rephrase", "loc", "loc_ans", "answers"})
_FLAT_KEYS = frozenset(
    {
        "prompt",
        "target_new",
        "ground_truth",
        "rephrase_prompt",
        "locality_prompt",
        "locality_ground_truth",
    }
)
_LOCAL_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


# --------------------------------------------------------------------------- #
# Field access with error messages
# --------------------------------------------------------------------------- #

_MISSING = object()


class _Ctx:
    """Where a record comes from; builds DataErrors and reads typed fields."""

    def __init__(self, file: str, index: int, case_id: Any = None, line: int | None = None):
        self.file = file
        self.index = index
        self.case_id = case_id
        self.line = line

    def error(self, field: str | None, reason: str) -> DataError:
        return DataError(
            reason, file=self.file, index=self.index, case_id=self.case_id, field=field, line=self.line
        )

    def get(self, obj: Any, key: str | int, path: str, *, required: bool = True) -> Any:
        """Read ``obj[key]``; a missing key and a JSON null are both 'missing'."""
        if isinstance(key, int):
            value = obj[key] if isinstance(obj, list) and -len(obj) <= key < len(obj) else _MISSING
        else:
            value = obj.get(key, _MISSING) if isinstance(obj, dict) else _MISSING
        if value is _MISSING or value is None:
            if required:
                raise self.error(path, "missing (absent or null)")
            return None
        return value

    def text(self, obj: Any, key: str | int, path: str, *, required: bool = True) -> str | None:
        value = self.get(obj, key, path, required=required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(path, f"expected a string, got {_json_type(value)} {json.dumps(value)[:60]}")
        value = value.strip()
        if not value:
            if not required:  # an empty optional field (e.g. subject) counts as absent
                return None
            raise self.error(path, "empty or whitespace-only string")
        return value

    def mapping(self, obj: Any, key: str, path: str, *, required: bool = True) -> dict | None:
        value = self.get(obj, key, path, required=required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(path, f"expected an object, got {_json_type(value)}")
        return value

    def array(
        self, obj: Any, key: str, path: str, *, required: bool = True, min_len: int = 1
    ) -> list | None:
        value = self.get(obj, key, path, required=required)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {_json_type(value)}")
        if len(value) < min_len:
            raise self.error(path, f"expected at least {min_len} element(s), got {len(value)}")
        return value

    def text_list(self, obj: Any, key: str, path: str, *, required: bool = True) -> list[str] | None:
        values = self.array(obj, key, path, required=required)
        if values is None:
            return None
        return [self.text(values, i, f"{path}[{i}]") for i in range(len(values))]


def _case_id_of(row: dict, ctx: _Ctx) -> str | int | None:
    value = row.get("case_id") if isinstance(row, dict) else None
    if value is None:
        return None
    # bool is an int subclass but never a sensible id.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ctx.error("case_id", f"expected an integer or a string, got {_json_type(value)} {json.dumps(value)[:60]}")
    return value


# --------------------------------------------------------------------------- #
# Per-format record parsers
# --------------------------------------------------------------------------- #


def _first_answer(value: Any, ctx: _Ctx, path: str) -> str:
    """A KnowEdit answer: a string, a list of aliases or a list of alias lists -> the
    first string."""
    while isinstance(value, list) and value:
        value, path = value[0], f"{path}[0]"
    if not isinstance(value, str) or not value.strip():
        raise ctx.error(path, f"expected a non-empty string or a list of them, got {_json_type(value)} "
                              f"{json.dumps(value)[:60]}")
    return value.strip()


def _kind_items(obj: dict, ctx: _Ctx, path: str) -> list[tuple[str, str, str]]:
    """KnowEdit's {kind: [{prompt, ground_truth}, ...]} -> (kind, prompt, answer) triples
    (a kind may also hold a single item object)."""
    out = []
    for kind, items in obj.items():
        if items is None:
            continue
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list):
            raise ctx.error(f"{path}.{kind}", f"expected a list of {{prompt, ground_truth}} objects, got "
                                              f"{_json_type(items)}")
        for j, item in enumerate(items):
            where = f"{path}.{kind}[{j}]"
            if not isinstance(item, dict):
                raise ctx.error(where, f"expected a {{prompt, ground_truth}} object, got {_json_type(item)}")
            prompt = ctx.text(item, "prompt", f"{where}.prompt")
            out.append((str(kind), prompt, _first_answer(ctx.get(item, "ground_truth", f"{where}.ground_truth"),
                                                         ctx, f"{where}.ground_truth")))
    return out


def _portability(row: dict, ctx: _Ctx) -> tuple[tuple[str, str, str], ...]:
    """The record's optional ``portability`` in either shape (module docstring)."""
    port = ctx.mapping(row, "portability", "portability", required=False)
    if not port:
        return ()
    if "New Question" in port or "New Answer" in port:
        return (("portability", ctx.text(port, "New Question", "portability.New Question"),
                 _first_answer(ctx.get(port, "New Answer", "portability.New Answer"), ctx,
                               "portability.New Answer")),)
    return tuple(_kind_items(port, ctx, "portability"))


def _parse_knowedit(row: dict, ctx: _Ctx, source: str) -> list[EditRequest]:
    prompt = ctx.text(row, "prompt", "prompt")
    rephrase = None
    for key in ("rephrase_prompt", "paraphrase_prompt", "rephrase"):
        rephrase = rephrase or ctx.text(row, key, key, required=False)
    truth = ctx.get(row, "ground_truth", "ground_truth", required=False)
    loc = ctx.mapping(row, "locality", "locality", required=False)
    if loc and row.get("locality_prompt") is None:
        items = _kind_items(loc, ctx, "locality")
        if not items:
            raise ctx.error("locality", "no {prompt, ground_truth} item in any kind")
        _, loc_prompt, loc_answer = items[0]
    else:
        if row.get("locality_prompt") is None:
            raise ctx.error("locality", "missing: a locality probe is needed, as a 'locality' object of kinds "
                                        "({'Relation_Specificity': [{prompt, ground_truth}]}) or "
                                        "'locality_prompt' + 'locality_ground_truth'")
        loc_prompt = ctx.text(row, "locality_prompt", "locality_prompt")
        loc_answer = _first_answer(ctx.get(row, "locality_ground_truth", "locality_ground_truth"), ctx,
                                   "locality_ground_truth")
    return [
        EditRequest(
            prompt=prompt,
            target_new=_first_answer(ctx.get(row, "target_new", "target_new"), ctx, "target_new"),
            rephrase=rephrase or prompt,
            loc_prompt=loc_prompt,
            loc_answer=loc_answer,
            target_true=None if truth is None else _first_answer(truth, ctx, "ground_truth"),
            subject=ctx.text(row, "subject", "subject", required=False),
            case_id=ctx.case_id,
            source=source,
            portability=_portability(row, ctx),
        )
    ]


def _parse_zsre(row: dict, ctx: _Ctx, source: str, require_true: bool = True) -> list[EditRequest]:
    subject = ctx.text(row, "subject", "subject", required=False)
    prompt = ctx.text(row, "src", "src")
    target_new = ctx.text(row, "alt", "alt")
    rephrase = ctx.text(row, "rephrase", "rephrase")
    loc = ctx.text(row, "loc", "loc")
    loc_ans = ctx.text(row, "loc_ans", "loc_ans")
    answers = ctx.array(row, "answers", "answers", required=require_true)
    target_true = None
    if answers is not None:
        target_true = ctx.text(answers, 0, "answers[0]")
    return [
        EditRequest(
            prompt=prompt,
            target_new=target_new,
            rephrase=rephrase,
            loc_prompt=loc,
            loc_answer=loc_ans,
            target_true=target_true,
            subject=subject,
            case_id=ctx.case_id,
            source=source,
            portability=_portability(row, ctx),
        )
    ]


def _parse_flat(row: dict, ctx: _Ctx, source: str, require_true: bool = True) -> list[EditRequest]:
    return [
        EditRequest(
            prompt=ctx.text(row, "prompt", "prompt"),
            target_new=ctx.text(row, "target_new", "target_new"),
            rephrase=ctx.text(row, "rephrase_prompt", "rephrase_prompt"),
            loc_prompt=ctx.text(row, "locality_prompt", "locality_prompt"),
            loc_answer=ctx.text(row, "locality_ground_truth", "locality_ground_truth"),
            target_true=ctx.text(row, "ground_truth", "ground_truth", required=require_true),
            subject=ctx.text(row, "subject", "subject", required=False),
            case_id=ctx.case_id,
            source=source,
            portability=_portability(row, ctx),
        )
    ]


def _parse_rewrite(rw: Any, ctx: _Ctx, path: str) -> dict[str, str | None]:
    """One ROME/MQuAKE ``requested_rewrite`` entry -> formatted prompt and targets."""
    if not isinstance(rw, dict):
        raise ctx.error(path, f"expected an object, got {_json_type(rw)}")
    template = ctx.text(rw, "prompt", f"{path}.prompt")
    if "{}" not in template:
        raise ctx.error(f"{path}.prompt", f"no '{{}}' placeholder for the subject in {template!r}")
    subject = ctx.text(rw, "subject", f"{path}.subject")
    new = ctx.mapping(rw, "target_new", f"{path}.target_new")
    true = ctx.mapping(rw, "target_true", f"{path}.target_true")
    return {
        # str.replace rather than str.format: a literal brace elsewhere in a template
        # must not break loading.  Identical to .format(subject) otherwise.
        "prompt": template.replace("{}", subject),
        "subject": subject,
        "target_new": ctx.text(new, "str", f"{path}.target_new.str"),
        "target_true": ctx.text(true, "str", f"{path}.target_true.str"),
        "question": ctx.text(rw, "question", f"{path}.question", required=False),
    }


def _parse_rome(row: dict, ctx: _Ctx, source: str) -> list[EditRequest]:
    rw = _parse_rewrite(ctx.get(row, "requested_rewrite", "requested_rewrite"), ctx, "requested_rewrite")
    paraphrases = ctx.text_list(row, "paraphrase_prompts", "paraphrase_prompts")
    neighbours = ctx.text_list(row, "neighborhood_prompts", "neighborhood_prompts")
    generation = ctx.text_list(row, "generation_prompts", "generation_prompts", required=False) or []
    return [
        EditRequest(
            prompt=rw["prompt"],
            target_new=rw["target_new"],
            rephrase=paraphrases[0],
            loc_prompt=neighbours[0],
            # Neighbourhood subjects share the relation and the *true* object.
            loc_answer=rw["target_true"],
            target_true=rw["target_true"],
            subject=rw["subject"],
            case_id=ctx.case_id,
            source=source,
            paraphrases=tuple(paraphrases),
            neighbours=tuple(neighbours),
            generation_prompts=tuple(generation),
        )
    ]


@dataclasses.dataclass
class _MquakeFacts:
    """File-wide tables for choosing MQuAKE locality facts.

    ``facts[i]``: the single-hop facts of case ``i`` as (cloze, answer, key) with
    ``key = (subject id, relation id)`` from ``orig.triples`` (None when absent);
    ``edit_keys`` / ``edit_texts``: the (subject id, relation id) pairs and the
    formatted rewrite prompts of every case's edits.
    """

    facts: list[list[tuple[str, str, tuple | None]]]
    edit_keys: set
    edit_texts: set


def _lenient_text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _mquake_case_facts(row: Any) -> list[tuple[str, str, tuple | None]]:
    """Original single-hop facts of one case, read leniently (a broken entry is just
    not offered as a candidate).  Without usable ``single_hops`` the first multi-hop
    question with the original ``answer`` is offered instead (no ids, so only the
    text check applies to it)."""
    if not isinstance(row, dict):
        return []
    orig = row.get("orig")
    triples = orig.get("triples") if isinstance(orig, dict) else None
    triples = triples if isinstance(triples, list) else []
    facts = []
    hops = row.get("single_hops")
    for k, hop in enumerate(hops if isinstance(hops, list) else []):
        if not isinstance(hop, dict):
            continue
        cloze, answer = _lenient_text(hop.get("cloze")), _lenient_text(hop.get("answer"))
        if cloze is None or answer is None:
            continue
        t = triples[k] if k < len(triples) else None
        key = (str(t[0]), str(t[1])) if isinstance(t, list) and len(t) >= 2 else None
        facts.append((cloze, answer, key))
    if not facts:
        questions = row.get("questions")
        q = _lenient_text(questions[0]) if isinstance(questions, list) and questions else None
        answer = _lenient_text(row.get("answer"))
        if q is not None and answer is not None:
            facts.append((q, answer, None))
    return facts


def _mquake_case_edits(row: Any) -> tuple[set, set]:
    """(subject id, relation id) pairs and formatted prompts of one case's rewrites."""
    keys, texts = set(), set()
    if not isinstance(row, dict):
        return keys, texts
    orig = row.get("orig")
    edit_triples = orig.get("edit_triples") if isinstance(orig, dict) else None
    for t in edit_triples if isinstance(edit_triples, list) else []:
        if isinstance(t, list) and len(t) >= 2:
            keys.add((str(t[0]), str(t[1])))
    rewrites = row.get("requested_rewrite")
    for rw in rewrites if isinstance(rewrites, list) else []:
        if isinstance(rw, dict):
            template, subject = _lenient_text(rw.get("prompt")), _lenient_text(rw.get("subject"))
            if template is not None and subject is not None:
                texts.add(template.replace("{}", subject))
    return keys, texts


def _mquake_tables(rows: Sequence[Any]) -> _MquakeFacts:
    facts = [_mquake_case_facts(r) for r in rows]
    keys, texts = set(), set()
    for r in rows:
        k, t = _mquake_case_edits(r)
        keys |= k
        texts |= t
    return _MquakeFacts(facts=facts, edit_keys=keys, edit_texts=texts)


def _pick_locality(
    tables: _MquakeFacts, index: int, hop: int, keys: set, texts: set, avoid_answer: str | None
) -> tuple[str, str] | None:
    """First fact, scanning cases index+1, index+2, ... (wrapping round to the case
    itself last) and within a case starting at hop ``hop``, that none of the given
    edits touches and whose answer is not ``avoid_answer``."""
    n = len(tables.facts)
    for d in range(1, n + 1):
        cands = tables.facts[(index + d) % n]
        for m in range(len(cands)):
            cloze, answer, key = cands[(hop + m) % len(cands)]
            if (key is not None and key in keys) or cloze in texts or answer == avoid_answer:
                continue
            return cloze, answer
    return None


def _parse_mquake(row: dict, ctx: _Ctx, source: str, tables: _MquakeFacts) -> list[EditRequest]:
    """One MQuAKE case -> one request per rewrite.

    prompt/target_new/target_true come from the rewrite (prompt formatted with its
    subject), rephrase is the rewrite's ``question`` (the prompt when absent).  The
    case's ``questions`` and ``new_answer`` go on its first request only.

    Locality: MQuAKE has no locality prompts.  We use an original single-hop fact
    (``single_hops[k].cloze`` and ``.answer``), which has the same cloze form as the
    edit prompts and a single-fact answer, chosen so that it is *not edited by any
    case in the file*: same (subject id, relation id) as no entry of any case's
    ``orig.edit_triples``, and a cloze text equal to no formatted rewrite prompt.
    Such a fact keeps its true answer whichever cases are edited together, even the
    whole file in one batch.  For rewrite ``j`` of case ``i`` the search starts at
    hop ``j`` of case ``i+1`` and moves on through that case's other hops and the
    following cases (wrapping round, case ``i`` itself last), preferring a fact
    whose answer differs from the rewrite's new target.  Only when the file
    has no such fact at all does it fall back to the first fact that case ``i``
    itself does not edit; when there is none either, the case is a DataError.
    Candidates come from the whole file, so ``limit`` does not change a request's
    locality probe.  (MQuAKE-hard: 563 of its 1,716 single-hop facts are edited by
    no case, because the original chain leaves the edited chain after the first
    hop.)
    """
    rewrites = ctx.array(row, "requested_rewrite", "requested_rewrite")
    parsed = [_parse_rewrite(rw, ctx, f"requested_rewrite[{j}]") for j, rw in enumerate(rewrites)]
    questions = ctx.text_list(row, "questions", "questions")
    new_answer = ctx.text(row, "new_answer", "new_answer")

    own_keys, own_texts = _mquake_case_edits(row)
    out = []
    for j, rw in enumerate(parsed):
        loc = None
        for keys, texts, avoid in (
            (tables.edit_keys, tables.edit_texts, rw["target_new"]),
            (tables.edit_keys, tables.edit_texts, None),
            (own_keys, own_texts, rw["target_new"]),
            (own_keys, own_texts, None),
        ):
            loc = _pick_locality(tables, ctx.index, j, keys, texts, avoid)
            if loc is not None:
                break
        if loc is None:
            raise ctx.error(
                "single_hops",
                "no locality fact for this MQuAKE case: the file has no single-hop fact "
                "(nor first question with its answer) that this case does not edit",
            )
        out.append(
            EditRequest(
                prompt=rw["prompt"],
                target_new=rw["target_new"],
                rephrase=rw["question"] or rw["prompt"],
                loc_prompt=loc[0],
                loc_answer=loc[1],
                target_true=rw["target_true"],
                subject=rw["subject"],
                case_id=ctx.case_id,
                hop_questions=tuple(questions) if j == 0 else (),
                hop_answer=new_answer if j == 0 else None,
                source=f"{source}/requested_rewrite[{j}]",
            )
        )
    return out


# --------------------------------------------------------------------------- #
# Format detection
# --------------------------------------------------------------------------- #


def detect_format(record: dict, *, allowed: Iterable[str] | None = None) -> str:
    """Guess the format from one record's keys (keys whose value is null are ignored)."""
    if not isinstance(record, dict):
        raise DataError(f"records must be JSON objects, got {_json_type(record)}")
    keys = {k for k, v in record.items() if v is not None}
    allowed = set(allowed) if allowed is not None else set(_EXPECTED)
    found = None
    nested = isinstance(record.get("locality"), dict) or isinstance(record.get("portability"), dict)
    if "requested_rewrite" in keys:
        rw = record["requested_rewrite"]
        if isinstance(rw, list) or "new_answer" in keys or "questions" in keys:
            found = "mquake"
        else:
            found = "counterfact_rome"
    else:
        z, f = len(keys & _ZSRE_KEYS), len(keys & _FLAT_KEYS)
        if z > f:
            found = "zsre"
        elif "knowedit" in allowed and {"prompt", "target_new"} <= keys and (
                nested or not keys >= _FLAT_KEYS - {"ground_truth"}):
            found = "knowedit"      # KnowEdit's nested locality/portability, or flat fields left out
        elif f > z:
            found = "counterfact"
    if found is None or found not in allowed:
        hint = " (are the records JSON objects?)" if keys == {"text"} else ""
        expected = "; ".join(f"{k}: {_EXPECTED[k]}" for k in _EXPECTED if k in allowed)
        raise DataError(
            f"cannot detect the data format: the first record has the fields {sorted(keys)}{hint}; "
            f"expected the fields of one of the formats ({expected}); pass the format explicitly "
            "(--dataset / fmt=...)",
            field="<format>",
        )
    return found


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def resolve_data_path(path_or_id: str | os.PathLike) -> Path | None:
    """The absolute, resolved path of a local data file, or None for a hub data set id.

    A hub id is only what looks like ``org/name`` (one slash, no JSON suffix) and is not
    a local path (nor a path into an existing local folder ``org``); anything else must be an existing file, so a typo in a path is a
    DataError rather than a network request."""
    s = os.path.expanduser(os.fspath(path_or_id))
    if not isinstance(path_or_id, Path) and not os.path.exists(s) and _HUB_ID.fullmatch(s) \
            and not s.lower().endswith(_LOCAL_SUFFIXES) and not os.path.isdir(s.split("/")[0]):
        return None
    path = Path(s)
    if path.is_dir():
        raise DataError("is a directory; expected a JSON or JSONL file of records", file=str(path))
    if not path.exists():
        raise DataError("no such file (a data set on the Hugging Face Hub is given as 'org/name')",
                        file=str(path))
    return path.resolve()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (for messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


@dataclasses.dataclass(frozen=True)
class _BadLine:
    """A JSONL line that is not valid JSON; it becomes its record's error."""

    reason: str


def _read_text(path: Path) -> str:
    """The file's text; errors for a non-UTF-8 file or a broken gzip file."""
    try:
        if path.name.lower().endswith(".gz"):
            import gzip

            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read the file: {e}", file=str(path)) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} (byte offset {e.start}); "
            "save the file as UTF-8",
            file=str(path),
        ) from None
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark


def _runs_off_end(text: str, e: json.JSONDecodeError) -> bool:
    """Whether the parser needed more text: the document is cut short."""
    return e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string")


def _json_error(text: str, e: json.JSONDecodeError) -> str:
    if _runs_off_end(text, e):
        return (f"truncated: the file ends at line {e.lineno} before the JSON is complete "
                "(an unclosed array, object or string)")
    return f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"


def read_records(path: Path) -> tuple[list, list[int] | None]:
    """The raw records of a local file and, for JSON Lines, each record's line number.

    A ``.json`` file holds a JSON array of records (or ``{"data": [...]}``); a
    ``.jsonl`` file (or a ``.json`` file whose content is JSON Lines) one record per
    line, blank lines ignored.  A JSONL line that is not valid JSON becomes a
    :class:`_BadLine` in its place, so it is that record's error and the other lines
    are read as usual.  Values keep their JSON types (nothing is coerced)."""
    text = _read_text(path)
    if not text.strip():
        raise DataError("the file is empty", file=str(path))
    jsonl = path.name.lower().endswith((".jsonl", ".jsonl.gz"))
    if jsonl and text.lstrip().startswith("["):  # a JSON array in a file named .jsonl
        jsonl = False
    if not jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("{") and e.msg == "Extra data":
                jsonl = True  # JSON Lines in a file named .json
            else:
                raise DataError(_json_error(text, e), file=str(path)) from None
    if not jsonl:
        if isinstance(data, dict) and set(data) == {"data"} and isinstance(data["data"], list):
            data = data["data"]
        if isinstance(data, dict):
            raise DataError(
                "the top level is a JSON object; expected a list of records: a JSON array "
                "[{...}, {...}] or one object per line (JSON Lines, .jsonl)",
                file=str(path),
            )
        if not isinstance(data, list):
            raise DataError(f"the top level is a JSON {_json_type(data)}; expected a JSON array of records",
                            file=str(path))
        return data, None
    rows, lines = [], []
    physical = text.split("\n")
    for lineno, line in enumerate(physical, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            last = lineno == len(physical)  # no newline after it: the file ends inside it
            if last and _runs_off_end(line, e):
                reason = "truncated: the file ends inside this record"
            else:
                reason = f"invalid JSON at column {e.colno}: {e.msg}"
            rows.append(_BadLine(reason))
        lines.append(lineno)
    return rows, lines


def _read_hub(hub_id: str, split: str) -> list:
    import datasets

    try:
        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline, unknown id, no such split: one message
        raise DataError(f"no such local file, and loading it as a Hugging Face Hub data set (split {split!r}) "
                        f"failed: {type(e).__name__}: {str(e)[:200]}", file=hub_id) from None
    return ds.to_list()


def request_hash(request: EditRequest) -> str:
    """Content hash of a request: every field but ``source`` (where it was read from).
    Two requests with equal hashes are the same edit with the same probes."""
    fields = dataclasses.asdict(request)
    del fields["source"]
    blob = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def find_duplicates(requests: Sequence[EditRequest]) -> list[str]:
    """One line per request whose content repeats an earlier one of the list."""
    first: dict[str, str] = {}
    out = []
    for r in requests:
        h = request_hash(r)
        if h in first:
            out.append(f"{r.source} repeats {first[h]}")
        else:
            first[h] = r.source
    return out


def load_requests(
    path_or_id: str | os.PathLike,
    fmt: str = "auto",
    *,
    split: str = "train",
    skip_invalid: bool = False,
    limit: int | None = None,
) -> LoadResult:
    """Load and validate edit requests from a local JSON/JSONL file or a hub data set.

    Args:
      path_or_id: a local ``.json``/``.jsonl`` file (optionally ``.gz``), read with the
        standard library's ``json`` (see :func:`read_records`); a hub id ``org/name``
        that is not a local path is read with ``datasets.load_dataset(id,
        split=split)``.  A missing path or a directory is a DataError.
      fmt: one of :data:`FORMATS` (``"rome"`` is accepted for ``"counterfact_rome"``).
      split: split of a hub data set (ignored for local files).
      skip_invalid: skip invalid records (and malformed JSONL lines) and list why in
        ``LoadResult.skipped`` instead of raising :class:`DataError`.
      limit: read at most this many records (file entries; an MQuAKE case gives one
        request per rewrite).

    Every record is validated before returning; without ``skip_invalid`` the first
    invalid record raises a DataError (its message also says how many other
    records are invalid).  A bad field is only its own record's error.  Requests
    whose content repeats an earlier one are kept and listed in
    ``LoadResult.duplicates``.
    """
    fmt = _ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, got {limit}")

    path = resolve_data_path(path_or_id)
    lines = None
    if path is not None:
        rows, lines = read_records(path)
        file_label, name = str(path), path.name
    else:
        hub_id = os.fspath(path_or_id)
        rows = _read_hub(hub_id, split)
        file_label = name = f"{hub_id}[{split}]"
    if not rows:
        raise DataError("no records (an empty list)", file=file_label)

    def ctx_of(i: int) -> _Ctx:
        return _Ctx(file_label, i, line=lines[i] if lines is not None else None)

    if fmt in ("auto", "user"):
        allowed = ("zsre", "counterfact") if fmt == "user" else None
        first = next((i for i, r in enumerate(rows) if isinstance(r, dict)), None)
        if first is None:
            raise ctx_of(0).error(None, f"no record is a JSON object (record 0 is "
                                        f"{_json_type(rows[0]) if not isinstance(rows[0], _BadLine) else 'invalid JSON'})")
        try:
            kind = detect_format(rows[first], allowed=allowed)
        except DataError as e:
            raise ctx_of(first).error(e.field, e.reason) from None
    else:
        kind = fmt
    require_true = fmt != "user"

    tables = _mquake_tables(rows) if kind == "mquake" else None
    selected = rows if limit is None else rows[:limit]

    requests: list[EditRequest] = []
    errors: list[DataError] = []
    for i, row in enumerate(selected):
        ctx = ctx_of(i)
        source = f"{name}#{i}"
        try:
            if isinstance(row, _BadLine):
                raise ctx.error(None, row.reason)
            if not isinstance(row, dict):
                kind_of = _json_type(row)
                article = "" if kind_of == "null" else ("an " if kind_of[0] in "aeiou" else "a ")
                raise ctx.error(None, f"the record is {article}{kind_of}; expected a JSON object")
            ctx.case_id = _case_id_of(row, ctx)
            if kind == "zsre":
                reqs = _parse_zsre(row, ctx, source, require_true)
            elif kind == "counterfact":
                reqs = _parse_flat(row, ctx, source, require_true)
            elif kind == "counterfact_rome":
                reqs = _parse_rome(row, ctx, source)
            elif kind == "knowedit":
                reqs = _parse_knowedit(row, ctx, source)
            else:
                reqs = _parse_mquake(row, ctx, source, tables)
        except DataError as e:
            errors.append(e)
            continue
        requests.extend(reqs)

    if not skip_invalid:
        raise_first(errors, "invalid record(s)", "--skip-invalid (skip_invalid=True) skips them")
    return LoadResult(
        requests=requests,
        skipped=[str(e) for e in errors],
        duplicates=find_duplicates(requests),
        path=str(path) if path is not None else file_label,
        sha256=file_sha256(path) if path is not None else None,
        n_records=len(selected),
    )


# --------------------------------------------------------------------------- #
# Splitting
# --------------------------------------------------------------------------- #


def split_units(requests: Sequence[EditRequest], by_case: bool = False) -> list[list[EditRequest]]:
    """What a split moves as one: each request, or with ``by_case`` each run of
    consecutive requests sharing a non-None ``case_id`` (the rewrites of an MQuAKE case)."""
    if not by_case:
        return [[r] for r in requests]
    groups: list[list[EditRequest]] = []
    for r in requests:
        if groups and r.case_id is not None and groups[-1][0].case_id == r.case_id:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


def split_requests(
    requests: Sequence[EditRequest],
    n_train: int,
    n_test: int,
    seed: int = 0,
    *,
    by_case: bool = False,
) -> tuple[list[EditRequest], list[EditRequest]]:
    """Deterministically shuffle and split into disjoint train and test lists.

    The permutation is ``numpy.random.default_rng(seed).permutation``.  With
    ``by_case=True`` consecutive requests sharing a non-None ``case_id`` (the
    rewrites of one MQuAKE case) move together and ``n_train``/``n_test`` count
    cases instead of requests.
    """
    if n_train < 0 or n_test < 0:
        raise UserError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    groups = split_units(requests, by_case)
    unit = "cases" if by_case else "requests"
    if n_train + n_test > len(groups):
        raise UserError(
            f"not enough {unit}: n_train + n_test (--n-train, --n-test) = {n_train + n_test} > "
            f"{len(groups)} available"
        )
    perm = np.random.default_rng(seed).permutation(len(groups))
    train = [r for g in perm[:n_train] for r in groups[g]]
    test = [r for g in perm[n_train : n_train + n_test] for r in groups[g]]
    return train, test
