"""`rag eval`, `rag build`, `rag retrieval` end to end with the tiny model and the real MiniLM embeddings."""

from __future__ import annotations

import json
import os

import pytest

from rag.metrics import best_subspan_em
from tests.conftest import ROOT, kill_after_journal_line, run_align, write_jsonl

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Ireland", "Dublin"), ("Poland", "Warsaw")]


def rag(*args, timeout: float = 600):
    return run_align(*args, command="rag.cli", timeout=timeout)


@pytest.fixture(scope="module")
def rag_set(tmp_path_factory):
    """Ten short questions with gold passages, and a corpus of on-topic passages without the answers."""
    root = tmp_path_factory.mktemp("rag_set")
    records = [{"id": f"q{i}", "question": f"What is the capital of {country}?", "answers": [city],
                "ctxs": [{"title": country, "text": f"{city} is the capital of {country}.", "isgold": True,
                          "hasanswer": True}]} for i, (country, city) in enumerate(CAPITALS)]
    corpus = [{"title": f"{country} {n}", "text": f"{country} has {kind}."} for country, _ in CAPITALS
              for n, kind in enumerate(("rivers and hills", "a long coast"))]
    return write_jsonl(root / "questions.jsonl", records), write_jsonl(root / "corpus.jsonl", corpus)


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_path, tmp_path_factory):
    """A LoRA adapter with non-zero weights on the tiny model, saved like a stage output's adapter/."""
    import torch
    from peft import LoraConfig, get_peft_model

    from align.lm.models import load_causal_lm

    torch.manual_seed(0)
    model = get_peft_model(load_causal_lm(tiny_model_path), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(str(path))
    return path


def eval_args(rag_set, out, *extra):
    questions, corpus = rag_set
    return ["eval", "--records", questions, "--corpus", corpus, "--num_documents", "2", "3", "--gold_positions",
            "first", "last", "--max_new_tokens", "6", "--output_dir", out, *extra]


def test_rag_eval_writes_every_report_file(rag_set, tiny_model_path, tiny_adapter, tmp_path):
    from datasets import load_from_disk

    out = tmp_path / "eval"
    result = rag(*eval_args(rag_set, out, "--models", f"base={tiny_model_path}",
                            f"tuned={tiny_model_path}+{tiny_adapter}", "--num_questions", "8", "--batch_size", "4"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report:" in result.stdout
    for name in ("summary.json", "report.md", "manifest.json", "plots/accuracy_by_position.png",
                 "plots/accuracy_by_num_documents.png"):
        assert (out / name).is_file(), name
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "eval.partial").exists()

    summary = json.loads((out / "summary.json").read_text())
    cells = ["closed_book", "oracle", "k2_gold0", "k2_gold1", "k3_gold0", "k3_gold2"]
    assert [c["key"] for c in summary["cells"]] == cells and summary["questions"] == 8
    assert set(summary["accuracy_by_model"]) == {"base", "tuned"}
    assert len(summary["position_tests"]) == 2 * 2 and len(summary["model_tests"]) == len(cells)
    assert set(summary["accuracy_by_num_documents"]["base"]) == {"2", "3"}

    examples = load_from_disk(str(out / "examples"))
    assert len(examples) == 2 * len(cells) * 8
    questions = {(row["model"], row["cell"]) for row in examples}
    assert len(questions) == 2 * len(cells)
    by_cell = {}
    for row in examples:
        by_cell.setdefault((row["model"], row["cell"]), set()).add(row["question_id"])
    assert len({frozenset(ids) for ids in by_cell.values()}) == 1  # the same questions in every cell
    for row in examples:
        assert row["best_subspan_em"] == best_subspan_em(row["output"], row["answers"])
        assert len(row["passages"]) == {"closed_book": 0, "oracle": 1}.get(row["cell"], row["num_documents"])
        if row["arm"] == "documents":
            assert row["prompt"].count("Document [") == row["num_documents"]
            gold = row["answers"][0]
            assert f"Document [{row['gold_position'] + 1}] (Title: " in row["prompt"]
            assert gold in row["passages"][row["gold_position"]]
            assert sum(gold in p for p in row["passages"]) == 1  # distractors never hold the answer
        if row["arm"] == "closed_book":
            assert row["grounding_status"] == "no_passages" and row["hallucinated"] is None
    outputs = {}
    for row in examples:
        outputs.setdefault(row["model"], []).append(row["output"])
    assert outputs["base"] != outputs["tuned"]  # the adapter was merged
    report = (out / "report.md").read_text()
    assert "## Accuracy" in report and "## Gold position: paired tests" in report and "| 3 docs, gold at 2 |" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"]["tuned"]["adapters"] == [str(tiny_adapter)]


@pytest.mark.parametrize("change, message", [
    ({"records": [{"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "a", "isgold": False}]}]},
     "no gold passage"),
    ({"records": [{"question": "q", "answers": [], "ctxs": [{"title": "t", "text": "a", "isgold": True}]}]},
     "empty `answers` list"),
    ({"args": ["--num_documents", "100"]}, "100 documents per context but the corpus has only"),
    ({"args": ["--gold_positions", "3"]}, "gold position 3 is outside 0..1"),
    ({"args": ["--arms", "open_book"]}, "unknown arm"),
    ({"args": ["--models", "x=tiny-llama+/nonexistent/adapter"]}, "no adapter at /nonexistent/adapter"),
    ({"args": ["--models", "=tiny-llama"]}, "bad model entry"),
    ({"args": ["--benchmark", "mmlu"]}, "--benchmark must be one of qa, kv (got 'mmlu')"),
])
def test_rag_eval_user_errors_exit_2_and_write_nothing(rag_set, tmp_path, change, message):
    questions = write_jsonl(tmp_path / "q.jsonl", change["records"]) if "records" in change else rag_set[0]
    out = tmp_path / "eval"
    args = eval_args((questions, rag_set[1]), out, "--models", "tiny=tiny-llama", *change.get("args", []))
    result = rag(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: rag eval: ") and message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not (tmp_path / "eval.partial").exists()


def test_killed_rag_eval_resumes_to_the_same_answers(rag_set, tiny_model_path, tmp_path):
    """SIGKILL after three answers; the re-run keeps them, answers the rest, and equals an uninterrupted run
    (batch size 1: no padding, so every answer is independent of what else is in its batch)."""
    from datasets import load_from_disk

    common = ["--models", f"tiny={tiny_model_path}", "--batch_size", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    journal = tmp_path / "killed.partial" / "journal.jsonl"
    kill_after_journal_line(eval_args(rag_set, killed, *common), journal, tmp_path / "log", env, lines=3,
                            command="rag.cli")
    before = journal.read_text().splitlines()[:3]
    assert not killed.exists()
    resumed = rag(*eval_args(rag_set, killed, *common))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming:" in resumed.stderr
    lines = (killed / "journal.jsonl").read_text().splitlines()
    assert lines[:3] == before  # kept, not regenerated
    entries = list(map(json.loads, lines))
    keys = [(e["model"], e["cell"], e["question_id"]) for e in entries if "samples" not in e]
    assert len(keys) == len(set(keys)) == 6 * len(CAPITALS)
    sampled = [(e["question_id"], tuple(e["samples"])) for e in entries if "samples" in e]
    assert len(sampled) == len(CAPITALS) and all(len(s) == 4 for _, s in sampled)  # closed-book, 4 each

    fresh = tmp_path / "fresh"
    assert rag(*eval_args(rag_set, fresh, *common)).returncode == 0

    def answers(path):
        return sorted((r["cell"], r["question_id"], r["output"]) for r in load_from_disk(str(path / "examples")))

    assert answers(killed) == answers(fresh)

    def samples(path):  # seeded per question: a resumed run draws what an uninterrupted one draws
        return sorted((r["question_id"], tuple(r["samples"])) for r in load_from_disk(str(path / "examples")))

    assert samples(killed) == samples(fresh)
    assert json.loads((killed / "summary.json").read_text())["accuracy_by_model"] == \
        json.loads((fresh / "summary.json").read_text())["accuracy_by_model"]


def test_rag_eval_key_value_benchmark(tiny_model_path, tmp_path):
    import random
    import uuid

    rng = random.Random(0)
    rows = []
    for _ in range(4):
        pairs = [[str(uuid.UUID(int=rng.getrandbits(128))), str(uuid.UUID(int=rng.getrandbits(128)))]
                 for _ in range(6)]
        key, value = pairs[2]
        rows.append({"ordered_kv_records": pairs, "key": key, "value": value})
    out = tmp_path / "kv"
    result = rag("eval", "--benchmark", "kv", "--records", write_jsonl(tmp_path / "kv.jsonl", rows), "--models",
                 f"tiny={tiny_model_path}", "--arms", "oracle", "documents", "--num_documents", "4",
                 "--gold_positions", "0", "3", "--max_new_tokens", "4", "--output_dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["key"] for c in summary["cells"]] == ["oracle", "k4_gold0", "k4_gold3"]
    from datasets import load_from_disk

    for row in load_from_disk(str(out / "examples")):
        if row["arm"] == "documents":
            assert row["passages"][row["gold_position"]] == f"{row['question']}: {row['answers'][0]}"
            assert f'"{row["question"]}"' in row["prompt"]


def test_rag_build_writes_contexts_at_each_position(rag_set, tmp_path):
    questions, corpus = rag_set
    out = tmp_path / "built"
    result = rag("build", "--records", questions, "--corpus", corpus, "--num_documents", "4", "--gold_positions",
                 "0", "middle", "last", "--num_questions", "5", "--output_dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    import gzip

    files = sorted(p.name for p in out.glob("*.jsonl.gz"))
    assert files == ["k4_gold_at_0.jsonl.gz", "k4_gold_at_1.jsonl.gz", "k4_gold_at_3.jsonl.gz"]
    for name, position in zip(files, (0, 1, 3), strict=True):
        with gzip.open(out / name, "rt") as handle:
            rows = [json.loads(line) for line in handle]
        assert len(rows) == 5
        for row in rows:
            assert [c["isgold"] for c in row["ctxs"]].index(True) == position and len(row["ctxs"]) == 4
            assert all(row["answers"][0] not in c["text"] for c in row["ctxs"] if not c["isgold"])
    bad = rag("build", "--records", questions, "--num_documents", "4", "--gold_positions", "4", "--output_dir",
              tmp_path / "bad")
    assert bad.returncode == 2 and "gold position 4 is outside 0..3" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_rag_retrieval_reports_ranking_metrics(rag_set, tmp_path):
    questions, corpus = rag_set
    for index in ("flat", "hnsw"):
        out = tmp_path / f"{index}.json"
        result = rag("retrieval", "--records", questions, "--corpus", corpus, "--index", index, "--cutoffs", "1", "5",
                     "--output_json", out)
        assert result.returncode == 0, result.stderr[-3000:]
        metrics = json.loads(out.read_text())
        assert metrics["corpus_size"] == 30 and metrics["queries"] == 10
        assert metrics["recall@5"] >= metrics["recall@1"] > 0.5  # "capital of X" finds "... capital of X."
        assert metrics["mrr"] >= metrics["recall@1"] and metrics["queries_per_s_search"] > 0
        assert "recall@1" in result.stdout
    small = rag("retrieval", "--records", questions, "--index", "ivfpq")
    assert small.returncode == 2 and "ivfpq needs at least 256 passages" in small.stderr


def test_ranking_metrics_hand_computed():
    from rag.retrieval import ranking_metrics

    metrics = ranking_metrics([1, 3, None, 2], [1, 2])
    assert metrics["mrr"] == pytest.approx((1 + 1 / 3 + 0.5) / 4)
    assert metrics["recall@1"] == 0.25 and metrics["recall@2"] == 0.5
    assert metrics["ndcg@1"] == 0.25 and metrics["ndcg@2"] == pytest.approx((1 + 1 / 1.5849625) / 4)


@pytest.mark.smoke
@pytest.mark.slow
def test_default_model_uses_the_gold_passage(tmp_path):
    """SmolLM2-135M-Instruct on 8 questions of the team's RAG set: shown the gold passage it answers most of
    them, and more than with no passage at all."""
    out = tmp_path / "smoke"
    result = rag("eval", "--config", ROOT / "configs" / "rag" / "eval.yaml", "--num_questions", "8",
                 "--arms", "closed_book", "oracle", "documents", "--num_documents", "3", "--gold_positions", "first",
                 "--output_dir", out, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads((out / "summary.json").read_text())["accuracy_by_model"]["base"]
    assert accuracy["oracle"]["accuracy"]["rate"] >= 0.5
    assert accuracy["oracle"]["accuracy"]["rate"] > accuracy["closed_book"]["accuracy"]["rate"]
