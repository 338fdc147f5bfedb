"""Grounding checks: is each claim of an answer supported by the passages the model was shown?

An answer is split into claims (sentences). A claim is **supported** when all three hold:

- *semantic support*: some sentence of the shown passages is close to it — cosine similarity of sentence
  embeddings >= `threshold` — or, for short claims, all of its content words occur in the passages (a
  three-word answer has little to embed); with an NLI cross-encoder (`nli_model`, any local
  sentence-transformers CrossEncoder directory with an "entailment" label), some passage sentence must
  entail it instead (probability >= 0.5);
- every *number* in the claim occurs in the passages (1,200 = 1200);
- every *name* in the claim (a capitalised word that is not a sentence opener such as "The" or "It") occurs
  in the passages.

Per answer: the claims with their verdict and evidence (which passage and sentence support them, which numbers
or names are missing), the unsupported-claim rate and a `status`: `checked`, or explicitly undetermined —
`no_passages` (closed-book: nothing to be grounded in) or `no_claims` (empty answer). Undetermined answers
have rate None, never NaN.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rag.similarity import split_sentences

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
_STOPWORDS = frozenset("""
a an the and or but if of in on at to for from by with as is are was were be been being it its this that these
those he she they them his her their there here which who whom whose what when where why how not no yes do does
did has have had i you we our your my me us than then so such into over under about after before during also
only very can could would should will shall may might must one according answer document documents passage
""".split())
# Capitalised words that open sentences without naming anything.
_OPENERS = frozenset("""
the a an it its this that these those he she they there here in on at according answer yes no i we you his her
their our my as by for from of to with and but or so then when while after before during however also
title document
""".split())
SHORT_CLAIM_WORDS = 6


def numbers(text: str) -> set[str]:
    return {m.replace(",", "") for m in _NUMBER.findall(text)}


def words(text: str) -> list[str]:
    """Word tokens, possessive 's dropped ("Mozart's" -> "Mozart"), so a name matches its possessive form."""
    return [re.sub(r"['’][sS]$", "", w) for w in _WORD.findall(text)]


def names(claim: str) -> set[str]:
    """Capitalised words of a claim (lower-cased), minus sentence openers and stopwords."""
    return {w.lower() for w in words(claim) if w[0].isupper() and w.lower() not in _OPENERS
            and w.lower() not in _STOPWORDS}


def content_words(text: str) -> set[str]:
    return {w.lower() for w in words(text) if w.lower() not in _STOPWORDS}


@dataclass
class GroundingChecker:
    """Checks answers against passages; `embedder` encodes sentences (rag.retrieval.Embedder)."""

    embedder: object
    threshold: float = 0.6
    nli_model: str | None = None

    def __post_init__(self):
        self._nli = None
        if self.nli_model:
            from sentence_transformers import CrossEncoder

            self._nli = CrossEncoder(self.nli_model, device="cpu")
            labels = {i: str(name).lower() for i, name in self._nli.model.config.id2label.items()}
            self._entail = next((i for i, name in labels.items() if name.startswith("entail")), None)
            if self._entail is None:
                raise ValueError(f"{self.nli_model} has no 'entailment' label (labels: {list(labels.values())})")

    def check_many(self, answers: Sequence[str], passages: Sequence[Sequence[str]]) -> list[dict]:
        """One result per (answer, passages shown) pair; see the module docstring for the fields."""
        claims_per = [self.claims(a) for a in answers]
        sentences_per = [[(i, s) for i, p in enumerate(ps) for s in split_sentences(p)] for ps in passages]
        todo = [(a, c) for a, claims in enumerate(claims_per) if passages[a] for c in range(len(claims))]
        similarity = self._similarities(todo, claims_per, sentences_per)
        results = []
        for a, (claims, shown) in enumerate(zip(claims_per, passages, strict=True)):
            if not shown:
                results.append({"status": "no_passages", "claims": [], "unsupported_rate": None, "hallucinated": None})
                continue
            if not claims:
                results.append({"status": "no_claims", "claims": [], "unsupported_rate": None, "hallucinated": None})
                continue
            joined = "\n".join(shown)
            known_numbers, known_words = numbers(joined), {w.lower() for w in words(joined)}
            verdicts = []
            for c, claim in enumerate(claims):
                score, (passage, sentence) = similarity[(a, c)]
                missing_numbers = sorted(numbers(claim) - known_numbers)
                missing_names = sorted(names(claim) - known_words)
                content = content_words(claim)
                covered = bool(content) and content <= known_words and len(words(claim)) <= SHORT_CLAIM_WORDS
                semantic = score >= (0.5 if self._nli else self.threshold) or (covered and not self._nli)
                verdicts.append({"claim": claim, "supported": bool(semantic and not missing_numbers
                                                                   and not missing_names),
                                 "score": round(float(score), 4), "passage": passage, "evidence": sentence,
                                 "missing_numbers": missing_numbers, "missing_names": missing_names})
            unsupported = sum(not v["supported"] for v in verdicts)
            results.append({"status": "checked", "claims": verdicts, "unsupported_rate": unsupported / len(verdicts),
                            "hallucinated": unsupported > 0})
        return results

    @staticmethod
    def claims(answer: str) -> list[str]:
        """Sentences of the answer that say something (at least one letter or digit)."""
        return [s.lstrip("-*• ").strip() for s in split_sentences(answer) if re.search(r"\w", s)]

    def _similarities(self, todo, claims_per, sentences_per) -> dict:
        """{(answer, claim): (best score, (passage index, sentence))} by embedding cosine or NLI entailment."""
        best: dict = {}
        if not todo:
            return best
        if self._nli is not None:
            pairs = [(s, claims_per[a][c]) for a, c in todo for _, s in sentences_per[a]]
            probabilities = self._nli.predict(pairs, apply_softmax=True, show_progress_bar=False)
            entail = np.asarray(probabilities)[:, self._entail]
            offset = 0
            for a, c in todo:
                count = len(sentences_per[a])
                scores = entail[offset:offset + count]
                offset += count
                j = int(np.argmax(scores)) if count else -1
                best[(a, c)] = (float(scores[j]), sentences_per[a][j]) if count else (0.0, (None, None))
            return best
        unique = sorted({s for a, _ in todo for _, s in sentences_per[a]} | {claims_per[a][c] for a, c in todo})
        vectors = dict(zip(unique, self.embedder.encode(unique), strict=True))
        for a, c in todo:
            if not sentences_per[a]:
                best[(a, c)] = (0.0, (None, None))
                continue
            claim = vectors[claims_per[a][c]]
            scores = [float(vectors[s] @ claim) for _, s in sentences_per[a]]
            j = int(np.argmax(scores))
            best[(a, c)] = (scores[j], sentences_per[a][j])
        return best
