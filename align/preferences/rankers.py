"""Automatic rankers of sampled responses: degenerate replies below every sound one, then by score
(e.g. embedding similarity to a reference answer)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: ranking needs no model code
    from align.lm.generation import Generation
from align.preferences.format import dense_ranks


def degenerate_reason(text: str, truncated: bool = False, ngram: int = 3, max_repeats: int = 4) -> str | None:
    """Why a response is degenerate ('empty', 'loop', 'truncated'), or None.

    A loop is a word `ngram` occurring `max_repeats` or more times; truncated = cut off at max_new_tokens.
    """
    words = text.split()
    if not words:
        return "empty"
    counts = Counter(tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1))
    if counts and max(counts.values()) >= max_repeats:
        return "loop"
    return "truncated" if truncated else None


def rank_by_scores(scores: Sequence[float], degenerate: Sequence[bool]) -> list[int]:
    """Dense ranks, 0 = highest score, every degenerate response below every sound one; ties only for exactly
    equal (degenerate, score)."""
    return dense_ranks([(bool(bad), -float(score)) for score, bad in zip(scores, degenerate, strict=True)])


def rank_against_references(embedder, responses: list[list[Generation]], references: list[str]) -> list[list[int]]:
    """Rank each prompt's responses by cosine similarity to its reference answer (`rank_by_scores`).

    Each distinct text is embedded once, so identical responses get identical scores (a tie).
    """
    texts = list(dict.fromkeys([g.text for group in responses for g in group] + list(references)))
    vectors = embedder.encode(texts, normalize_embeddings=True, convert_to_numpy=True, batch_size=64)
    index = {text: i for i, text in enumerate(texts)}
    ranks = []
    for group, reference in zip(responses, references, strict=True):
        scores = [float(vectors[index[g.text]] @ vectors[index[reference]]) for g in group]
        ranks.append(rank_by_scores(scores, [degenerate_reason(g.text, g.truncated) is not None for g in group]))
    return ranks
