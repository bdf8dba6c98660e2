"""The scores of an edit, as pure functions of per-request numbers.

Per request (one value each, NaN where a request has nothing to score):

- ``ES`` / ``GS`` / ``LS``: the token metrics of `evaluate` (token accuracy, or for
  CounterFact the per-position logit comparison of the new and true targets).
- ``efficacy_score`` / ``efficacy_magnitude``: [P(new) > P(true)] and P(new) - P(true)
  on the edit prompt, with P of a whole (multi-token) target = exp(sum of its token
  log-probabilities) given the prompt.
- ``paraphrase_score`` / ``paraphrase_magnitude``: the same averaged over *all* the
  request's paraphrase prompts.
- ``neighborhood_score`` / ``neighborhood_magnitude``: [P(true) > P(new)] and
  P(true) - P(new) averaged over *all* its neighbourhood prompts.
- ``PS`` (portability): token accuracy of the portability answers on their questions,
  averaged over the request's portability items; ``PS/<kind>`` per kind of item.
- ``fluency``: weighted n-gram entropy (bits) of generated text, averaged over the
  request's generation prompts (:func:`generation_entropy`).

:func:`summarise` averages each metric over the requests that have it: in % except
``fluency`` (bits), so the mean of the per-request lines is the aggregate.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

NOT_PERCENT = frozenset({"fluency"})
FLUENCY_WEIGHTS = {2: 2 / 3, 3: 4 / 3}    # ROME's bi- and tri-gram weights
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens: runs of letters/digits and single punctuation marks, lower-cased."""
    return _WORD.findall(text.lower())


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the frequency distribution of the n-grams of `tokens`
    (0 when there are none)."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def generation_entropy(text: str, weights: Mapping[int, float] = FLUENCY_WEIGHTS) -> float:
    """ROME's fluency measure of one generated text: the mean over n of
    weight_n * (n-gram entropy), by default (2/3 H_2 + 4/3 H_3) / 2. Repetitive text
    (a model stuck on one phrase after an edit) scores low."""
    toks = words(text)
    return float(np.mean([w * ngram_entropy(toks, n) for n, w in weights.items()]))


def prob_score(logp_a: Sequence[float], logp_b: Sequence[float]) -> tuple[float, float]:
    """(fraction of pairs with P(a) > P(b), mean of P(a) - P(b)) over pairs of whole-target
    log-probabilities; (nan, nan) for no pairs."""
    a, b = np.asarray(logp_a, np.float64), np.asarray(logp_b, np.float64)
    if a.size == 0:
        return math.nan, math.nan
    return float(np.mean(a > b)), float(np.mean(np.exp(a) - np.exp(b)))


def summarise(per_request: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Mean over the requests that have each metric (NaN = not scored), in % except
    the metrics in NOT_PERCENT; a metric no request has is left out."""
    out = {}
    for k, v in per_request.items():
        v = np.asarray(v, np.float64)
        v = v[~np.isnan(v)]
        if v.size:
            out[k] = float(np.mean(v)) * (1 if k in NOT_PERCENT else 100)
    return out


def unit(name: str) -> str:
    return "bits" if name in NOT_PERCENT else "%"
