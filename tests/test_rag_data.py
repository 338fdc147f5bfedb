"""rag.data and rag.position: record checks, distractor mining, gold positions, key-value contexts, cells."""

from __future__ import annotations

import gzip
import json
import re
import zlib

import numpy as np
import pytest

from align.core.command import StageError
from rag.data import (
    DistractorMiner,
    Passage,
    build_contexts,
    kv_context,
    load_corpus,
    load_kv_records,
    load_records,
    resolve_position,
)
from rag.metrics import contains_answer
from rag.position import plan_cells, select_questions
from tests.conftest import write_jsonl


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in encoder: hashed word counts, L2-normalised (similar words = similar vectors)."""
    vectors = np.zeros((len(texts), 256), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            vectors[row, zlib.crc32(word.encode()) % 256] += 1.0
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-9)


def record(question: str, answer: str, gold: str, **extra) -> dict:
    return {"question": question, "answers": [answer],
            "ctxs": [{"title": "Gold", "text": gold, "isgold": True, "hasanswer": True}], **extra}


def test_load_records_checks_each_record(tmp_path):
    good = record("capital of france", "Paris", "Paris is the capital of France.")
    path = write_jsonl(tmp_path / "ok.jsonl", [good, {**good, "id": "q7"}])
    records = load_records(path, "rag eval")
    assert [r["id"] for r in records] == ["1", "q7"]
    gz = tmp_path / "ok.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write(json.dumps(good) + "\n")
    assert load_records(gz, "rag eval")[0]["answers"] == ["Paris"]

    no_gold = {**good, "ctxs": [{"title": "t", "text": "x", "isgold": False}]}
    with pytest.raises(StageError, match=r"line 2: no gold passage for 'capital of france'"):
        load_records(write_jsonl(tmp_path / "a.jsonl", [good, no_gold]), "rag eval")
    with pytest.raises(StageError, match=r"line 1: empty `answers` list"):
        load_records(write_jsonl(tmp_path / "b.jsonl", [{**good, "answers": []}]), "rag eval")
    with pytest.raises(StageError, match=r"line 1: empty `answers` list"):
        load_records(write_jsonl(tmp_path / "c.jsonl", [{**good, "answers": ["  "]}]), "rag eval")
    with pytest.raises(StageError, match="two records have the id 'q1'"):
        load_records(write_jsonl(tmp_path / "d.jsonl", [{**good, "id": "q1"}, {**good, "id": "q1"}]), "rag eval")
    with pytest.raises(StageError, match="two records have the id '2'"):  # an explicit id equal to a line number
        load_records(write_jsonl(tmp_path / "e.jsonl", [{**good, "id": "2"}, good]), "rag eval")
    with pytest.raises(StageError, match="file not found"):
        load_records(tmp_path / "missing.jsonl", "rag eval")


def test_resolve_position():
    assert [resolve_position(p, 10, "s") for p in ("first", "middle", "last", "3", 9)] == [0, 4, 9, 3, 9]
    assert resolve_position("middle", 20, "s") == 9
    with pytest.raises(StageError, match="gold position 10 is outside 0..9"):
        resolve_position(10, 10, "s")
    with pytest.raises(StageError, match="outside"):
        resolve_position(-1, 10, "s")
    with pytest.raises(StageError, match="not an integer"):
        resolve_position("centre", 10, "s")


def test_plan_cells_validates_before_work():
    cells = plan_cells(["documents", "closed_book", "oracle"], [5, 3], ["first", "last"], "s")
    assert [c.key for c in cells] == ["closed_book", "oracle", "k3_gold0", "k3_gold2", "k5_gold0", "k5_gold4"]
    with pytest.raises(StageError, match="unknown arm"):
        plan_cells(["book"], [5], ["0"], "s")
    with pytest.raises(StageError, match="outside 0..2"):
        plan_cells(["documents"], [3, 10], ["9"], "s")  # fine for 10 documents, not for 3
    assert select_questions(10, 4, seed=1) == select_questions(10, 4, seed=1)
    assert select_questions(10, 4, seed=1) != select_questions(10, 4, seed=2)
    assert select_questions(5, None, 0) == list(range(5))


def mining_setup():
    records = [
        load_records_from([record("who painted the mona lisa", "Leonardo da Vinci",
                                  "The Mona Lisa was painted by Leonardo da Vinci.")])[0],
        load_records_from([record("what is the boiling point of water at sea level", "100 degrees",
                                  "At sea level water boils at 100 degrees Celsius.")])[0],
    ]
    corpus = [
        Passage("Mona Lisa", "The Mona Lisa hangs in the Louvre; Leonardo da Vinci painted the Mona Lisa."),  # answer
        Passage("Mona Lisa theft", "The Mona Lisa was stolen from the Louvre in 1911."),
        Passage("Louvre", "The Louvre displays the Mona Lisa behind glass."),
        Passage("Painting", "Who painted many portraits in Florence? Many painters of the Mona Lisa era."),
        Passage("Water", "Water at sea level boils at 100 degrees, a point of the Celsius scale."),  # answer
        Passage("Boiling", "The boiling point of water falls at high altitude, below sea level values."),
        Passage("Sea", "Sea water contains salt, which raises the boiling point."),
        Passage("Kettles", "Electric kettles stop when the water reaches its boiling point."),
    ]
    return records, corpus


def load_records_from(rows):
    return [{**r, "id": str(i + 1), "ctxs": [{**c, "title": c["title"]} for c in r["ctxs"]]}
            for i, r in enumerate(rows)]


def test_distractors_never_contain_an_answer_and_gold_lands_where_asked():
    records, corpus = mining_setup()
    corpus = load_corpus(None, records, "s") + corpus
    miner = DistractorMiner(corpus, bag_of_words)
    built = build_contexts(records, miner, 4, [0, 2, 3], "s")
    for position, contexts in built.items():
        for rec, original in zip(contexts, records, strict=True):
            assert len(rec["ctxs"]) == 4 and rec["gold_position"] == position
            assert [c["isgold"] for c in rec["ctxs"]].index(True) == position
            assert rec["ctxs"][position]["text"] == original["ctxs"][0]["text"]
            for ctx in rec["ctxs"]:
                if not ctx["isgold"]:
                    assert not contains_answer(f"{ctx['title']}. {ctx['text']}", original["answers"])
    # the same distractors, in the same (similarity) order, at every position
    distractors = {p: [[c["text"] for c in r["ctxs"] if not c["isgold"]] for r in built[p]] for p in built}
    assert distractors[0] == distractors[2] == distractors[3]
    # the passages containing the answers were the nearest ones, and were skipped
    assert "Leonardo" not in " ".join(distractors[0][0])
    assert "100 degrees" not in " ".join(distractors[0][1])


def test_too_few_distractors_is_a_clear_error():
    records, corpus = mining_setup()
    miner = DistractorMiner(load_corpus(None, records, "s") + corpus, bag_of_words)
    with pytest.raises(StageError, match="need 9 distractors without an answer, but the corpus has only"):
        build_contexts(records, miner, 10, [0], "s")


def test_corpus_file_and_duplicates(tmp_path):
    records, _ = mining_setup()
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"title": "A", "text": "one"}, {"title": "A", "text": " one "},
                                                   {"text": "two"}])
    corpus = load_corpus(path, records, "s")
    assert [p.text for p in corpus][:2] == ["one", "two"] and len(corpus) == 4  # + the two gold passages
    with pytest.raises(StageError, match="line 1: a corpus row needs a `text` string"):
        load_corpus(write_jsonl(tmp_path / "bad.jsonl", [{"title": "no text"}]), records, "s")


def test_kv_records_and_contexts(tmp_path, shared_data):
    records = load_kv_records(shared_data / "kv_retrieval" / "kv-retrieval-75_keys.jsonl.gz", "s")
    assert len(records) == 500 and len(records[0]["pairs"]) == 75
    first = records[0]
    for k, position in ((10, 0), (10, 9), (75, 37)):
        pairs = kv_context(first, k, position, "s")
        assert len(pairs) == k and pairs[position] == [first["question"], first["answers"][0]]
        assert sum(p[0] == first["question"] for p in pairs) == 1
    with pytest.raises(StageError, match="76 key-value pairs requested"):
        kv_context(first, 76, 0, "s")
    with pytest.raises(StageError, match="is not among"):
        load_kv_records(write_jsonl(tmp_path / "kv.jsonl", [{"ordered_kv_records": [["a", "b"]], "key": "a",
                                                              "value": "c"}]), "s")
