"""rag.similarity and rag.hallucination with the real all-MiniLM-L6-v2 embeddings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rag.data import load_records
from rag.hallucination import GroundingChecker, names, numbers
from rag.similarity import Calibrator, alias_similarity, fit_calibration, pairs_from_records, split_sentences
from tests.conftest import ROOT, write_jsonl

TEAM_QUESTIONS = ROOT / "data" / "rag" / "questions.jsonl"


@pytest.fixture(scope="module")
def embedder():
    from rag.retrieval import Embedder

    return Embedder("all-minilm-l6-v2", device="cpu")


def test_split_sentences():
    assert split_sentences("It opened in 1889. The tower is 330 m tall! Is it? yes.\nNew line") == [
        "It opened in 1889.", "The tower is 330 m tall!", "Is it? yes.", "New line"]
    assert split_sentences("Dr. no split before lower case.") == ["Dr. no split before lower case."]


def test_alias_similarity_prefers_the_right_answer(embedder):
    scores = alias_similarity(embedder, ["Paris", "It is Paris.", "London", ""], [["Paris"]] * 4)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] > scores[2]
    assert scores[3] == 0.0  # an empty answer says nothing: similarity 0, not an embedding of ""


def test_calibration_is_monotone_and_beats_raw_cosine_on_held_out(embedder):
    records = load_records(TEAM_QUESTIONS, "test")
    pairs = pairs_from_records(records, seed=0)
    kinds = {p["kind"] for p in pairs}
    assert {"alias", "passage_sentence", "other_answer", "on_topic_sentence"} <= kinds  # generator-shaped answers
    for method in ("isotonic", "logistic"):
        calibrator, metrics, rows = fit_calibration(pairs, embedder, method, test_fraction=0.4, seed=0)
        grid = np.linspace(-1, 1, 201)
        probabilities = calibrator(grid)
        assert np.all(np.diff(probabilities) >= -1e-12) and probabilities.min() >= 0 and probabilities.max() <= 1
        held = metrics["held_out"]
        assert held["pairs"] > 20 and held["roc_auc"] > 0.75
        assert held["ece_calibrated"] < held["ece_raw_cosine"], (method, held)
        fit_groups = {r["group"] for r in rows if r["split"] == "fit"}
        assert not fit_groups & {r["group"] for r in rows if r["split"] == "held_out"}  # split by question
        saved = json.loads(json.dumps(calibrator.to_dict()))  # what calibration.json holds
        again = Calibrator(saved.pop("method"), saved)
        assert np.allclose(again(grid), probabilities)


def test_claim_features():
    assert numbers("In 1,200 BC and 3.5 km, 1889") == {"1200", "3.5", "1889"}
    assert names("The tower was designed by Gustave Eiffel in Paris.") == {"gustave", "eiffel", "paris"}
    assert names("It is tall.") == set()
    assert names("Mozart's Symphony No. 40, says Document [2] (Title: Mozart)") == {"mozart", "symphony"}


PASSAGES = ["Eiffel Tower. The Eiffel Tower in Paris was completed in 1889. It was designed by the engineering "
            "company of Gustave Eiffel and is about 330 metres tall."]


def test_grounding_flags_a_number_not_in_the_passages_and_passes_a_copied_answer(embedder):
    checker = GroundingChecker(embedder)
    copied, wrong_year, wrong_name, short = checker.check_many(
        ["The Eiffel Tower in Paris was completed in 1889.", "The Eiffel Tower in Paris was completed in 1925.",
         "The Eiffel Tower was designed by Thomas Edison.", "1889"], [PASSAGES] * 4)
    assert copied["status"] == "checked" and copied["hallucinated"] is False and copied["unsupported_rate"] == 0.0
    assert copied["claims"][0]["passage"] == 0 and "1889" in copied["claims"][0]["evidence"]
    assert wrong_year["hallucinated"] is True and wrong_year["claims"][0]["missing_numbers"] == ["1925"]
    assert wrong_name["hallucinated"] is True and wrong_name["claims"][0]["missing_names"] == ["edison", "thomas"]
    assert short["hallucinated"] is False  # a bare span found in the passage is grounded


def test_grounding_undetermined_cases_are_explicit(embedder):
    checker = GroundingChecker(embedder)
    closed_book, empty, mixed = checker.check_many(["Paris.", "", "It was completed in 1889. It is made of gold."],
                                                   [[], PASSAGES, PASSAGES])
    assert closed_book == {"status": "no_passages", "claims": [], "unsupported_rate": None, "hallucinated": None,
                           "support": None, "consistency": None}
    assert empty["status"] == "no_claims" and empty["unsupported_rate"] is None
    assert mixed["status"] == "checked" and mixed["unsupported_rate"] == 0.5
    assert [c["supported"] for c in mixed["claims"]] == [True, False]


def test_rag_calibrate_command(tmp_path, capsys):
    from rag.cli import main

    pairs = [{"answer": a, "references": [r], "label": y, "group": str(i // 2)} for i, (a, r, y) in enumerate(
        [("Paris", "Paris", 1), ("Rome", "Paris", 0), ("It is Rome.", "Rome", 1), ("Madrid", "Rome", 0),
         ("Oslo", "Oslo", 1), ("The answer is Bern.", "Oslo", 0), ("Lima.", "Lima", 1), ("Quito", "Lima", 0)] * 3)]
    out = tmp_path / "cal"
    assert main(["calibrate", "--pairs", str(write_jsonl(tmp_path / "p.jsonl", pairs)), "--output_dir", str(out),
                 "--test_fraction", "0.25"]) == 0
    assert (out / "calibration.json").exists() and (out / "pairs").is_dir()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["metrics"]["fit"]["roc_auc"] > 0.9
    assert Calibrator.load(out)([1.0])[0] > Calibrator.load(out)([0.0])[0]
    assert "held-out ROC-AUC" in capsys.readouterr().out
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"answer": "x", "label": 1}])
    assert main(["calibrate", "--pairs", str(bad), "--output_dir", str(tmp_path / "c2")]) == 2
    assert "line 1: a labelled pair needs" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists() and not (tmp_path / "c2.partial").exists()


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory):
    """A 1-layer BERT cross-encoder with NLI labels (random weights): exercises the NLI code path offline."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("nli")
    words = sorted({w.lower() for w in " ".join(PASSAGES + ["It was completed in 1925 by Edison"]).split()})
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3,
                        id2label={0: "contradiction", 1: "entailment", 2: "neutral"},
                        label2id={"contradiction": 0, "entailment": 1, "neutral": 2})
    BertForSequenceClassification(config).save_pretrained(str(root / "model"))
    tokenizer.save_pretrained(str(root / "model"))
    return root / "model"


def test_grounding_with_an_nli_cross_encoder(embedder, tiny_nli):
    checker = GroundingChecker(embedder, nli_model=str(tiny_nli))
    result, closed = checker.check_many(["It was completed in 1889. It was built by Edison."], [PASSAGES])[0], \
        checker.check_many(["Paris."], [[]])[0]
    assert result["status"] == "checked" and len(result["claims"]) == 2
    for claim in result["claims"]:
        assert 0.0 <= claim["score"] <= 1.0 and claim["passage"] == 0  # an entailment probability, with evidence
    assert result["claims"][1]["supported"] is False and result["claims"][1]["missing_names"] == ["edison"]
    assert closed["status"] == "no_passages"
    with pytest.raises(ValueError, match="no 'entailment' label"):
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(str(tiny_nli))
        model.config.id2label = {0: "a", 1: "b", 2: "c"}
        model.save_pretrained(str(tiny_nli.parent / "bad"))
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tiny_nli)).save_pretrained(str(tiny_nli.parent / "bad"))
        GroundingChecker(embedder, nli_model=str(tiny_nli.parent / "bad"))
