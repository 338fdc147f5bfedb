"""The claim-level grounding checker (`rag.claims`, `rag.hallucination`) with the real all-MiniLM-L6-v2 embeddings,
and `rag rescore`."""

from __future__ import annotations

import gzip
import json
import random
import sys

import pytest

from rag import claims
from tests.conftest import ROOT, run_align, write_jsonl

GROUNDING_SETS = ROOT / "data" / "rag" / "grounding"


@pytest.fixture(scope="module")
def embedder():
    from rag.retrieval import Embedder

    return Embedder("all-minilm-l6-v2", device="cpu")


@pytest.fixture(scope="module")
def checker(embedder):
    from rag.hallucination import GroundingChecker

    return GroundingChecker(embedder)


def quantity(text):
    (found,) = claims.quantities(text)
    return found


def test_quantities_read_numbers_with_their_units():
    assert quantity("about 3.1 miles").dimension == "length"
    assert quantity("5 km").base == pytest.approx(5000)
    assert quantity("2.5 million dollars").base == pytest.approx(2.5e6)
    assert quantity("twenty-five percent").base == pytest.approx(0.25)
    assert quantity("100 degrees Celsius").base == pytest.approx(quantity("212 °F").base)
    assert quantity("40 km/h").dimension == "speed" and quantity("half of them").dimension == "share"
    assert quantity("four times as much").dimension == "ratio"
    assert [q.value for q in claims.quantities("Denmoor has won 71 times to 64")] == [71, 64]  # counts, not ratios
    six, nine = claims.quantities("between 6,000 and 9,000 milligrams")
    assert six.dimension == nine.dimension == "mass" and six.base == pytest.approx(0.006)  # kg
    assert claims.quantities("No one came; the left one stayed.") == []  # "one" as a pronoun


@pytest.mark.parametrize("text", ["14 March 1879", "March 14th, 1879", "3/14/1879", "1879-03-14",
                                  "the fourteenth of March 1879"])
def test_dates_in_any_common_format_are_the_same_date(text):
    assert any((d.year, d.month, d.day) == (1879, 3, 14) for d in claims.dates(text))


def test_claimed_quantities_match_converted_computed_or_not_at_all():
    passage = claims.quantities("The trail is 5 km long. Work began in 1898 and ended in 1906; 12 kg of bolts "
                                "and 3 kg of rivets were used.")

    def how(text):
        return claims.match_quantity(quantity(text), passage, approximate="about" in text).how

    assert how("5,000 metres") == "converted" and how("about 3.1 miles") == "converted"
    assert how("8 years") == "computed" and how("15 kg") == "computed"  # 1906 - 1898; 12 + 3
    assert how("5 miles") == "unit"  # the right number with a wrong unit
    assert how("7 km") == "missing"


def check(checker, answer, passage):
    (result,) = checker.check_many([answer], [[passage]])
    return result


PASSAGE = ("Aster Corp was founded in 1952 in Brill. In 1997 Aster Corp acquired the rival firm Belvan, which then had "
           "400 staff, while Aster had 1,200. The merger was never approved by the regulator, and the Belvan brand "
           "was dropped in 2003. Aster's plant is 2 km long.")


@pytest.mark.parametrize("answer", [
    "Belvan was bought by Aster Corp in 1997.",           # passive paraphrase
    "The plant is 2,000 metres long.",                    # unit conversion
    "The Belvan brand lasted six years after the acquisition.",  # arithmetic on two years
    "The regulator did not approve the merger.",          # supported negation
    "Aster Corp was founded in Brill in 1952.",
])
def test_supported_claims_pass(checker, answer):
    result = check(checker, answer, PASSAGE)
    assert result["hallucinated"] is False, result["claims"]


@pytest.mark.parametrize("answer, problem", [
    ("In 1997 Belvan acquired the rival firm Aster Corp.", "roles"),         # who did what to whom
    ("Belvan then had 1,200 staff, while Aster had 400.", "swap"),          # numbers on the wrong entities
    ("Aster's plant is 2 miles long.", "unit"),
    ("Aster Corp acquired Belvan, its largest rival, in 1997.", "qualifier"),
    ("The regulator approved the merger.", "negation"),
    ("The Belvan brand was dropped before Aster Corp acquired Belvan.", "order"),
    ("Aster Corp was founded in 1952 in Brill by Hans Weber.", "name"),       # an extra claim
    ("Aster Corp was founded in 1961.", "number"),
])
def test_unsupported_claims_are_caught_and_explained(checker, answer, problem):
    result = check(checker, answer, PASSAGE)
    assert result["hallucinated"] is True
    problems = [p for c in result["claims"] for p in c["problems"]]
    assert any(p.startswith(problem + ":") for p in problems), problems


def test_the_checker_never_fails_on_odd_text(checker):
    rng = random.Random(0)
    pieces = ["5", "-", "/", "%", "°", "$", "12,,3", "1/2/3", "2020-13-45", "twenty-", "times", "May", "the", "By",
              "was", "not", "km/h", "per", "No.", "Sept.", "He", "acquired", "(", ")", "and", "3rd", "half", "A.",
              "é", "—", "\n", "...", "'s", "between", "to"]
    answers = [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(150)]
    passages = [[" ".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))] for _ in range(150)]
    for result in checker.check_many(answers, passages):
        assert result["status"] in ("checked", "no_claims")
        assert result["support"] is None or 0.0 <= result["support"] <= 1.0


def test_the_checker_handles_real_passages(checker, shared_data):
    with gzip.open(shared_data / "nq_open" / "nq-open-oracle-2000.jsonl.gz", "rt") as f:
        records = [json.loads(line) for _, line in zip(range(120), f, strict=False)]
    passages = [[c["text"] for c in r["ctxs"]] for r in records]
    from rag.similarity import split_sentences

    own = [" ".join(split_sentences(p[0])[:2]) for p in passages]  # the passage's first two sentences
    answers = [own[(i + 1) % len(own)] for i in range(len(records))]  # another passage's
    foreign = checker.check_many(answers, passages)
    copied = checker.check_many(own, passages)
    assert sum(r["hallucinated"] for r in foreign) > 0.9 * len(records)
    assert sum(r["hallucinated"] is False for r in copied) > 0.9 * len(records)


def test_consistency_is_high_when_samples_agree(checker):
    agree, disagree, none = checker.consistency(
        ["Paris is the capital.", "It was 1066.", "Oslo"],
        [["The capital is Paris.", "Paris is the capital."], ["It was 1492.", "Probably a cat.", "Green."], []])
    assert agree > disagree and none is None
    (closed,) = checker.check_many(["Paris."], [[]], [["Paris.", "Paris, France."]])
    assert closed["status"] == "no_passages" and closed["consistency"] > 0.5


def test_lm_verifier_gives_probabilities(embedder, tiny_model_path):
    from align.lm.models import load_causal_lm, load_tokenizer
    from rag.hallucination import GroundingChecker, LMVerifier

    verifier = LMVerifier(load_causal_lm(tiny_model_path).eval(), load_tokenizer(tiny_model_path, "test"))
    (result,) = GroundingChecker(embedder, verifier=verifier).check_many(["Aster Corp was founded in 1952."],
                                                                        [[PASSAGE]])
    (claim,) = result["claims"]
    assert 0.0 < claim["p_yes"] < 1.0 and 0.0 <= claim["support"] <= 1.0


def test_team_sets_are_well_formed_and_the_dev_set_is_separated(checker):
    """The development set's figure guards the rules against regressions; the test set is only measured by
    scripts/bench_grounding.py."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_grounding

    kinds = set()
    for name in ("dev", "test"):
        rows = bench_grounding.load_set(GROUNDING_SETS / f"{name}.jsonl")
        assert len({r["id"] for r in rows}) == len(rows) >= 100
        assert {True, False} == {r["grounded"] for r in rows} and all(r["passages"] and r["answer"] for r in rows)
        kinds |= {r["kind"] for r in rows}
    assert {"relation_swap", "unit_swap", "arithmetic", "supported_negation", "extra_claim"} <= kinds
    dev = bench_grounding.load_set(GROUNDING_SETS / "dev.jsonl")
    result = bench_grounding.evaluate(checker, dev)
    assert result["auroc"] >= 0.85, result["auroc"]


def rag(*args, timeout: float = 600):
    return run_align(*args, command="rag.cli", timeout=timeout)


@pytest.fixture(scope="module")
def finished_eval(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("rescore")
    records = [{"id": f"q{i}", "question": f"What is the capital of {country}?", "answers": [city],
                "ctxs": [{"title": country, "text": f"{city} is the capital of {country}.", "isgold": True,
                          "hasanswer": True}]}
               for i, (country, city) in enumerate([("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"),
                                                    ("Norway", "Oslo"), ("Greece", "Athens")])]
    out = root / "eval"
    result = rag("eval", "--records", write_jsonl(root / "q.jsonl", records), "--models", f"tiny={tiny_model_path}",
                 "--num_documents", "2", "3", "--gold_positions", "first", "last", "--max_new_tokens", "6",
                 "--consistency_samples", "2", "--grounding", "words", "--output_dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_rag_eval_plots_the_number_of_documents(finished_eval):
    for name in ("accuracy_vs_k.png", "accuracy_vs_prompt_length.png", "position_by_k.png"):
        assert (finished_eval / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((finished_eval / "summary.json").read_text())
    assert set(summary["accuracy_by_position_and_k"]["tiny"]) == {"first/2", "last/2", "first/3", "last/3"}
    assert summary["accuracy_by_model"]["tiny"]["closed_book"]["prompt_tokens_mean"] > 0
    from datasets import load_from_disk

    for row in load_from_disk(str(finished_eval / "examples")):
        if row["cell"] == "closed_book":  # two samples each; consistency undefined only for a blank answer
            assert len(row["samples"]) == 2 and (row["consistency"] is None) == (not row["output"].strip())
        else:
            assert row["samples"] == [] and row["consistency"] is None
    assert summary["grounding"] == {"checker": "words", "verifier": None, "consistency_samples": 2}


def test_rag_rescore_scores_the_same_answers_again(finished_eval, tmp_path):
    from datasets import load_from_disk

    result = rag("rescore", "--eval_dir", finished_eval)
    assert result.returncode == 0, result.stderr[-3000:]
    out = finished_eval / "rescored"
    assert "answers scored again" in result.stdout and "generating" not in result.stderr
    old = {(r["cell"], r["question_id"]): r for r in load_from_disk(str(finished_eval / "examples"))}
    new = {(r["cell"], r["question_id"]): r for r in load_from_disk(str(out / "examples"))}
    assert old.keys() == new.keys()
    for key, row in new.items():
        assert row["output"] == old[key]["output"] and row["samples"] == old[key]["samples"]  # nothing generated
        assert row["best_subspan_em"] == old[key]["best_subspan_em"]
    assert json.loads((out / "summary.json").read_text())["grounding"]["checker"] == "claims"
    entries = json.loads((out / "differences.json").read_text())
    assert {e["cell"] for e in entries} == {r["cell"] for r in new.values()}
    assert all(e["accuracy"]["change"] == 0 for e in entries)
    assert "## Differences from the original report" in (out / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "rag rescore"
    again = rag("rescore", "--eval_dir", finished_eval)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "no readable manifest.json"),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text('{"stage": "sft"}')), "a 'sft' output, not a `rag eval`"),
])
def test_rag_rescore_refuses_what_is_not_an_evaluation(tmp_path, make, message):
    target = tmp_path / "not-an-eval"
    make(target)
    result = rag("rescore", "--eval_dir", target, "--output_dir", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: rag rescore: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
