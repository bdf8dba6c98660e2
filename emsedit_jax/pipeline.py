"""From edit requests to packed device batches with static shapes.

Each view (edit prompt, paraphrase, locality prompt) of a batch of requests is packed:
the teacher-forced sequences are laid end to end in as few rows as possible, each with
its own segment id (its index in the batch + 1) and positions restarting at 0, so the
model sees no padding between sequences and the answer slots are only the real answer
tokens. A `Layout` fixes the number of rows, their length and the answer slots per
row for every batch a run will use, so jitted code compiles once per layout.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from .data import EditRequest, TeacherForced, encode
from .editor.capture import IGNORE, Batch
from .editor.objective import EditBatch, NAnswer

VIEWS = ("edit", "rephrase", "loc")
MAX_ROW_LEN = 512


def _round_up(x: int, k: int) -> int:
    return max(k, -(-x // k) * k)


@dataclasses.dataclass(frozen=True)
class ViewLayout:
    n_rows: int
    row_len: int
    n_answer: int    # answer slots per row


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shapes of packed batches, one ViewLayout per view."""
    edit: ViewLayout
    rephrase: ViewLayout
    loc: ViewLayout

    @property
    def n_answer(self) -> NAnswer:
        return NAnswer(self.edit.n_answer, self.rephrase.n_answer, self.loc.n_answer)


def _assign_rows(lengths: Sequence[int], row_len: int) -> list[int]:
    """Greedy in-order packing: the row of each sequence."""
    rows, row, fill = [], 0, 0
    for n in lengths:
        if fill and fill + n > row_len:
            row, fill = row + 1, 0
        rows.append(row)
        fill += n
    return rows


def _lengths(tf: TeacherForced) -> np.ndarray:
    return tf.attention_mask.sum(axis=1)


def _answers(tf: TeacherForced) -> np.ndarray:
    return (tf.labels != IGNORE).sum(axis=1)


def row_shape(batches: Sequence[tuple[np.ndarray, np.ndarray]], max_row_len: int = MAX_ROW_LEN
              ) -> tuple[int, int, int]:
    """(rows, row length, answer slots per row) that hold every batch of `batches`, each
    (sequence lengths, answer tokens per sequence), packed in order (`_assign_rows`). Of
    the row lengths from the longest sequence to `max_row_len` (multiples of 16), the one
    whose rows x (length + answer slots) is least, the positions and answer slots a batch
    computes; on a tie the fewest rows. A batch of just over `max_row_len` tokens thus
    takes two rows of about half, not two full ones."""
    shortest = max(_round_up(int(np.max(n)), 16) for n, _ in batches)
    longest = max(shortest, min(_round_up(max_row_len, 16), max(_round_up(int(np.sum(n)), 16) for n, _ in batches)))
    best, best_cost = (0, 0, 0), None
    for row_len in range(longest, shortest - 1, -16):
        n_rows, n_answer = 1, 1
        for lengths, answers in batches:
            assign = _assign_rows(lengths, row_len)
            n_rows = max(n_rows, assign[-1] + 1)
            n_answer = max(n_answer, int(np.bincount(assign, weights=answers).max()))
        n_answer = _round_up(n_answer, 8)
        cost = n_rows * (row_len + n_answer)
        if best_cost is None or cost < best_cost:
            best, best_cost = (n_rows, row_len, n_answer), cost
    return best


def view_layout(tf: TeacherForced, batches: Sequence[Sequence[int]], max_row_len: int = MAX_ROW_LEN) -> ViewLayout:
    """The smallest ViewLayout that holds the sequences of every batch in `batches`
    (row_shape)."""
    lengths, answers = _lengths(tf), _answers(tf)
    return ViewLayout(*row_shape([(lengths[list(b)], answers[list(b)]) for b in batches], max_row_len))


def pack(tf: TeacherForced, rows: Sequence[int], vl: ViewLayout, name: str = "") -> tuple[Batch, np.ndarray]:
    """Packs sequences `rows` of `tf` (segment k + 1 = the k-th of `rows`). Returns the
    numpy Batch and alt_labels laid out the same way. The Batch's `subject` marks each
    sequence's last subject token (its answer positions when its prompt has no subject)."""
    ids = np.zeros((vl.n_rows, vl.row_len), np.int32)
    seg = np.zeros_like(ids)
    pos = np.zeros_like(ids)
    labels = np.full_like(ids, IGNORE)
    alt = np.full_like(ids, IGNORE)
    subject = np.zeros_like(ids)
    lengths = _lengths(tf)[list(rows)]
    assign = _assign_rows(lengths, vl.row_len)
    if assign and assign[-1] >= vl.n_rows:
        raise ValueError(f"batch does not fit the layout {vl} of view {name!r}")
    fill = np.zeros(vl.n_rows, np.int64)
    for k, (r, n, row) in enumerate(zip(rows, lengths, assign)):
        sl = slice(fill[row], fill[row] + n)
        ids[row, sl] = tf.input_ids[r, :n]
        labels[row, sl] = tf.labels[r, :n]
        alt[row, sl] = tf.alt_labels[r, :n]
        seg[row, sl] = k + 1
        s_pos = -1 if tf.subject_pos is None else int(tf.subject_pos[r])
        if s_pos >= 0:
            subject[row, fill[row] + s_pos] = 1
        else:       # no subject in the prompt: its answer positions stand in
            subject[row, sl] = tf.labels[r, :n] != IGNORE
        pos[row, sl] = np.arange(n)
        fill[row] += n
    return Batch(ids, seg, labels, pos, subject), alt


@dataclasses.dataclass
class EncodedSplit:
    """Teacher-forced arrays of every view of a list of requests; `chat_template`
    records whether the prompts were wrapped in the tokenizer's chat template."""
    requests: list[EditRequest]
    views: dict[str, TeacherForced]    # "edit" | "rephrase" | "loc"
    chat_template: bool = False

    def __len__(self) -> int:
        return len(self.requests)

    def _lengths(self, view: str) -> np.ndarray:
        return _lengths(self.views[view])

    def layout(self, batches: Sequence[Sequence[int]], max_row_len: int = MAX_ROW_LEN) -> Layout:
        """The smallest layout that holds every batch in `batches` (lists of indices)."""
        return Layout(**{view: view_layout(self.views[view], batches, max_row_len) for view in VIEWS})

    def layouts(self, batches: Sequence[Sequence[int]], max_row_len: int = MAX_ROW_LEN,
                buckets: int = 1) -> list[Layout]:
        """One layout per batch, from at most `buckets` distinct ones, so that jitted code
        compiles a handful of shapes while most batches carry little padding: the
        batches are ranked by their token count (all views) and split into `buckets`
        groups of equal size, each getting the smallest layout that holds its members.
        `buckets=1` is `layout(batches)` for every batch. Results do not depend on the
        padding (it is masked), only the cost does."""
        batches = [list(b) for b in batches]
        if buckets <= 1 or len(batches) <= 1:
            one = self.layout(batches, max_row_len)
            return [one] * len(batches)
        size = sum(self._lengths(v) for v in VIEWS)
        order = sorted(range(len(batches)), key=lambda i: int(size[batches[i]].sum()))
        out: list[Layout | None] = [None] * len(batches)
        for group in np.array_split(np.asarray(order), min(buckets, len(batches))):
            shared = self.layout([batches[i] for i in group], max_row_len)
            for i in group:
                out[i] = shared
        return out

    def pack(self, view: str, rows: Sequence[int], vl: ViewLayout) -> tuple[Batch, np.ndarray]:
        """Packs requests `rows` of one view. Returns the numpy Batch and alt_labels
        laid out the same way."""
        return pack(self.views[view], rows, vl, view)

    def batch(self, rows: Sequence[int], layout: Layout) -> EditBatch:
        """Device arrays of the three packed views of requests `rows`."""
        views = [self.pack(v, rows, getattr(layout, v))[0] for v in VIEWS]
        return EditBatch(*(Batch(*(jnp.asarray(a) for a in b)) for b in views))


def encode_split(tokenizer, requests: Sequence[EditRequest], *, chat_template: bool = False) -> EncodedSplit:
    """Tokenises all three views of every request (each padded to one length), with the
    prompts raw or wrapped in the tokenizer's chat template."""
    requests = list(requests)
    return EncodedSplit(requests, {v: encode(tokenizer, requests, v, chat_template=chat_template) for v in VIEWS},
                        chat_template)
