"""Cross-validation of a judge on rankings, grouped by conversation, and the figures it reports.

A held-out split of a few conversations says little about rankings the judge never saw: every OASST
conversation tree yields several rankings (one per turn that has ranked replies), and a judge that has seen
one turn of a tree has seen the others' topic, wording and often the same replies. So rows are grouped by
the conversation they come from (`conversation_key`: the first turn of the prompt) and a group never
spans two folds (`grouped_folds`). Each row is scored by the judge trained without its fold; the pooled
pairwise accuracy gets a 95% interval from a bootstrap over conversations (pairs of one conversation are
not independent draws), and is broken down by K and by how much the two responses' lengths differ, beside
the accuracy of "the longer response is better", the baseline a judge has to beat to have learned more
than length. Pure Python: no model in here.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from align.core.journal import JournalWriter, replay
from align.preferences.format import ranking_pairs

# Bins of |len(a) - len(b)| / max(len(a), len(b)) in words, the upper edge of each (the last takes the rest).
LENGTH_BINS = ((0.1, "<10%"), (0.3, "10-30%"), (0.6, "30-60%"), (1.01, ">=60%"))


def conversation_key(prompt: Any) -> str:
    """What ties a ranking to its conversation: its first turn (a string prompt is its own first turn).

    Two rankings from one OASST tree (a reply ranked at the first turn and another further down) share the
    tree's opening message, so they share a key."""
    if isinstance(prompt, str):
        first = prompt
    elif isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
        first = prompt[0].get("content", "")
    else:
        first = json.dumps(prompt, sort_keys=True, default=str)
    return hashlib.sha1(first.strip().encode("utf-8")).hexdigest()[:16]


def fold_problem(folds: int, groups: int) -> str | None:
    """Why `folds` cannot cross-validate rankings from `groups` conversations, or None."""
    if folds < 2:
        return f"--cv_folds must be 0 (no cross-validation) or at least 2, got {folds}"
    if folds > groups:
        return f"--cv_folds {folds} is more folds than the {groups} conversations in the data — use at most {groups}"
    return None


def grouped_folds(keys: Sequence[str], folds: int, seed: int) -> list[int]:
    """The fold (0..folds-1) of every row; rows with one key always share a fold.

    Conversations are shuffled (seeded), then dealt largest first to the fold with the fewest rows so far,
    so folds hold about as many rankings as each other."""
    problem = fold_problem(folds, len(set(keys)))
    if problem:
        raise ValueError(problem)
    sizes: dict[str, int] = defaultdict(int)
    for key in keys:
        sizes[key] += 1
    order = sorted(sizes)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda k: -sizes[k])  # stable: equal sizes keep the shuffled order
    load = [0] * folds
    fold_of: dict[str, int] = {}
    for key in order:
        fold = min(range(folds), key=lambda f: (load[f], f))
        fold_of[key] = fold
        load[fold] += sizes[key]
    return [fold_of[key] for key in keys]


def _words(text: str) -> int:
    return len(text.split())


def _won(better: float, worse: float) -> float:
    return 1.0 if better > worse else 0.5 if better == worse else 0.0


def pair_records(scores: Sequence[Sequence[float]], ranks: Sequence[Sequence[int]],
                 responses: Sequence[Sequence[str]], keys: Sequence[str],
                 folds: Sequence[int] | None = None) -> list[dict]:
    """One record per ordered pair (better, worse) of every ranking: whether the judge got it right (ties in
    the score count half), whether the longer response would have, K, the relative length difference, the
    conversation and the fold."""
    records = []
    for row, (row_scores, row_ranks, row_responses) in enumerate(zip(scores, ranks, responses, strict=True)):
        lengths = [_words(r) for r in row_responses]
        for i, j in ranking_pairs(row_ranks):
            longest = max(lengths[i], lengths[j]) or 1
            records.append({
                "correct": _won(row_scores[i], row_scores[j]),
                "longer_correct": _won(lengths[i], lengths[j]),
                "k": len(row_ranks),
                "length_gap": abs(lengths[i] - lengths[j]) / longest,
                "group": keys[row],
                "fold": folds[row] if folds is not None else 0,
            })
    return records


def bootstrap_interval(records: list[dict], field: str = "correct", resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of the mean of `field` over pairs, resampling whole conversations."""
    by_group: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_group[record["group"]].append(record[field])
    totals = [(sum(v), len(v)) for v in by_group.values()]
    if len(totals) < 2:
        return None, None
    rng = random.Random(seed)
    means = []
    for _ in range(resamples):
        drawn = [totals[rng.randrange(len(totals))] for _ in totals]
        means.append(sum(s for s, _ in drawn) / sum(n for _, n in drawn))
    means.sort()
    tail = (1 - level) / 2
    return means[int(tail * (resamples - 1))], means[math.ceil((1 - tail) * (resamples - 1))]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None when either side is constant or there are fewer than 3 points."""
    if len(x) < 3:
        return None
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else None


def within_prompt_length_correlation(scores: Sequence[Sequence[float]],
                                     responses: Sequence[Sequence[str]]) -> float | None:
    """Pearson correlation of score and log word count after removing each prompt's mean from both: how much
    of the judge's ordering of one prompt's responses length alone would explain."""
    xs, ys = [], []
    for row_scores, row_responses in zip(scores, responses, strict=True):
        lengths = [math.log1p(_words(r)) for r in row_responses]
        ml, ms = sum(lengths) / len(lengths), sum(row_scores) / len(row_scores)
        xs.extend(v - ml for v in lengths)
        ys.extend(v - ms for v in row_scores)
    return pearson(xs, ys)


def ranking_report(records: list[dict], seed: int = 0) -> dict:
    """Pooled accuracy with its interval, per fold, by K, by length gap, and the longer-is-better baseline.

    Never NaN: a figure with nothing to measure is None."""
    low, high = bootstrap_interval(records, seed=seed)
    base_low, base_high = bootstrap_interval(records, "longer_correct", seed=seed)
    by_fold: dict[int, list[float]] = defaultdict(list)
    by_k: dict[int, list[float]] = defaultdict(list)
    by_gap: dict[str, list[float]] = defaultdict(list)
    for record in records:
        by_fold[record["fold"]].append(record["correct"])
        by_k[record["k"]].append(record["correct"])
        label = next(name for edge, name in LENGTH_BINS if record["length_gap"] < edge or name == LENGTH_BINS[-1][1])
        by_gap[label].append(record["correct"])
    return {
        "accuracy": _mean([r["correct"] for r in records]),
        "accuracy_low": low,
        "accuracy_high": high,
        "pairs": len(records),
        "conversations": len({r["group"] for r in records}),
        "longer_is_better_accuracy": _mean([r["longer_correct"] for r in records]),
        "longer_is_better_low": base_low,
        "longer_is_better_high": base_high,
        "accuracy_by_fold": {str(f): _mean(v) for f, v in sorted(by_fold.items())},
        "pairs_by_fold": {str(f): len(v) for f, v in sorted(by_fold.items())},
        "accuracy_by_k": {str(k): _mean(v) for k, v in sorted(by_k.items())},
        "pairs_by_k": {str(k): len(v) for k, v in sorted(by_k.items())},
        "accuracy_by_length_gap": {name: _mean(by_gap[name]) for _, name in LENGTH_BINS},
        "pairs_by_length_gap": {name: len(by_gap[name]) for _, name in LENGTH_BINS},
    }


def agreement(scores_a: Sequence[Sequence[float]], scores_b: Sequence[Sequence[float]],
              ranks: Sequence[Sequence[int]]) -> float | None:
    """Share of the rankings' pairs two judges order alike (a tie in either counts half)."""
    same = []
    for a, b, row_ranks in zip(scores_a, scores_b, ranks, strict=True):
        for i, j in ranking_pairs(row_ranks):
            da, db = a[i] - a[j], b[i] - b[j]
            same.append(0.5 if da == 0 or db == 0 else float((da > 0) == (db > 0)))
    return _mean(same)


def cross_validate(folds: Sequence[int], fit_and_score: Callable[[list[int], list[int], int], list[list[float]]],
                   journal: Path, describe: Callable[[int, int, int], None] | None = None,
                   ) -> tuple[list[list[float]], list[float]]:
    """Scores of every row from the judge trained without the row's fold, and the seconds each fold took.

    `fit_and_score(train_rows, held_out_rows, fold)` trains a fresh judge on `train_rows` and returns the
    scores of `held_out_rows`' responses. Each finished fold is journaled (fsync'd) at `journal`: a killed
    run resumes with the next fold and repeats none; a record whose rows no longer match its fold is dropped."""
    count = max(folds) + 1
    members = {f: [i for i, fold in enumerate(folds) if fold == f] for f in range(count)}
    done: dict[int, dict] = {}

    def accept(record: dict) -> bool:
        fold = record["fold"]
        if fold in done or members.get(fold) != record["rows"] or len(record["scores"]) != len(record["rows"]):
            return False
        done[fold] = record
        return True

    replay(journal, accept)
    scores: list[list[float] | None] = [None] * len(folds)
    with JournalWriter(journal) as writer:
        for fold in range(count):
            if fold not in done:
                held_out = members[fold]
                train = [i for i, f in enumerate(folds) if f != fold]
                if describe is not None:
                    describe(fold, len(train), len(held_out))
                started = time.perf_counter()
                fold_scores = fit_and_score(train, held_out, fold)
                done[fold] = {"fold": fold, "rows": held_out, "scores": fold_scores,
                              "seconds": time.perf_counter() - started}
                writer.write([done[fold]])
            for row, row_scores in zip(members[fold], done[fold]["scores"], strict=True):
                scores[row] = row_scores
    return scores, [done[f].get("seconds", 0.0) for f in range(count)]  # type: ignore[return-value]
