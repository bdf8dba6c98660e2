"""Edit requests: loading, format detection and validation.

Every supported data set is turned into a flat list of :class:`EditRequest`. All
records are validated before :func:`load_requests` returns, so a long training run
never starts on a file that would fail half-way through.

Supported formats (``fmt``):

``"zsre"``
    ZsRE in the MEND format: ``src`` (prompt), ``alt`` (new target), ``rephrase``,
    ``loc`` (locality prompt, kept as is with its ``"nq question: "`` prefix),
    ``loc_ans``, ``answers`` (``answers[0]`` is the true answer), ``subject``.
``"counterfact"``
    CounterFact, flat EasyEdit/MEND format: ``prompt``, ``target_new``,
    ``ground_truth``, ``subject``, ``rephrase_prompt``, ``locality_prompt``,
    ``locality_ground_truth``, ``case_id``.
``"counterfact_rome"`` (alias ``"rome"``)
    CounterFact, ROME/MEMIT format: ``requested_rewrite{prompt, subject,
    target_new{str}, target_true{str}}``, ``paraphrase_prompts[]``,
    ``neighborhood_prompts[]``.  The first paraphrase is the rephrase, the first
    neighbourhood prompt the locality prompt, whose answer is the true target.
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
    Detect one of the four standard formats from the first record's keys.

Surrounding whitespace is stripped from every text field: the tokenisation adds
exactly one space between a prompt and its target (some ZsRE ``alt`` targets and the
ROME-format targets start with a space).
"""

from __future__ import annotations

import dataclasses
import json
import os
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

    The message always names the file (or request source), the record index, the
    case id when there is one, and the offending field.  The parts are also kept as
    attributes.
    """

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        index: int | None = None,
        case_id: Any = None,
        field: str | None = None,
    ):
        self.reason = reason
        self.file = file
        self.index = index
        self.case_id = case_id
        self.field = field
        where = []
        if file is not None:
            where.append(str(file))
        if index is not None:
            where.append(f"record {index}")
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
                    index=first.index, case_id=first.case_id, field=first.field)


@dataclasses.dataclass
class LoadResult:
    """Requests that passed validation and the reasons for those that were skipped."""

    requests: list[EditRequest]
    skipped: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)


FORMATS = ("auto", "zsre", "counterfact", "counterfact_rome", "mquake", "user")
_ALIASES = {
    "rome": "counterfact_rome",
    "cf": "counterfact",
    "counterfact_flat": "counterfact",
    "zsre_mend": "zsre",
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

    def __init__(self, file: str, index: int, case_id: Any = None):
        self.file = file
        self.index = index
        self.case_id = case_id

    def error(self, field: str | None, reason: str) -> DataError:
        return DataError(
            reason, file=self.file, index=self.index, case_id=self.case_id, field=field
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
            raise self.error(path, f"expected a string, got {type(value).__name__} {value!r:.60}")
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
            raise self.error(path, f"expected an object, got {type(value).__name__}")
        return value

    def array(
        self, obj: Any, key: str, path: str, *, required: bool = True, min_len: int = 1
    ) -> list | None:
        value = self.get(obj, key, path, required=required)
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error(path, f"expected a list, got {type(value).__name__}")
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
    # `datasets` turns a column mixing ints and floats into floats: take integral
    # floats back as ints.  bool is an int subclass but never a sensible id.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ctx.error("case_id", f"expected an int or a string, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------- #
# Per-format record parsers
# --------------------------------------------------------------------------- #


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
        )
    ]


def _parse_rewrite(rw: Any, ctx: _Ctx, path: str) -> dict[str, str | None]:
    """One ROME/MQuAKE ``requested_rewrite`` entry -> formatted prompt and targets."""
    if not isinstance(rw, dict):
        raise ctx.error(path, f"expected an object, got {type(rw).__name__}")
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
        raise DataError(f"records must be JSON objects, got {type(record).__name__}")
    keys = {k for k, v in record.items() if v is not None}
    allowed = set(allowed) if allowed is not None else {"zsre", "counterfact", "counterfact_rome", "mquake"}
    found = None
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
        elif f > z:
            found = "counterfact"
    if found is None or found not in allowed:
        hint = " (are the records JSON objects?)" if keys == {"text"} else ""
        raise DataError(
            f"cannot detect the data format from the first record's keys {sorted(keys)}{hint}; "
            f"expected one of {sorted(allowed)} (pass fmt=... explicitly)",
            field="<format>",
        )
    return found


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def _is_local(path_or_id: str | os.PathLike) -> bool:
    if isinstance(path_or_id, Path):
        return True
    s = os.fspath(path_or_id)
    # A hub id looks like "owner/name"; anything that exists, has a JSON suffix or
    # starts like a filesystem path is a local file (a typo then gives
    # FileNotFoundError rather than a network request).
    return os.path.exists(s) or s.lower().endswith(_LOCAL_SUFFIXES) or s.startswith((".", "/", "~"))


def _read_json_stdlib(path: Path) -> list:
    """Parse a JSON array or a JSONL file; parse errors name the file and line."""
    opener = open
    if path.suffix == ".gz":
        import gzip

        opener = gzip.open  # type: ignore[assignment]
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    stripped = text.lstrip()
    if not stripped:
        raise DataError("the file is empty", file=str(path))
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            reason = f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
            raise DataError(reason, file=str(path)) from e
        if not isinstance(data, list):
            raise DataError("expected a JSON array of records", file=str(path))
        return data
    if stripped.startswith("{"):
        # A single JSON object, or JSON Lines.
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = _MISSING
        if data is not _MISSING:
            return [data]
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON on line {lineno}: {e.msg}", file=str(path)) from e
    return rows


def _read_local(path: Path) -> list:
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
        return ds.to_list()
    except Exception:
        # Fallback to the stdlib json module when `datasets` cannot build a table from
        # the file: invalid JSON (the stdlib parser then names the line), an empty
        # array, or heterogeneous nested fields for which no Arrow schema can be
        # inferred.  `datasets` also fills keys absent from a record with None, which
        # validation treats the same as a missing key.
        return _read_json_stdlib(path)
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read_hub(hub_id: str, split: str) -> list:
    import datasets

    ds = datasets.load_dataset(hub_id, split=split)
    return ds.to_list()


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
      path_or_id: a local ``.json``/``.jsonl`` file, read with
        ``datasets.load_dataset("json", ...)``; anything that is not an existing path
        (nor looks like one) is taken as a hub id for ``datasets.load_dataset(id,
        split=split)``.
      fmt: one of :data:`FORMATS` (``"rome"`` is accepted for ``"counterfact_rome"``).
      split: split of a hub data set (ignored for local files).
      skip_invalid: skip invalid records and record why in ``LoadResult.skipped``
        instead of raising :class:`DataError`.
      limit: read at most this many records (file entries; an MQuAKE case gives one
        request per rewrite).

    Every record is validated before returning; without ``skip_invalid`` the first
    invalid record raises a DataError (its message also says how many other
    records are invalid).
    """
    fmt = _ALIASES.get(fmt, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")

    if _is_local(path_or_id):
        path = Path(os.path.expanduser(os.fspath(path_or_id)))
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {path}")
        rows = _read_local(path)
        file_label, name = str(path), path.name
    else:
        hub_id = os.fspath(path_or_id)
        rows = _read_hub(hub_id, split)
        file_label = name = f"{hub_id}[{split}]"

    # {"data": [...]}: a single object wrapping the record list.
    first = rows[0] if len(rows) == 1 else None
    if isinstance(first, dict) and set(first) == {"data"} and isinstance(first["data"], list):
        rows = first["data"]
    if not rows:
        raise DataError("no records", file=file_label)

    if fmt in ("auto", "user"):
        allowed = ("zsre", "counterfact") if fmt == "user" else None
        try:
            kind = detect_format(rows[0], allowed=allowed)
        except DataError as e:
            raise DataError(e.reason, file=file_label, index=0, field=e.field) from None
    else:
        kind = fmt
    require_true = fmt != "user"

    tables = _mquake_tables(rows) if kind == "mquake" else None
    selected = rows if limit is None else rows[:limit]

    requests: list[EditRequest] = []
    errors: list[DataError] = []
    for i, row in enumerate(selected):
        ctx = _Ctx(file_label, i)
        source = f"{name}#{i}"
        try:
            if not isinstance(row, dict):
                raise ctx.error("<record>", f"expected a JSON object, got {type(row).__name__}")
            ctx.case_id = _case_id_of(row, ctx)
            if kind == "zsre":
                reqs = _parse_zsre(row, ctx, source, require_true)
            elif kind == "counterfact":
                reqs = _parse_flat(row, ctx, source, require_true)
            elif kind == "counterfact_rome":
                reqs = _parse_rome(row, ctx, source)
            else:
                reqs = _parse_mquake(row, ctx, source, tables)
        except DataError as e:
            errors.append(e)
            continue
        requests.extend(reqs)

    if not skip_invalid:
        raise_first(errors, "invalid record(s)", "skip_invalid=True skips them")
    return LoadResult(requests=requests, skipped=[str(e) for e in errors])


# --------------------------------------------------------------------------- #
# Splitting
# --------------------------------------------------------------------------- #


def split_requests(
    requests: Sequence[EditRequest],
    n_train: int,
    n_test: int,
    seed: int,
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
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    if by_case:
        groups: list[list[EditRequest]] = []
        for r in requests:
            if groups and r.case_id is not None and groups[-1][0].case_id == r.case_id:
                groups[-1].append(r)
            else:
                groups.append([r])
    else:
        groups = [[r] for r in requests]
    unit = "cases" if by_case else "requests"
    if n_train + n_test > len(groups):
        raise ValueError(
            f"not enough {unit}: n_train + n_test = {n_train + n_test} > {len(groups)} available"
        )
    perm = np.random.default_rng(seed).permutation(len(groups))
    train = [r for g in perm[:n_train] for r in groups[g]]
    test = [r for g in perm[n_train : n_train + n_test] for r in groups[g]]
    return train, test
