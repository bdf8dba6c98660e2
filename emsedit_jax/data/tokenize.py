"""Teacher-forced tokenisation of edit requests into padded numpy arrays.

Layout of one row, for prompt tokens ``P = tokenizer(prompt)["input_ids"]`` (with
the tokenizer's default special tokens) and target tokens
``T = tokenizer(" " + target, add_special_tokens=False)["input_ids"]``::

    input_ids  = P + T[:-1]                      (length len(P) + len(T) - 1)
    labels     = [IGNORE] * (len(P) - 1) + T      (same length)

so position ``p`` predicts ``labels[p]``: the last prompt position predicts ``T[0]``
and the answer positions are ``len(P) - 1 ... len(P) + len(T) - 2``.  Rows are right
padded to a length bucket with the pad id (the eos id when the tokenizer has no pad
token); padding has ``attention_mask`` 0 and label ``IGNORE``.

``alt_labels`` holds the *other* target's tokens at the same answer positions
(``IGNORE`` where there is none): target_true for the edit and rephrase sequences,
target_new for the locality sequences.  Only the first ``min(len(T), len(T_alt))``
answer positions can hold alternative tokens, and since the input is teacher forced
on the main target, alternative tokens after the first are conditioned on the main
target's prefix; the first answer position is an exact comparison of both targets.

With ``chat_template=True`` (for instruct models) every prompt is wrapped in the
tokenizer's chat template as one user turn followed by the assistant header,
``P = tokenizer(apply_chat_template([user: prompt], add_generation_prompt=True),
add_special_tokens=False)`` (the template writes its own special tokens), and the
target, which opens the assistant turn, is tokenised without the leading space.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from ..errors import UserError
from .records import DataError, EditRequest, LoadResult, raise_first

__all__ = [
    "IGNORE",
    "LENGTH_BUCKETS",
    "ANSWER_BUCKETS",
    "FIELDS",
    "TeacherForced",
    "encode",
    "check_lengths",
    "pad_id_of",
    "prompt_ids",
    "target_ids",
    "encode_texts",
    "subject_last_token",
]

IGNORE = -100
LENGTH_BUCKETS = (16, 32, 48, 64, 96, 128, 256)
ANSWER_BUCKETS = (2, 4, 8, 16, 32)

Field = Literal["edit", "rephrase", "loc"]
# field -> (prompt attribute, target attribute, other-target attribute)
FIELDS: dict[str, tuple[str, str, str]] = {
    "edit": ("prompt", "target_new", "target_true"),
    "rephrase": ("rephrase", "target_new", "target_true"),
    "loc": ("loc_prompt", "loc_answer", "target_new"),
}


@dataclasses.dataclass
class TeacherForced:
    """Padded teacher-forced batch; all arrays are numpy int32 of shape (N, S).

    ``n_answer`` is a static count of answer positions (an answer bucket) large
    enough for every row; ``answer_start[i]`` (the last prompt position) and
    ``answer_len[i]`` (number of target tokens) locate row ``i``'s answer positions.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray
    alt_labels: np.ndarray
    n_answer: int
    answer_start: np.ndarray
    answer_len: np.ndarray
    subject_pos: np.ndarray | None = None   # (N,) last subject token of the prompt, -1: absent

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id when it has no pad token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token id to pad with")
    return int(pad)


def _check_field(field: str) -> tuple[str, str, str]:
    if field not in FIELDS:
        raise ValueError(f"field must be one of {tuple(FIELDS)}, got {field!r}")
    return FIELDS[field]


def _ids(tokenizer, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    if special:
        out = tokenizer(texts)["input_ids"]
    else:
        out = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in out]


def prompt_ids(tokenizer, prompts: Sequence[str], *, chat_template: bool = False) -> list[list[int]]:
    """Token ids of prompts: raw (with the tokenizer's default special tokens) or, with
    ``chat_template``, wrapped in the tokenizer's chat template as one user turn
    followed by the assistant header."""
    prompts = list(prompts)
    if not chat_template:
        return _ids(tokenizer, prompts, special=True)
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise UserError(f"--chat-template: the tokenizer of {name} has no chat template (an instruct model's "
                        "tokenizer_config.json carries one); drop the flag to use raw prompts")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return _ids(tokenizer, texts, special=False)


def subject_last_token(tokenizer, prompt: str, subject: str | None, *, chat_template: bool = False) -> int:
    """Index in ``prompt_ids(tokenizer, [prompt])[0]`` of the last token of the first
    occurrence of ``subject`` in ``prompt`` (matched exactly, else ignoring case), or
    -1 when there is no subject or the prompt does not contain it. The prompt is cut
    after the subject and tokenised on its own (with the same special tokens or chat
    template), as MEMIT does, so a subject preceded by a space ends on the same token
    either way."""
    if not subject or not subject.strip():
        return -1
    subject = subject.strip()
    start = prompt.find(subject)
    if start < 0:
        start = prompt.lower().find(subject.lower())
    if start < 0:
        return -1
    n_prompt = len(prompt_ids(tokenizer, [prompt], chat_template=chat_template)[0])
    end = start + len(subject)
    if chat_template:       # the wrapped text up to the subject's end, tokenised as the whole is
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        cut = text.find(prompt)
        if cut < 0:
            return -1
        n_prefix = len(_ids(tokenizer, [text[:cut + end]], special=False)[0])
    else:
        n_prefix = len(_ids(tokenizer, [prompt[:end]], special=True)[0])
    return min(n_prefix, n_prompt) - 1


def target_ids(tokenizer, targets: Sequence[str], *, chat_template: bool = False) -> list[list[int]]:
    """Token ids of answers that follow a prompt: ``" " + target`` without special
    tokens; with ``chat_template`` the answer opens the assistant turn, so no space."""
    prefix = "" if chat_template else " "
    return _ids(tokenizer, [prefix + t for t in targets], special=False)


def _tokenize_field(tokenizer, requests: Sequence[EditRequest], field: str, chat_template: bool = False):
    """Token lists (prompt, target, alt target or None) for every request."""
    p_attr, t_attr, a_attr = _check_field(field)
    prompts = prompt_ids(tokenizer, [getattr(r, p_attr) for r in requests], chat_template=chat_template)
    targets = target_ids(tokenizer, [getattr(r, t_attr) for r in requests], chat_template=chat_template)
    alt_idx = [i for i, r in enumerate(requests) if getattr(r, a_attr) is not None]
    alt_tok = target_ids(tokenizer, [getattr(requests[i], a_attr) for i in alt_idx], chat_template=chat_template)
    alts: list[list[int] | None] = [None] * len(requests)
    for i, ids in zip(alt_idx, alt_tok):
        alts[i] = ids
    return prompts, targets, alts


def _error(req: EditRequest, field: str, reason: str) -> DataError:
    p_attr, t_attr, _ = FIELDS[field]
    return DataError(
        f"'{field}' {reason}",
        file=req.source or "<request>",
        case_id=req.case_id,
        field=f"{p_attr}/{t_attr}",
    )


def _row_problem(n_prompt: int, n_target: int, max_len: int) -> str | None:
    if n_prompt == 0:
        return "sequence: the prompt tokenises to no tokens"
    if n_target == 0:
        return "sequence: the target tokenises to no tokens"
    n = n_prompt + n_target - 1
    if n > max_len:
        return (
            f"sequence of {n} tokens ({n_prompt} prompt + {n_target} target - 1) "
            f"is longer than the maximum of {max_len}"
        )
    return None


def _bucket(value: int, buckets: Sequence[int]) -> int | None:
    for b in sorted(buckets):
        if b >= value:
            return int(b)
    return None


def encode(
    tokenizer,
    requests: Sequence[EditRequest],
    field: Field,
    *,
    length_buckets: Sequence[int] = LENGTH_BUCKETS,
    answer_buckets: Sequence[int] = ANSWER_BUCKETS,
    chat_template: bool = False,
) -> TeacherForced:
    """Teacher-forced encoding of one field of ``requests`` (see the module docstring).

    ``field`` selects (prompt, target, other target): ``"edit"`` = (prompt,
    target_new, target_true), ``"rephrase"`` = (rephrase, target_new, target_true),
    ``"loc"`` = (loc_prompt, loc_answer, target_new).  The padded length is the
    smallest length bucket >= the longest sequence; a sequence longer than the
    largest bucket raises :class:`DataError` (use :func:`check_lengths` first to
    validate or drop such requests).  ``n_answer`` is the smallest answer bucket >=
    the longest target; a longer target rounds up to a multiple of the largest
    answer bucket instead of failing.  ``chat_template``: see the module docstring.
    """
    if not requests:
        raise ValueError("encode() needs at least one request")
    if not length_buckets or not answer_buckets:
        raise ValueError("length_buckets and answer_buckets must not be empty")
    prompts, targets, alts = _tokenize_field(tokenizer, requests, field, chat_template)
    max_bucket = max(length_buckets)
    for req, p, t in zip(requests, prompts, targets):
        problem = _row_problem(len(p), len(t), max_bucket)
        if problem is not None:
            raise _error(req, field, problem + (" (largest length bucket)" if len(p) and len(t) else ""))
    tf = _teacher_forced(prompts, targets, alts, pad_id_of(tokenizer), length_buckets, answer_buckets)
    p_attr = FIELDS[field][0]
    subject_pos = [subject_last_token(tokenizer, getattr(r, p_attr), r.subject, chat_template=chat_template)
                   for r in requests]
    return dataclasses.replace(tf, subject_pos=np.asarray(subject_pos, np.int32))


def encode_texts(tokenizer, prompts: Sequence[str], targets: Sequence[str], *, chat_template: bool = False,
                 answer_buckets: Sequence[int] = ANSWER_BUCKETS) -> TeacherForced:
    """Teacher-forced encoding of (prompt, target) pairs without another target and
    without a length limit (the padded length is the longest sequence rounded up to a
    multiple of 16): the probes of the evaluation (every paraphrase, neighbour and
    portability question). A prompt or target that tokenises to nothing gets a row
    with no answer slot (it is not scored)."""
    if not prompts or len(prompts) != len(targets):
        raise ValueError("encode_texts() needs as many targets as prompts, at least one")
    p_ids = prompt_ids(tokenizer, prompts, chat_template=chat_template)
    t_ids = target_ids(tokenizer, targets, chat_template=chat_template)
    keep = [bool(p and t) for p, t in zip(p_ids, t_ids)]
    p_ids = [p if k else [pad_id_of(tokenizer)] for p, k in zip(p_ids, keep)]
    t_ids = [t if k else [] for t, k in zip(t_ids, keep)]
    longest = max(len(p) + max(len(t), 1) - 1 for p, t in zip(p_ids, t_ids))
    return _teacher_forced(p_ids, t_ids, [None] * len(p_ids), pad_id_of(tokenizer), (-(-longest // 16) * 16,),
                           answer_buckets)


def _teacher_forced(prompts: list[list[int]], targets: list[list[int]], alts: list[list[int] | None], pad: int,
                    length_buckets: Sequence[int], answer_buckets: Sequence[int]) -> TeacherForced:
    """The padded arrays of token lists (every sequence fits the largest bucket)."""
    longest = max(len(p) + max(len(t), 1) - 1 for p, t in zip(prompts, targets))
    seq_len = _bucket(longest, length_buckets)
    assert seq_len is not None
    max_answer = max(1, max(len(t) for t in targets))
    n_answer = _bucket(max_answer, answer_buckets)
    if n_answer is None:
        top = max(answer_buckets)
        n_answer = -(-max_answer // top) * top

    n = len(prompts)
    input_ids = np.full((n, seq_len), pad, dtype=np.int32)
    attention_mask = np.zeros((n, seq_len), dtype=np.int32)
    labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    alt_labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    answer_start = np.zeros((n,), dtype=np.int32)
    answer_len = np.zeros((n,), dtype=np.int32)
    for i, (p, t, a) in enumerate(zip(prompts, targets, alts)):
        length = len(p) + max(len(t), 1) - 1
        input_ids[i, :length] = p + t[:-1]
        attention_mask[i, :length] = 1
        start = len(p) - 1
        labels[i, start : start + len(t)] = t
        if a:
            k = min(len(a), len(t))
            alt_labels[i, start : start + k] = a[:k]
        answer_start[i] = start
        answer_len[i] = len(t)
    return TeacherForced(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        alt_labels=alt_labels,
        n_answer=int(n_answer),
        answer_start=answer_start,
        answer_len=answer_len,
    )


def check_lengths(
    tokenizer,
    requests: Sequence[EditRequest],
    max_len: int = max(LENGTH_BUCKETS),
    skip_invalid: bool = False,
    chat_template: bool = False,
) -> LoadResult:
    """Validate the edit, rephrase and loc sequences of every request up front.

    A sequence longer than ``max_len`` (or a prompt/target that tokenises to nothing)
    raises :class:`DataError` naming the request's source and field; with
    ``skip_invalid=True`` the request is dropped and the reason reported in
    ``skipped``.  Returns the requests that pass.
    """
    requests = list(requests)
    problems: dict[int, DataError] = {}
    for field in FIELDS:
        prompts, targets, _ = _tokenize_field(tokenizer, requests, field, chat_template)
        for i, (req, p, t) in enumerate(zip(requests, prompts, targets)):
            if i in problems:
                continue
            problem = _row_problem(len(p), len(t), max_len)
            if problem is not None:
                problems[i] = _error(req, field, problem)
    if not skip_invalid:
        raise_first([problems[i] for i in sorted(problems)], "request(s) with problems",
                     "skip_invalid=True drops them")
    kept = [r for i, r in enumerate(requests) if i not in problems]
    return LoadResult(requests=kept, skipped=[str(problems[i]) for i in sorted(problems)])
