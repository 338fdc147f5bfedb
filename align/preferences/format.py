"""The comparisons format: `prompt` (chat messages ending with a user turn), `responses` (K >= 2, best
first) and `ranks` (0 = best, dense, ties share a value) — what a valid ranking row is, and how to build
one. Every reader of comparisons (the comparisons stage, its importers, the reward stage) checks rows
here."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Dataset, DatasetDict, Features, List, Value

from align.core.command import StageError
from align.core.inputs import validate_columns


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All ordered pairs (better, worse) of a ranking; 0 is best, equal ranks are ties (no pair).

    >>> ranking_pairs([1, 0, 1])
    [(1, 0), (1, 2)]
    """
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def check_ranking(responses: Any, ranks: Any) -> str | None:
    """Say what is wrong with one comparison's ranking, or None when it is valid.

    Valid: K >= 2 string responses, one non-negative integer rank per response (0 = best), dense (the
    values are exactly 0..max; ties share a value) and not all tied.
    """
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        return "responses must be a list of strings"
    if len(responses) < 2:
        return f"needs at least 2 responses to compare, got {len(responses)}"
    if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        return f"ranks must be a list of integers, got {ranks!r}"
    if len(ranks) != len(responses):
        return f"{len(ranks)} ranks for {len(responses)} responses — give exactly one rank per response"
    if any(r < 0 for r in ranks):
        return f"ranks must be >= 0 (0 = best), got {ranks}"
    if set(ranks) != set(range(max(ranks) + 1)):
        return f"ranks {ranks} skip a value — use every number from 0 to the worst rank (ties share a number)"
    if max(ranks) == 0:
        return f"all {len(ranks)} responses are tied — a comparison needs a preference"
    return None


def _prompt_problem(prompt: Any) -> str | None:
    if isinstance(prompt, list) and prompt and prompt[-1].get("role") != "user":
        return f"the prompt must end with a user turn, not '{prompt[-1].get('role')}'"
    return None


def validate_comparisons(data: DatasetDict, stage: str, max_problems: int = 5) -> None:
    """Check every split has the comparisons columns and every row a valid ranking.

    Raises:
        StageError: naming the split and row index of the first `max_problems` bad rows.
    """
    validate_columns(data, stage, {"prompt": "str|messages", "responses": "list[str]", "ranks": "list[int]"})
    problems: list[str] = []
    bad = 0
    for split in data:
        rows = data[split]
        columns = zip(rows["prompt"], rows["responses"], rows["ranks"], strict=True)
        for index, (prompt, responses, ranks) in enumerate(columns):
            problem = check_ranking(responses, ranks) or _prompt_problem(prompt)
            if problem:
                bad += 1
                if len(problems) < max_problems:
                    problems.append(f"split '{split}' row {index}: {problem}")
    if problems:
        more = f"; ... and {bad - len(problems)} more bad rows" if bad > len(problems) else ""
        raise StageError(stage, f"invalid comparisons: {'; '.join(problems)}{more} — fix or drop these rows "
                         "(ranks: one per response, 0 = best, dense, not all equal)")


def dense_ranks(keys: Sequence) -> list[int]:
    """Dense ranks of sortable keys: the smallest gets 0, equal keys share a rank, no gaps.

    [0, 2, 3] -> [0, 1, 2]; [5, 1, 5] -> [1, 0, 1].
    """
    position = {key: rank for rank, key in enumerate(sorted(set(keys)))}
    return [position[key] for key in keys]


def order_by_rank(responses: list[str], ranks: list[int]) -> tuple[list[str], list[int]]:
    """Responses and ranks sorted best first (stable: tied responses keep their order)."""
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])
    return [responses[i] for i in order], [ranks[i] for i in order]


def comparison_row(prompt: list[dict], responses: list[str], ranks: list[int], ranker: str, source: str,
                   source_id: str) -> dict:
    """One row of the canonical format, responses best first."""
    responses, ranks = order_by_rank(responses, ranks)
    prompt = [{"role": turn["role"], "content": turn["content"]} for turn in prompt]
    return {"prompt": prompt, "responses": responses, "ranks": ranks, "ranker": ranker, "source": source,
            "source_id": source_id}


def comparisons_dataset(splits: dict[str, list[dict]], extra: dict[str, Value] | None = None) -> DatasetDict:
    """The rows of each split as a DatasetDict with the canonical columns (and the `extra` ones, e.g. `labeler`)."""
    features = Features({
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "responses": List(Value("string")),
        "ranks": List(Value("int64")),
        "ranker": Value("string"),
        "source": Value("string"),
        "source_id": Value("string"),
        **(extra or {}),
    })
    return DatasetDict({
        name: Dataset.from_dict({column: [row[column] for row in rows] for column in features}, features=features)
        for name, rows in splits.items()
    })


def as_messages(prompt: str | list) -> list[dict]:
    """A prompt as chat messages (a plain string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": turn["role"], "content": turn["content"]} for turn in prompt]
