"""How well `rag.hallucination` tells grounded answers from ungrounded ones, side by side with the word-level check.

Sets (each answer labelled grounded or not):
- `data/rag/grounding/dev.jsonl` and `test.jsonl`: the team's adversarial cases — paraphrases, date
  paraphrases, unit conversions, arithmetic, supported negations and copies (grounded) against relation swaps,
  number/entity swaps, unit swaps, added qualifiers, time contradictions, extra claims and negation flips.
  The checker's rules were developed on dev; test was written separately and only measured.
- NQ swapped answers (`../shared/data/nq_open`): the gold passage's sentence that holds the answer (grounded)
  and the same sentence with the answer replaced by another question's answer of the same shape (not).
- NQ counterfactuals, RGB-style: the gold passage with its answer replaced by another question's answer; the
  answer that follows the passage is grounded, the real-world answer the passage no longer says is not.

For each set and checker: ROC-AUC of the answer's support score for "grounded" with a bootstrap 95% interval,
per kind (that kind's answers against every answer of the other label), the accuracy of the binary verdict,
and milliseconds per answer. Checkers: `words` (semantic similarity + names and numbers as written),
`claims` (the default: + quantities, dates, swaps, roles, polarity, qualifiers) and, with `--verifier`,
`claims+lm` (+ the default model asked "is this supported?"). With `--closed_book N`, also the
sampling-consistency signal for closed-book answers: ROC-AUC of consistency with N NQ questions' correctness.

    .venv/bin/python scripts/bench_grounding.py                       # dev + test + NQ, words vs claims
    .venv/bin/python scripts/bench_grounding.py --verifier --closed_book 60
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NQ = ROOT.parent / "shared" / "data" / "nq_open" / "nq-open-oracle-2000.jsonl.gz"


def load_set(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shape(answer: str) -> str:
    return "number" if re.fullmatch(r"[\d,.\s]+", answer) else ("name" if answer[:1].isupper() else "other")


def nq_sets(count: int, seed: int, half: int = 0) -> tuple[list[dict], list[dict]]:
    """(swapped-answer sentences, RGB-style counterfactual passages) from NQ's gold passages: from the first
    half of the file (measuring) or the second (`half=1`, for fitting weights), so the two never share a record."""
    rng = random.Random(seed)
    from rag.similarity import split_sentences

    with gzip.open(NQ, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    records = records[:len(records) // 2] if half == 0 else records[len(records) // 2:]
    usable = []
    for r in records:
        gold = r["ctxs"][0]
        for alias in r["answers"]:
            sentence = next((s for s in split_sentences(gold["text"]) if alias in s), None)
            if sentence and len(alias) >= 2:
                usable.append((r, gold, alias, sentence))
                break
    rng.shuffle(usable)
    by_shape = defaultdict(list)
    for item in usable:
        by_shape[_shape(item[2])].append(item[2])
    swapped, counterfactual = [], []
    for index, (record, gold, alias, sentence) in enumerate(usable[:count]):
        others = [a for a in by_shape[_shape(alias)] if a.lower() != alias.lower() and a.lower() not in
                  gold["text"].lower()]
        if not others:
            continue
        other = rng.choice(others)
        passage = f"{gold['title']}. {gold['text']}"
        swapped += [{"id": f"nq-{index}", "kind": "copied_sentence", "passages": [passage], "answer": sentence,
                     "grounded": True},
                    {"id": f"nq-{index}", "kind": "swapped_answer", "passages": [passage],
                     "answer": sentence.replace(alias, other), "grounded": False}]
        altered = passage
        for name in record["answers"]:  # every alias, in any case: the passage must no longer say the real answer
            altered = re.sub(re.escape(name), other, altered, flags=re.IGNORECASE)
        counterfactual += [{"id": f"cf-{index}", "kind": "follows_passage", "passages": [altered],
                            "answer": f"The answer is {other}.", "grounded": True},
                           {"id": f"cf-{index}", "kind": "real_world_answer", "passages": [altered],
                            "answer": f"The answer is {alias}.", "grounded": False}]
    return swapped, counterfactual


def auroc_with_interval(scores, labels, groups, seed=0, resamples=1000):
    """ROC-AUC of scores for label True, with a percentile bootstrap over groups (records sharing an id)."""
    import numpy as np

    from rag.metrics import roc_auc

    point = roc_auc(scores, labels)
    if point is None:
        return None, None, None
    rng = np.random.default_rng(seed)
    by_group = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    keys = list(by_group)
    values = []
    for _ in range(resamples):
        picked = [i for k in rng.choice(len(keys), len(keys)) for i in by_group[keys[k]]]
        value = roc_auc([scores[i] for i in picked], [labels[i] for i in picked])
        if value is not None:
            values.append(value)
    return point, float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def evaluate(checker, rows: list[dict]) -> dict:
    started = time.perf_counter()
    results = checker.check_many([r["answer"] for r in rows], [r["passages"] for r in rows])
    seconds = time.perf_counter() - started
    scores = [res["support"] if res["support"] is not None else 0.0 for res in results]
    labels = [bool(r["grounded"]) for r in rows]
    groups = [r["id"].split("#")[0] for r in rows]
    auc, lo, hi = auroc_with_interval(scores, labels, groups)
    verdicts = [res["hallucinated"] is False for res in results]
    out = {"auroc": auc, "lo": lo, "hi": hi, "accuracy": sum(v == y for v, y in zip(verdicts, labels, strict=True))
           / len(rows), "ms_per_answer": 1000 * seconds / len(rows), "kinds": {}}
    for kind in sorted({r["kind"] for r in rows}):
        index = [i for i, r in enumerate(rows) if r["kind"] == kind or bool(r["grounded"]) != bool(
            next(x for x in rows if x["kind"] == kind)["grounded"])]
        k_auc, k_lo, k_hi = auroc_with_interval([scores[i] for i in index], [labels[i] for i in index],
                                                [groups[i] for i in index])
        mine = [i for i, r in enumerate(rows) if r["kind"] == kind]
        out["kinds"][kind] = {"n": len(mine), "auroc": k_auc, "lo": k_lo, "hi": k_hi,
                              "verdicts_right": sum(verdicts[i] == labels[i] for i in mine)}
    out["results"] = results
    return out


def answer_features(result: dict) -> dict:
    """An answer's features from its claims: the weakest similarity and coverage, problems and matches summed."""
    claims = [c["features"] for c in result["claims"]]
    if not claims:
        return {}
    return {k: (min if k in ("similarity", "coverage", "short_covered") else sum)(c[k] for c in claims)
            for k in claims[0]}


def fit_weights(checker, rows: list[dict]) -> None:
    """Logistic regression of "grounded" on the answers' features (L2, C = 1; each source of rows — the team's
    set, NQ swapped, NQ counterfactual — weighs the same): prints the weights the checker's WEIGHTS holds."""
    from sklearn.linear_model import LogisticRegression

    results = checker.check_many([r["answer"] for r in rows], [r["passages"] for r in rows])
    features = [answer_features(res) for res in results]
    names = list(features[0])
    sources = [r["id"].split("-")[0] for r in rows]  # dev / nq / cf: each source weighs the same in the fit
    weight = [len(rows) / (len(set(sources)) * sources.count(s)) for s in sources]
    model = LogisticRegression(C=1.0, max_iter=5000).fit([[f[n] for n in names] for f in features],
                                                         [bool(r["grounded"]) for r in rows], sample_weight=weight)
    weights = {"bias": round(float(model.intercept_[0]), 3), **{n: round(float(w), 3)
                                                                  for n, w in zip(names, model.coef_[0], strict=True)}}
    print("WEIGHTS =", weights)


def closed_book_consistency(checker, count: int, samples: int, seed: int) -> dict:
    """Greedy closed-book answers of the default model and `samples` samples each; ROC-AUC of consistency
    for a correct answer (best_subspan_em)."""
    from transformers import set_seed

    from align.lm.generation import GenerationSettings, generate
    from align.lm.models import load_tokenizer, pick_device, resolve_model
    from align.lm.policies import load_policy
    from align.lm.precision import stage_precision
    from rag.evaluate import prompt_text, render_prompt
    from rag.metrics import best_subspan_em

    with gzip.open(NQ, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for _, line in zip(range(2000), f, strict=False)]
    random.Random(seed).shuffle(records)
    records = records[:count]
    path = resolve_model("smollm2-135m-instruct", "bench")
    tokenizer = load_tokenizer(path, "bench")
    device = pick_device()
    model = load_policy(path, [], stage_precision("auto", device, "bench"), device, "bench")
    texts = [render_prompt(tokenizer, "qa", prompt_text("qa", r["question"], [])) for r in records]
    greedy, sampled = [], []
    started = time.perf_counter()
    for start in range(0, len(texts), 8):
        batch = texts[start:start + 8]
        greedy += [g[0].text for g in generate(model, tokenizer, batch, GenerationSettings(
            temperature=0.0, max_new_tokens=32, stop=("\n",)))]
        set_seed(seed + start)
        sampled += [[x.text for x in g] for g in generate(model, tokenizer, batch, GenerationSettings(
            temperature=1.0, top_p=1.0, max_new_tokens=32, stop=("\n",)), num_return_sequences=samples)]
    generation = time.perf_counter() - started
    consistency = checker.consistency(greedy, sampled)
    correct = [best_subspan_em(a, r["answers"]) for a, r in zip(greedy, records, strict=True)]
    known = [(c, y) for c, y in zip(consistency, correct, strict=True) if c is not None]
    auc, lo, hi = auroc_with_interval([c for c, _ in known], [y for _, y in known], list(range(len(known))))
    return {"questions": count, "samples": samples, "accuracy": sum(correct) / len(correct), "auroc": auc, "lo": lo,
            "hi": hi, "seconds_generating": generation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", default=["dev", "test"], help="team sets under data/rag/grounding")
    parser.add_argument("--nq", type=int, default=200, help="NQ records for the swapped/counterfactual sets")
    parser.add_argument("--verifier", action="store_true", help="also the default model as a verifier")
    parser.add_argument("--closed_book", type=int, default=0, help="NQ questions for the consistency signal")
    parser.add_argument("--samples", type=int, default=4, help="samples per closed-book question")
    parser.add_argument("--show", default="", help="print the verdicts of this set's misjudged answers")
    parser.add_argument("--fit", action="store_true", help="fit rag.hallucination.WEIGHTS on dev and print them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args()

    from rag.hallucination import GroundingChecker, LMVerifier
    from rag.retrieval import Embedder

    embedder = Embedder("all-minilm-l6-v2", stage="bench")
    checkers = {"words": GroundingChecker(embedder, structural=False), "claims": GroundingChecker(embedder)}
    if args.verifier:
        from align.lm.models import load_tokenizer, pick_device, resolve_model
        from align.lm.policies import load_policy
        from align.lm.precision import stage_precision

        path = resolve_model("smollm2-135m-instruct", "bench")
        device = pick_device()
        model = load_policy(path, [], stage_precision("auto", device, "bench"), device, "bench")
        checkers["claims+lm"] = GroundingChecker(embedder, verifier=LMVerifier(model, load_tokenizer(path, "bench")))
    sets = {name: load_set(ROOT / "data" / "rag" / "grounding" / f"{name}.jsonl") for name in args.sets}
    if args.fit:  # on development data only: the team's dev set and the NQ constructions (never test)
        development = load_set(ROOT / "data" / "rag" / "grounding" / "dev.jsonl")
        if NQ.exists():
            development += [row for part in nq_sets(args.nq, args.seed, half=1) for row in part]
        fit_weights(checkers["claims"], development)
    if NQ.exists() and args.nq:
        sets["nq_swapped"], sets["nq_counterfactual"] = nq_sets(args.nq, args.seed)
    figures: dict = {}
    for set_name, rows in sets.items():
        for checker_name, checker in checkers.items():
            result = evaluate(checker, rows)
            figures[f"{set_name}/{checker_name}"] = {k: v for k, v in result.items() if k != "results"}
            print(f"{set_name:18s} {checker_name:10s} n={len(rows):4d} AUROC {result['auroc']:.3f} "
                  f"[{result['lo']:.3f}, {result['hi']:.3f}]  verdicts right {result['accuracy']:.3f}  "
                  f"{result['ms_per_answer']:.1f} ms/answer")
            for kind, k in result["kinds"].items():
                auc = "  —  " if k["auroc"] is None else f"{k['auroc']:.3f} [{k['lo']:.2f}, {k['hi']:.2f}]"
                print(f"    {kind:22s} n={k['n']:3d} AUROC {auc}  verdicts right {k['verdicts_right']}/{k['n']}")
            if set_name == args.show and checker_name == "claims":
                for row, res in zip(rows, result["results"], strict=True):
                    if (res["hallucinated"] is False) != bool(row["grounded"]):
                        print(f"  MISS {row['id']} {row['kind']} grounded={row['grounded']} support={res['support']}"
                              f"\n    answer: {row['answer']}")
                        for c in res["claims"]:
                            print(f"    claim score={c['score']} support={c['support']} problems={c['problems']}"
                                  f"\n      evidence: {c['evidence']}")
    if args.closed_book:
        figures["closed_book"] = closed_book_consistency(checkers["claims"], args.closed_book, args.samples,
                                                         args.seed)
        c = figures["closed_book"]
        print(f"closed-book consistency: {c['questions']} questions x {c['samples']} samples, accuracy "
              f"{c['accuracy']:.3f}, AUROC for correct {c['auroc']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}], "
              f"{c['seconds_generating']:.0f} s generating")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))

    def pick(key, field="auroc"):
        value = figures.get(key, {}).get(field)
        return "null" if value is None else f"{value:.3f}"

    best = "claims+lm" if args.verifier else "claims"
    print(f"RESULT auroc_dev={pick(f'dev/{best}')} auroc_dev_lo={pick(f'dev/{best}', 'lo')} "
          f"auroc_test={pick(f'test/{best}')} auroc_test_lo={pick(f'test/{best}', 'lo')} "
          f"auroc_test_words={pick('test/words')} auroc_nq_swapped={pick(f'nq_swapped/{best}')} "
          f"auroc_counterfactual={pick(f'nq_counterfactual/{best}')} "
          f"consistency_auroc={pick('closed_book')} ms_per_answer={pick(f'test/{best}', 'ms_per_answer')}")


if __name__ == "__main__":
    main()
