"""Benchmark formats and k-document contexts.

**QA records** use the Lost-in-the-Middle format, one JSON object per line (gzip or plain), a JSON array, or a
directory written by `datasets.save_to_disk`::

    {"question": str, "answers": [alias, ...], "ctxs": [{"title", "text", "isgold", "hasanswer"}, ...], "id"?: str}

`build_contexts` turns records with a gold passage into k-document contexts the way the paper built its
evaluation sets: the k - 1 distractors are the corpus passages most similar to the question (cosine similarity of
sentence embeddings, exact faiss search) that contain no answer alias, kept in decreasing order of similarity,
and the gold passage is inserted at the position under test.

**Key-value records** (`kv_retrieval`): ``{"ordered_kv_records": [[key, value], ...], "key", "value"}``; the
context is a JSON object of k pairs with the gold pair moved to the position under test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_from_disk

from align.core.command import StageError
from align.core.inputs import parse_json_lines, read_text
from rag.metrics import contains_answer

POSITION_WORDS = ("first", "middle", "last")


@dataclass(frozen=True)
class Passage:
    title: str
    text: str

    @property
    def key(self) -> tuple[str, str]:
        return " ".join(self.title.split()).lower(), " ".join(self.text.split()).lower()

    def as_ctx(self, gold: bool, has_answer: bool) -> dict:
        return {"title": self.title, "text": self.text, "isgold": gold, "hasanswer": has_answer}


def read_rows(path: str | os.PathLike, stage: str) -> list[tuple[str, dict]]:
    """(location for messages, row) from a JSONL(.gz)/JSON file or a saved dataset directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        try:
            data = load_from_disk(str(path / "dataset" if (path / "dataset").is_dir() else path))
        except (FileNotFoundError, ValueError) as exc:
            raise StageError(stage, f"{path} is not a saved dataset ({str(exc).splitlines()[0]})") from None
        if isinstance(data, DatasetDict):
            split = "train" if "train" in data else next(iter(data))
            data = data[split]
        assert isinstance(data, Dataset)
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(data)]
    if not path.is_file():
        raise StageError(stage, f"file not found: {path}")
    text = read_text(path, stage)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StageError(stage, f"{path}: not valid JSON ({exc.msg}) — fix the file") from None
        return [(f"{path} record {i + 1}", row) for i, row in enumerate(rows)]
    return [(f"{path} line {number}", row) for number, row in parse_json_lines(text, path, stage)]


def load_records(path: str | os.PathLike, stage: str, require_gold: bool = True) -> list[dict]:
    """QA records, checked: a question, a non-empty list of answer aliases, passages with text and (unless
    `require_gold` is off) exactly one gold passage. Each record gets an `id` (its own, or its 1-based index)."""
    records = []
    for index, (where, row) in enumerate(read_rows(path, stage)):
        if not isinstance(row, dict):
            raise StageError(stage, f"{where}: expected a JSON object")
        question, answers, ctxs = row.get("question"), row.get("answers"), row.get("ctxs", [])
        if not isinstance(question, str) or not question.strip():
            raise StageError(stage, f"{where}: no `question` (a non-empty string)")
        if not isinstance(answers, list) or not [a for a in answers if isinstance(a, str) and a.strip()]:
            raise StageError(stage, f"{where}: empty `answers` list for {question!r} — every question needs at "
                             "least one answer alias")
        if not isinstance(ctxs, list) or not all(isinstance(c, dict) and isinstance(c.get("text"), str)
                                                 for c in ctxs):
            raise StageError(stage, f"{where}: `ctxs` must be a list of passages with a `text` string")
        flags = [c.get("isgold", False) for c in ctxs]
        if not all(isinstance(flag, bool) for flag in flags):
            bad = next(flag for flag in flags if not isinstance(flag, bool))
            raise StageError(stage, f"{where}: `isgold` must be true or false, got {bad!r}")
        if require_gold and not any(flags):
            raise StageError(stage, f"{where}: no gold passage for {question!r} (no ctx with \"isgold\": true) — "
                             "use a file with gold passages, such as nq-open-oracle")
        if require_gold and sum(flags) > 1:
            raise StageError(stage, f"{where}: {sum(flags)} gold passages for {question!r} — mark exactly one passage "
                             "\"isgold\": true (position sweeps move that one)")
        records.append({
            "id": str(row["id"]) if row.get("id") is not None else str(index + 1),
            "question": question.strip(),
            "answers": [a for a in answers if isinstance(a, str) and a.strip()],
            "ctxs": [{"title": c.get("title") or "", "text": c["text"], "isgold": bool(c.get("isgold")),
                      "hasanswer": bool(c.get("hasanswer"))} for c in ctxs],
        })
    return _unique_ids(records, path, stage)


def _unique_ids(records: list[dict], path, stage: str) -> list[dict]:
    """Records are paired across cells and models by id: two records with one id would be mixed up."""
    if not records:
        raise StageError(stage, f"{path} holds no records")
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen:
            raise StageError(stage, f"{path}: two records have the id {record['id']!r} — ids must be unique")
        seen.add(record["id"])
    return records


def gold_passage(record: dict) -> Passage:
    gold = next(c for c in record["ctxs"] if c["isgold"])
    return Passage(gold["title"], gold["text"])


def load_corpus(path: str | os.PathLike | None, records: Sequence[dict], stage: str) -> list[Passage]:
    """Distractor candidates: the passages of a corpus file (rows with `text` and optional `title`, or QA records
    whose `ctxs` are taken), plus every passage of `records`; duplicates (same title and text) once."""
    passages: list[Passage] = []
    if path is not None:
        for where, row in read_rows(path, stage):
            if isinstance(row, dict) and isinstance(row.get("ctxs"), list):
                passages.extend(Passage(c.get("title") or "", c["text"]) for c in row["ctxs"] if c.get("text"))
            elif isinstance(row, dict) and isinstance(row.get("text"), str):
                passages.append(Passage(row.get("title") or "", row["text"]))
            else:
                raise StageError(stage, f"{where}: a corpus row needs a `text` string (and optionally `title`)")
    passages.extend(Passage(c["title"], c["text"]) for record in records for c in record["ctxs"])
    unique: dict[tuple[str, str], Passage] = {}
    for passage in passages:
        unique.setdefault(passage.key, passage)
    return list(unique.values())


def resolve_position(position: str | int, k: int, stage: str) -> int:
    """A gold position as an index in 0..k-1: an integer, or first / middle ((k - 1) // 2) / last."""
    text = str(position).strip().lower()
    if text in POSITION_WORDS:
        return {"first": 0, "middle": (k - 1) // 2, "last": k - 1}[text]
    try:
        index = int(text)
    except ValueError:
        raise StageError(stage, f"gold position {position!r} is not an integer or one of first/middle/last"
                         ) from None
    if not 0 <= index < k:
        raise StageError(stage, f"gold position {index} is outside 0..{k - 1} for {k} documents — positions count "
                         "from 0")
    return index


def passage_text(passage: Passage) -> str:
    """What the embedder sees of a passage."""
    return f"{passage.title}. {passage.text}" if passage.title else passage.text


class DistractorMiner:
    """Nearest corpus passages to a question that contain none of its answers (exact inner-product search)."""

    def __init__(self, corpus: Sequence[Passage], encode: Callable[[list[str]], np.ndarray]):
        import faiss

        self.corpus = list(corpus)
        self._encode = encode
        vectors = encode([passage_text(p) for p in self.corpus])
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def mine(self, questions: Sequence[str], answers: Sequence[Sequence[str]], excluded: Sequence[Passage],
             count: int, stage: str) -> list[list[Passage]]:
        """For each question, `count` passages in decreasing similarity, none containing one of its answers (as
        whole words, like the paper's has_answer: a substring test would reject every passage for a one-letter
        answer) and none equal to its excluded (gold) passage."""
        if count == 0:
            return [[] for _ in questions]
        queries = np.ascontiguousarray(self._encode(list(questions)), dtype=np.float32)
        results: list[list[Passage] | None] = [None] * len(questions)
        width = min(len(self.corpus), max(4 * count, 32))
        pending = list(range(len(questions)))
        while pending:
            _, indices = self._index.search(queries[pending], width)  # [pending, width], best first
            still = []
            for row, i in zip(indices.tolist(), pending, strict=True):
                chosen = [self.corpus[j] for j in row if j >= 0 and self.corpus[j].key != excluded[i].key
                          and not contains_answer(passage_text(self.corpus[j]), answers[i])][:count]
                if len(chosen) == count:
                    results[i] = chosen
                elif width >= len(self.corpus):
                    usable = len(chosen)
                    raise StageError(stage, f"{count + 1} documents need {count} distractors without an answer, but "
                                     f"the corpus has only {usable} for {questions[i]!r} — lower num_documents or "
                                     "pass a larger corpus")
                else:
                    still.append(i)
            pending, width = still, min(len(self.corpus), width * 4)
        return results  # type: ignore[return-value]


def insert_gold(gold: Passage, distractors: Sequence[Passage], position: int) -> list[dict]:
    """k = len(distractors) + 1 passages with the gold one at `position`, the distractors in order around it."""
    ctxs = [d.as_ctx(gold=False, has_answer=False) for d in distractors]
    ctxs.insert(position, gold.as_ctx(gold=True, has_answer=True))
    return ctxs


def build_contexts(records: Sequence[dict], miner: DistractorMiner, k: int, positions: Sequence[int],
                   stage: str) -> dict[int, list[dict]]:
    """{position: records with k passages, the gold one at that position}; the same distractors at every position."""
    golds = [gold_passage(r) for r in records]
    distractors = miner.mine([r["question"] for r in records], [r["answers"] for r in records], golds, k - 1, stage)
    return {position: [{**record, "ctxs": insert_gold(gold, mined, position), "gold_position": position,
                        "num_documents": k}
                       for record, gold, mined in zip(records, golds, distractors, strict=True)]
            for position in positions}


# ----------------------------------------------------------------------------- key-value retrieval


def load_kv_records(path: str | os.PathLike, stage: str) -> list[dict]:
    """Key-value retrieval records: `question` is the key, `answers` its value, `pairs` every (key, value)."""
    records = []
    for index, (where, row) in enumerate(read_rows(path, stage)):
        pairs, key, value = (row.get("ordered_kv_records"), row.get("key"), row.get("value")) \
            if isinstance(row, dict) else (None, None, None)
        if not isinstance(pairs, list) or not isinstance(key, str) or not isinstance(value, str) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
            raise StageError(stage, f"{where}: a key-value record needs `ordered_kv_records` ([key, value] string "
                             "pairs), `key` and `value`")
        if [key, value] not in [list(p) for p in pairs]:
            raise StageError(stage, f"{where}: the pair for key {key!r} is not among `ordered_kv_records`")
        records.append({"id": str(row["id"]) if row.get("id") is not None else str(index + 1), "question": key,
                        "answers": [value], "pairs": [list(p) for p in pairs]})
    return _unique_ids(records, path, stage)


def kv_context(record: dict, k: int, position: int, stage: str) -> list[list[str]]:
    """k pairs: the first k - 1 other pairs in their original order, the gold pair inserted at `position`."""
    others = [p for p in record["pairs"] if p[0] != record["question"]]
    if k - 1 > len(others):
        raise StageError(stage, f"{k} key-value pairs requested but record {record['id']} has only "
                         f"{len(others) + 1} — lower num_documents")
    pairs = others[:k - 1]
    pairs.insert(position, [record["question"], record["answers"][0]])
    return pairs
