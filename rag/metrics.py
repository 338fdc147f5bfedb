"""Pure metric functions: answer normalisation and matching, confidence intervals, paired tests, calibration.

No model, no I/O: everything here is checked against hand-computed values in tests/test_rag_metrics.py.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections.abc import Sequence
from fractions import Fraction

_ARTICLES = re.compile(r"\b(a|an|the)\b")
Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation (ASCII and Unicode), drop the articles a/an/the, collapse whitespace.

    The normalisation of the Lost-in-the-Middle and SQuAD evaluations; Unicode punctuation (curly quotes,
    dashes) is removed too, letters with accents are kept.
    """
    text = "".join(char for char in text.lower() if not _is_punctuation(char))
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(prediction: str) -> str:
    """The part of a model output that is scored: its first non-empty line."""
    return next((line.strip() for line in prediction.strip().splitlines() if line.strip()), "")


def best_subspan_em(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when some normalised answer alias is a substring of the normalised first line of `prediction`.

    The primary metric of Lost in the Middle (Liu et al., 2023). Aliases that normalise to nothing are ignored
    (they would match every output).
    """
    output = normalize_answer(first_line(prediction))
    return float(any(alias and alias in output for alias in map(normalize_answer, answers)))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised first line of `prediction` equals some normalised alias."""
    output = normalize_answer(first_line(prediction))
    return float(any(alias and alias == output for alias in map(normalize_answer, answers)))


def contains_answer(text: str, answers: Sequence[str]) -> bool:
    """Whether `text` contains some alias as a whole-word sequence (after normalisation).

    Stricter than `best_subspan_em`'s substring test ("1901" is not found in "19012"), which is what deciding
    whether a distractor passage gives the answer away needs.
    """
    padded = f" {normalize_answer(text)} "
    return any(alias and f" {alias} " in padded for alias in map(normalize_answer, answers))


# ----------------------------------------------------------------------------- intervals and tests


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or `total` successes.
    With no trials it is the uninformative (0, 1).
    """
    if not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    denominator = 1 + z * z / total
    center = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> dict:
    """McNemar's exact test for two paired binary outcomes (the same questions under two conditions).

    Returns:
        `only_first` (b: first right, second wrong), `only_second` (c), `p_value` (two-sided exact binomial
        test of b against Binomial(b + c, 1/2); 1.0 when there is no discordant pair) and `statistic` (the
        continuity-corrected chi-square max(0, |b - c| - 1)^2 / (b + c), 0.0 with no discordant pair).
    """
    if len(first) != len(second):
        raise ValueError(f"paired outcomes need equal lengths, got {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    n = b + c
    if n == 0:
        return {"only_first": 0, "only_second": 0, "p_value": 1.0, "statistic": 0.0}
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2 ** n)  # exact, no overflow
    return {"only_first": b, "only_second": c, "p_value": float(min(Fraction(1), 2 * tail)),
            "statistic": max(0, abs(b - c) - 1) ** 2 / n}


# ----------------------------------------------------------------------------- probabilities


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (ties count half); None when only one class is present."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not positives or not negatives:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([bool(y) for y in labels], list(scores)))


def expected_calibration_error(probabilities: Sequence[float], labels: Sequence[bool], bins: int = 10) -> float:
    """ECE: over equal-width probability bins, the size-weighted mean |mean probability - positive rate|."""
    if len(probabilities) != len(labels) or not probabilities:
        raise ValueError("need as many labels as probabilities, and at least one")
    totals = [[0, 0.0, 0.0] for _ in range(bins)]  # count, sum of probabilities, sum of labels
    for p, y in zip(probabilities, labels, strict=True):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probabilities must lie in [0, 1], got {p}")
        cell = totals[min(int(p * bins), bins - 1)]
        cell[0] += 1
        cell[1] += p
        cell[2] += float(bool(y))
    return sum(abs(s_p - s_y) for count, s_p, s_y in totals if count) / len(probabilities)


def brier_score(probabilities: Sequence[float], labels: Sequence[bool]) -> float:
    """Mean squared difference between probability and outcome."""
    return sum((p - float(bool(y))) ** 2 for p, y in zip(probabilities, labels, strict=True)) / len(probabilities)


def rate(values: Sequence[float | bool | None]) -> dict:
    """Mean of 0/1 outcomes with its Wilson interval; `None` entries (undetermined) are counted apart."""
    known = [float(v) for v in values if v is not None]
    hits = int(round(sum(known)))
    low, high = wilson_interval(hits, len(known))
    return {"rate": hits / len(known) if known else None, "ci95": [low, high], "n": len(known), "successes": hits,
            "undetermined": len(values) - len(known)}
