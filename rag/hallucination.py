"""Grounding checks: is each claim of an answer supported by the passages the model was shown?

An answer is split into claims (its sentences). Each claim is read twice — for its meaning and for its
structure — and every verdict says why:

- *evidence*: the passage sentence closest to the claim (cosine of all-MiniLM-L6-v2 sentence embeddings; with
  `nli_model`, any local sentence-transformers CrossEncoder with an "entailment" label, the sentence that
  entails it most). Semantic support: cosine >= `threshold` (entailment >= 0.5), or a short claim whose content
  words all occur in the passages.
- *structure* (`rag.claims`): names the passages never mention; quantities that are not a passage quantity
  in any unit, nor a sum or difference of two of them; a right number with a wrong unit; dates the passages do
  not hold (in whatever format); a number the passages attach to another name (a swap); two names whose roles
  around a shared predicate are reversed ("B acquired A" for "A acquired B", passive voice understood);
  negation or an opposite word (before/after, won/lost) against the evidence clause; "still" for something that
  ended; qualifiers and superlatives ("only", "first", "oldest") the passages never use.
- *verifier* (optional, `verifier=`): a causal LM asked whether the passage supports the claim, scored through
  the probabilities of "Yes" and "No" (`align.lm.generation.score_options`): no sampling, never unparseable.

A claim is **supported** when P(supported) >= 0.5, it has no structural problem, and the content words the passages
lack (if any) come with a close evidence sentence or a date or quantity found in the passages. P(supported) is a
logistic function (`WEIGHTS`) of the semantic similarity (saturating at the threshold), the words the passages
lack, the dates and quantities found, and one count per kind of problem; with a verifier it is averaged with
P(yes). Per answer: the claims with verdict, evidence and problems, the
unsupported-claim rate, `support` (of the weakest claim) and a `status`: `checked`, or explicitly undetermined —
`no_passages` (closed-book: nothing to be grounded in; `consistency` then tells how well the answer agrees with
other samples of the same model, SelfCheckGPT-style, when samples are given) or `no_claims` (empty answer).
Undetermined answers have rate None, never NaN.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rag import claims as structure
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
title document not none both neither each every all some many most only first
""".split())
SHORT_CLAIM_WORDS = 6
_YES_NO = re.compile(r"^(?:yes|no)\s*[,;:]\s*", re.IGNORECASE)
PROBLEM_KINDS = ("name", "number", "unit", "date", "swap", "roles", "negation", "opposite", "qualifier", "ended",
                 "order")
_PRONOUNS = frozenset("he she it they him her them".split())
# P(supported) = logistic(bias + sum of weight x feature), fitted by `scripts/bench_grounding.py --fit`
# (logistic regression, L2, C = 1) on development data only: the team's dev set (data/rag/grounding/dev.jsonl)
# and NQ swapped-answer / counterfactual cases from the second half of the NQ file, each source weighing the
# same; coverage came out slightly negative (-0.15) and is held at 0 (finding a claim's words in the passages
# never counts against it). The test set and the first half of NQ, on which the benchmark reports, were not
# used to choose anything.
WEIGHTS = {"bias": 0.861, "similarity": 0.51, "coverage": 0.0, "new_words": -0.434, "short_covered": 2.185,
           "matched_values": 0.188, "name": -4.22, "number": -3.812, "unit": -2.791, "date": -2.988, "swap": -1.953,
           "roles": -2.718, "negation": -1.297, "opposite": -0.859, "qualifier": -2.955, "ended": -1.069,
           "order": -1.571}


def numbers(text: str) -> set[str]:
    return {m.replace(",", "") for m in _NUMBER.findall(text)}


def words(text: str) -> list[str]:
    """Word tokens, possessive 's dropped ("Mozart's" -> "Mozart"), so a name matches its possessive form."""
    return [re.sub(r"['’][sS]$", "", w) for w in _WORD.findall(text)]


def names(claim: str) -> set[str]:
    """Capitalised words of a claim (lower-cased), minus sentence openers, stopwords and month names; the first
    word counts only when a capitalised word follows it ("Together they ..." names nothing)."""
    found = words(claim)
    return {w.lower() for i, w in enumerate(found) if w[0].isupper() and len(w) > 1 and w.lower() not in _OPENERS
            and w.lower() not in _STOPWORDS and w.lower() not in structure.MONTHS
            and (i > 0 or (len(found) > 1 and found[1][0].isupper()))}


def content_words(text: str) -> set[str]:
    return {w.lower() for w in words(text) if w.lower() not in _STOPWORDS}


def _stems(text: str) -> set[str]:
    return {structure.stem(w) for w in content_words(text) if not w.isdigit()}


def _name_key(name: str) -> frozenset[str]:
    return frozenset(w[:5] for w in name.split())


def _same_name(a: str, b: str) -> bool:
    x, y = _name_key(a), _name_key(b)
    return bool(x) and bool(y) and (x <= y or y <= x)


@dataclass
class _Clause:
    """A clause of a passage or claim with what the structural checks compare."""

    text: str
    words: list[str]
    stems: set[str]
    names: list[tuple[int, str]]
    quantities: list[structure.Quantity]
    dates: list[structure.Date]
    sentence_words: frozenset[str] = frozenset()  # lower-cased words of the sentence it belongs to

    @classmethod
    def of(cls, text: str, sentence: str | None = None) -> _Clause:
        toks = structure.tokens(text)
        found_dates = structure.dates(text)
        return cls(text, toks, _stems(text), structure.name_spans(text, _OPENERS, _STOPWORDS),
                   _quantities_and_years(text, found_dates), found_dates,
                   frozenset(w.lower() for w in structure.tokens(sentence or text)))

    def values(self) -> list[tuple[structure.Quantity | structure.Date, int, int]]:
        """(value, first token, end token) of every quantity and date."""
        return [*((q, q.start, q.start + len(q.text.split())) for q in self.quantities),
                *((d, min(d.positions), max(d.positions) + 1) for d in self.dates)]

    def has_name(self, name: str) -> bool:
        return any(_same_name(name, n) for _, n in self.names)

    def holds(self, value: structure.Quantity | structure.Date) -> bool:
        if isinstance(value, structure.Date):
            return structure.date_supported(value, self.dates, set())
        return any(_same_value(value, q) for q in self.quantities)


def _quantities_and_years(text: str, found_dates: list[structure.Date]) -> list[structure.Quantity]:
    """The text's quantities outside its dates, plus each date's year as a bare number (for durations)."""
    skip = frozenset(i for d in found_dates for i in d.positions)
    years = [structure.Quantity(float(d.year), None, float(d.year), str(d.year), min(d.positions))
             for d in found_dates if d.year]
    return structure.quantities(text, skip) + years


def _same_kind(value, clause: _Clause) -> bool:
    """Whether a clause holds a value that could stand where `value` stands (a date for a date, a length for a
    length, a year for a year, a count for a count)."""
    if isinstance(value, structure.Date):
        return bool(clause.dates) or any(q.year_like for q in clause.quantities)
    if value.dimension:
        return any(q.dimension == value.dimension for q in clause.quantities)
    return any(q.dimension is None and q.year_like == value.year_like for q in clause.quantities)


def _as_clause(value) -> _Clause:
    """A one-value stand-in clause, to compare two single values with `_same_kind` / `holds`."""
    if isinstance(value, structure.Date):
        return _Clause(value.text, [], set(), [], [], [value])
    return _Clause(value.text, [], set(), [], [value], [])


def _same_value(a: structure.Quantity, b: structure.Quantity) -> bool:
    if a.dimension and a.dimension == b.dimension:
        return abs(a.base - b.base) <= 0.02 * max(abs(a.base), abs(b.base), 1e-9)
    return abs(a.value - b.value) <= 1e-9 * max(abs(a.value), 1.0)


@dataclass
class _Passage:
    text: str
    sentences: list[str]
    clauses: list[_Clause]  # every clause of every sentence
    sentence_clauses: list[list[_Clause]]
    sentence_units: list[_Clause]  # each whole sentence
    quantities: list[structure.Quantity]
    dates: list[structure.Date]
    stems: set[str]
    lower_words: set[str]

    @classmethod
    def of(cls, text: str) -> _Passage:
        sentences = split_sentences(text)
        per_sentence = [[_Clause.of(c, s) for c in structure.clauses(s)] or [_Clause.of(s)] for s in sentences]
        found_dates = structure.dates(text)
        return cls(text, sentences, [c for cs in per_sentence for c in cs], per_sentence,
                   [_Clause.of(s) for s in sentences],
                   _quantities_and_years(text, found_dates), found_dates, _stems(text),
                   {w.lower() for w in words(text)})


class LMVerifier:
    """"Does this passage support this statement?" answered by a causal LM through P(Yes) vs P(No)."""

    PROMPT = ("Read the passage and decide whether the statement is true according to the passage alone.\n\n"
              "Passage: {passage}\n\nStatement: {claim}\n\nIs the statement supported by the passage? "
              "Answer Yes or No.")

    def __init__(self, model, tokenizer, batch_size: int = 8, max_passage_words: int = 220):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_passage_words = batch_size, max_passage_words

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """P(yes) for each (passage, claim), normalised over the two answers."""
        from align.lm.generation import render_chat, score_options

        texts = []
        for passage, claim in pairs:
            passage = " ".join(passage.split()[: self.max_passage_words])
            content = self.PROMPT.format(passage=passage, claim=claim)
            if self.tokenizer.chat_template:
                texts.append(render_chat(self.tokenizer, [{"role": "user", "content": content}]))
            else:
                texts.append(f"{content}\nAnswer:")
        probabilities = []
        for start in range(0, len(texts), self.batch_size):
            scores = np.asarray(score_options(self.model, self.tokenizer, texts[start:start + self.batch_size],
                                              ["Yes", "No"]))
            probabilities += (1.0 / (1.0 + np.exp(scores[:, 1] - scores[:, 0]))).tolist()
        return probabilities


@dataclass
class GroundingChecker:
    """Checks answers against passages; `embedder` encodes sentences (rag.retrieval.Embedder)."""

    embedder: object
    threshold: float = 0.6
    nli_model: str | None = None
    verifier: object | None = None  # e.g. LMVerifier: (passage, claim) pairs -> P(supported)
    structural: bool = True  # False: only names and numbers as written (the word-level check, for comparison)

    def __post_init__(self):
        self._nli = None
        if self.nli_model:
            from sentence_transformers import CrossEncoder

            self._nli = CrossEncoder(self.nli_model, device="cpu")
            labels = {i: str(name).lower() for i, name in self._nli.model.config.id2label.items()}
            self._entail = next((i for i, name in labels.items() if name.startswith("entail")), None)
            if self._entail is None:
                raise ValueError(f"{self.nli_model} has no 'entailment' label (labels: {list(labels.values())})")

    def check_many(self, answers: Sequence[str], passages: Sequence[Sequence[str]],
                   samples: Sequence[Sequence[str]] | None = None) -> list[dict]:
        """One result per (answer, passages shown) pair; see the module docstring for the fields. `samples`
        (other sampled answers of the same model, per answer) add a consistency score to closed-book answers."""
        claims_per = [self.claims(a) for a in answers]
        sentences_per = [[(i, s) for i, p in enumerate(ps) for s in split_sentences(p)] for ps in passages]
        todo = [(a, c) for a, claims in enumerate(claims_per) if passages[a] for c in range(len(claims))]
        similarity = self._similarities(todo, claims_per, sentences_per)
        verified = {}
        if self.verifier is not None and todo:
            pairs = [(passages[a][similarity[(a, c)][1][0]] if similarity[(a, c)][1][0] is not None
                      else " ".join(passages[a]), claims_per[a][c]) for a, c in todo]
            verified = dict(zip(todo, self.verifier(pairs), strict=True))
        consistency = self.consistency(answers, samples) if samples is not None else [None] * len(answers)
        results = []
        parsed: dict[str, _Passage] = {}
        for a, (claims, shown) in enumerate(zip(claims_per, passages, strict=True)):
            if not shown:
                results.append({"status": "no_passages", "claims": [], "unsupported_rate": None, "hallucinated": None,
                                "support": None, "consistency": consistency[a]})
                continue
            if not claims:
                results.append({"status": "no_claims", "claims": [], "unsupported_rate": None, "hallucinated": None,
                                "support": None, "consistency": None})
                continue
            for p in shown:  # a passage shown with many questions is parsed once
                if p not in parsed:
                    parsed[p] = _Passage.of(p)
            context = [parsed[p] for p in shown]
            verdicts = [self._verdict(claim, context, similarity[(a, c)], verified.get((a, c)))
                        for c, claim in enumerate(claims)]
            unsupported = sum(not v["supported"] for v in verdicts)
            results.append({"status": "checked", "claims": verdicts, "unsupported_rate": unsupported / len(verdicts),
                            "hallucinated": unsupported > 0, "support": min(v["support"] for v in verdicts),
                            "consistency": None})
        return results

    def _verdict(self, claim: str, context: list[_Passage], similar, p_yes: float | None) -> dict:
        score, (passage, sentence) = similar
        joined_words = set().union(*(p.lower_words for p in context))
        problems: list[str] = []
        missing_names = sorted(n for n in names(claim) if n not in joined_words)
        if missing_names:
            problems.append("name: not in the passages: " + ", ".join(missing_names))
        matched = 0
        if self.structural:
            missing_numbers, matched = self._quantity_problems(claim, context, problems)
            self._structure_problems(claim, context, context[passage] if passage is not None else None, sentence,
                                     problems)
        else:
            missing_numbers = sorted(numbers(claim) - set().union(*(numbers(p.text) for p in context)))
            if missing_numbers:
                problems.append("number: not in the passages: " + ", ".join(missing_numbers))
        content = content_words(claim)
        wordy = {structure.stem(w) for w in content if not w.isdigit()}  # numbers are checked as quantities
        coverage = len(wordy & set().union(*(p.stems for p in context))) / len(wordy) if wordy else 1.0
        covered = bool(content) and content <= joined_words and len(words(claim)) <= SHORT_CLAIM_WORDS
        semantic = score >= (0.5 if self._nli else self.threshold) or (covered and not self._nli)
        new_words = len(wordy - set().union(*(p.stems for p in context)))
        features = {"similarity": min(1.0, max(0.0, score / (0.5 if self._nli else self.threshold))),
                    "coverage": min(1.0, coverage / 0.8), "new_words": float(min(new_words, 3)),
                    "short_covered": float(covered),
                    "matched_values": float(min(matched, 3)),
                    **{kind: float(sum(p.split(":")[0] == kind for p in problems)) for kind in PROBLEM_KINDS}}
        if self.structural and not self._nli:
            logit = WEIGHTS["bias"] + sum(WEIGHTS[k] * v for k, v in features.items())
            support = 1.0 / (1.0 + np.exp(-logit))
            # a verdict with a problem says which; words the passages lack need the evidence sentence close by
            # (cosine >= threshold) or a date or quantity of the claim found in the passages
            supported = bool(support >= 0.5) and not problems and (semantic or not new_words or matched > 0)
        else:  # the word-level rule: semantic support and every name and number found
            support = (0.5 * (score if self._nli else min(1.0, max(0.0, (score - 0.2) / 0.7))) + 0.5 * coverage) \
                * 0.25 ** len(problems)
            supported = semantic and not problems
        if p_yes is not None:  # the verifier's P(yes) and the checker's support, averaged
            support = 0.5 * support + 0.5 * p_yes
            supported = bool(support >= 0.5) and (semantic or self.structural)
        return {"claim": claim, "supported": bool(supported), "score": round(float(score), 4),
                "support": round(float(support), 4), "passage": passage, "evidence": sentence,
                "missing_numbers": missing_numbers, "missing_names": missing_names, "problems": problems,
                "features": {k: round(v, 4) for k, v in features.items()},
                **({"p_yes": round(float(p_yes), 4)} if p_yes is not None else {})}

    @staticmethod
    def _quantity_problems(claim: str, context: list[_Passage], problems: list[str]) -> tuple[list[str], int]:
        """Dates and quantities of the claim against every passage: the numbers found nowhere, and how many
        of the claim's dates and quantities were found (as written, converted or computed)."""
        claim_dates = structure.dates(claim)
        skip = frozenset(i for d in claim_dates for i in d.positions)
        all_quantities = [q for p in context for q in p.quantities]
        all_dates = [d for p in context for d in p.dates]
        years = {int(q.value) for q in all_quantities if q.year_like}
        missing: list[str] = []
        matched = 0
        for date in claim_dates:
            if structure.date_supported(date, all_dates, years):
                matched += 1
            else:
                problems.append(f"date: not in the passages: {date.text}")
                missing.append(date.text)
        approximate = any(w in structure.APPROXIMATE for w in re.findall(r"[a-z]+", claim.lower()))
        for quantity in structure.quantities(claim, skip):
            match = structure.match_quantity(quantity, all_quantities, approximate, arithmetic=False)
            if not match.supported and match.how != "unit":  # arithmetic: within a passage, or across <= 3
                pools = [p.quantities for p in context] + ([all_quantities] if 1 < len(context) <= 3 else [])
                match = next((m for m in (structure.match_quantity(quantity, pool, approximate) for pool in pools)
                              if m.supported), match)
            if match.how == "unit":
                problems.append(f"unit: '{quantity.text}' where the passage has '{match.passage_text}'")
            elif not match.supported:
                problems.append(f"number: not in the passages: {quantity.text}")
            if match.supported:
                matched += 1
            else:
                missing.append(quantity.text.split()[0].replace(",", ""))
        return missing, matched

    def _structure_problems(self, claim: str, context: list[_Passage], evidence_passage: _Passage | None,
                            evidence_sentence: str | None, problems: list[str]) -> None:
        """Swaps, reversed roles, negation/opposites against the evidence clause, unsupported qualifiers."""
        fine = [c for p in context for c in p.clauses]
        passage_stems = set().union(*(p.stems for p in context))
        passage_words = set().union(*(p.lower_words for p in context))
        self._neighbours(claim, [u for p in context for u in p.sentence_units], problems)
        for part in structure.clauses(claim) or [claim]:
            clause = _Clause.of(part)
            self._binding(clause, fine, problems)
            self._polarity(clause, fine, evidence_sentence, problems)
        self._roles(claim, context, problems)
        self._time_order(claim, context, problems)
        claim_words = structure.tokens(claim)
        date_positions = {i for d in structure.dates(claim) for i in d.positions}
        name_words = {w for _, n in structure.name_spans(claim, _OPENERS, _STOPWORDS) for w in n.split()}
        for i, w in enumerate(claim_words):
            low = w.lower()
            if i in date_positions or low in name_words or not structure.is_qualifier(w):
                continue
            if low not in passage_words and structure.stem(low) not in passage_stems:
                problems.append(f"qualifier: '{low}' is not in the passages")
        ongoing = [w for w in claim_words if w.lower() in structure._ONGOING]
        if ongoing and evidence_passage is not None:
            ended = sorted(w for w in evidence_passage.lower_words if w in structure._ENDED)
            if ended and not any(w.lower() in evidence_passage.lower_words for w in ongoing):
                problems.append(f"ended: '{ongoing[0].lower()}' for something the passage says ended "
                                f"('{ended[0]}')")

    @staticmethod
    def _binding(clause: _Clause, all_clauses: list[_Clause], problems: list[str]) -> None:
        """A claim's number (or date) where the passages hold it in a clause about something else, while the
        clause about what the claim's clause is about holds another number of the same kind: a swap."""
        for value in [*clause.quantities, *clause.dates]:
            own = set(value.text.lower().split()) | {structure.stem(w) for w in value.text.split()}
            about = {s for s in clause.stems if s not in own and not structure.is_number_word(s)}
            if len(about) < 2:
                continue
            holders = [c for c in all_clauses if c.holds(value)]
            if not holders:
                continue
            rivals = [c for c in all_clauses if not c.holds(value) and _same_kind(value, c)]
            held = max(len(about & c.stems) for c in holders)
            rival = max(rivals, key=lambda c: len(about & c.stems), default=None)
            if rival is not None and len(about & rival.stems) >= held + 2:
                problems.append(f"swap: the passages give '{value.text}' to another subject; the clause about "
                                f"this one says: '{rival.text}'")

    @staticmethod
    def _neighbours(claim: str, sentences: list[_Clause], problems: list[str]) -> None:
        """A claim's number (or date) whose neighbouring words ("army of 4,500 men", "2 kilograms of sugar")
        the passages put next to another number of the same kind, while its own occurrences stand among other
        words: a swap inside a copied sentence."""
        unit = _Clause.of(claim)
        for value, start, end in unit.values():
            before, after = structure.neighbourhood(unit.words, start, end, _STOPWORDS)
            if sum(before.values()) + sum(after.values()) < 2:
                continue
            held, rival, rival_text = -1, -1, ""
            for sentence in sentences:
                if not any(_as_clause(other).holds(value) for other, _, _ in sentence.values()):
                    continue  # a swap inside a sentence that holds the claim's value
                for other, o_start, o_end in sentence.values():
                    if not _same_kind(value, _as_clause(other)):
                        continue
                    o_before, o_after = structure.neighbourhood(sentence.words, o_start, o_end, _STOPWORDS)
                    score = sum(w for k, w in before.items() if k in o_before) + \
                        sum(w for k, w in after.items() if k in o_after)
                    if _as_clause(other).holds(value):  # its own words, on either side (a paraphrase moves them)
                        either = sum(w for k, w in {**before, **after}.items() if k in o_before or k in o_after)
                        held = max(held, score, either - 1)
                    elif score > rival:
                        rival, rival_text = score, sentence.text
            if held >= 0 and rival >= held + 2:
                problems.append(f"swap: the passages put '{value.text}' among other words; the words around it in "
                                f"the claim go with another number in: '{rival_text}'")
                return

    @staticmethod
    def _polarity(clause: _Clause, all_clauses: list[_Clause], evidence_sentence: str | None,
                  problems: list[str]) -> None:
        if len(clause.stems) < 2 and not any(structure.is_predicate(w) for w in clause.words):
            return
        in_evidence = set(structure.clauses(evidence_sentence)) if evidence_sentence else set()
        predicates = {structure.stem(w) for w in clause.words if structure.is_predicate(w)}
        best = max(all_clauses, key=lambda c: (bool(predicates & c.stems), len(c.stems & clause.stems),
                                               c.text in in_evidence), default=None)
        if best is None or len(best.stems & clause.stems) < (1 if predicates & best.stems else 2):
            return
        claim_lower = {w.lower() for w in clause.words}
        evidence_lower = {w.lower() for w in best.words}
        flipped = structure.negated(clause.words) != structure.negated(best.words)
        opposite = next(((w, o) for w in sorted(claim_lower) for o in sorted(structure.OPPOSITE.get(w, ()))
                         if o in evidence_lower and w not in best.sentence_words), None)
        if flipped != (opposite is not None):
            if opposite:
                problems.append(f"opposite: '{opposite[0]}' where the passage says '{opposite[1]}'")
            else:
                which = "negates" if structure.negated(clause.words) else "drops the negation of"
                problems.append(f"negation: the claim {which} the passage: '{best.text}'")

    @staticmethod
    def _roles(claim: str, context: list[_Passage], problems: list[str]) -> None:
        """Words on the two sides of a predicate the claim shares with a passage sentence (or clause) must stay
        on their sides: a swap of parties moves words both ways (a passive predicate swaps the sides first; a
        personal pronoun is read as the passage's first name, its usual subject)."""
        claim_words = structure.tokens(claim)
        claim_stems = _stems(claim)
        for passage in context:
            topic = next((n for _, n in structure.name_spans(passage.sentences[0], _OPENERS, _STOPWORDS)), None) \
                if passage.sentences else None
            for sentence in passage.sentences:
                for text in dict.fromkeys([sentence, *structure.clauses(sentence)]):
                    s_words = structure.tokens(text)
                    if topic:
                        s_words = [x for w in s_words for x in ([t.title() for t in topic.split()]
                                                                  if w.lower() in _PRONOUNS else [w])]
                    if len(claim_stems & _stems(" ".join(s_words))) < max(3, 0.6 * len(claim_stems)):
                        continue  # only a sentence that says most of what the claim says
                    order = structure.side_agreement(claim_words, s_words, _STOPWORDS)
                    if order and min(order[0], order[1]) >= 1 and order[0] + order[1] >= 2:
                        problems.append(f"roles: around '{order[2]}' the passage has the parties the other way "
                                        f"round: '{sentence}'")
                        return

    @staticmethod
    def _time_order(claim: str, context: list[_Passage], problems: list[str]) -> None:
        """"X before/after Y": the years the passages give X and Y must be in that order."""
        match = re.search(r"\b(" + "|".join(structure.TIME_ORDER) + r")\b", claim, re.IGNORECASE)
        if not match:
            return
        direction = structure.TIME_ORDER[match.group(1).lower()]
        parts = [_stems(claim[:match.start()]), _stems(claim[match.end():])]
        dated = [(c, [q.value for q in c.quantities if q.year_like]) for p in context for c in p.clauses]
        dated = [(c, years) for c, years in dated if years]
        found = []
        for part in parts:
            best = max(dated, key=lambda item: len(part & item[0].stems), default=None)
            if best is None or len(part & best[0].stems) < 2:
                return
            found.append((best[1][0], best[0].text))
        (first, first_text), (second, second_text) = found
        if first != second and (first < second) != (direction < 0):
            problems.append(f"order: the passages date '{first_text}' to {int(first)} and '{second_text}' to "
                            f"{int(second)}")

    @staticmethod
    def claims(answer: str) -> list[str]:
        """Sentences of the answer that say something: a leading "Yes," / "No," is dropped, and so is a sentence
        that is only "Yes." or "No." (it says nothing the passages could support by itself)."""
        found = []
        for sentence in split_sentences(answer):
            sentence = _YES_NO.sub("", sentence.lstrip("-*• ")).strip()
            if re.search(r"\w", sentence) and not re.fullmatch(r"(?i)(yes|no)\W*", sentence):
                found.append(sentence[:1].upper() + sentence[1:])
        return found

    def consistency(self, answers: Sequence[str], samples: Sequence[Sequence[str]]) -> list[float | None]:
        """SelfCheckGPT-style agreement of each answer with other samples of the same model: the mean, over
        samples, of the answer's best sentence-level cosine to the sample (1 = every sample says the same)."""
        texts = sorted({t for a, ss in zip(answers, samples, strict=True) if ss for t in (a, *ss) if t.strip()})
        if not texts:
            return [None] * len(answers)
        vectors = dict(zip(texts, self.embedder.encode(texts), strict=True))
        scores: list[float | None] = []
        for answer, sampled in zip(answers, samples, strict=True):
            sampled = [s for s in sampled if s.strip()]
            if not answer.strip() or not sampled:
                scores.append(None)
                continue
            scores.append(round(float(np.mean([max(0.0, float(vectors[answer] @ vectors[s])) for s in sampled])), 4))
        return scores

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
