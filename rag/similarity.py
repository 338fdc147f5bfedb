"""`rag calibrate`: semantic similarity of answers to references, turned into a calibrated probability.

The similarity of an answer to a question's references is the cosine similarity of sentence embeddings
(all-MiniLM-L6-v2) between the first line of the answer and the best-matching answer alias. A cosine is not a
probability: 0.6 means "same answer" for a bare name and "different answer" for a sentence around the wrong
name. `rag calibrate` fits a monotone map from cosine to P(same meaning) on labelled pairs:

- built from benchmark records (`--records`): for each question, answers shaped like a generator's output
  (the bare alias, the alias in a short sentence, the sentence of the gold passage that holds it) are
  positives; the same shapes around another question's answer, and sentences of the gold passage that do not
  hold the answer (on topic but wrong), are negatives;
- and/or given by the user (`--pairs`, JSONL rows `{"answer", "references": [...] | "reference", "label": 0|1}`);
- and/or taken from a finished `rag eval` (`--from_eval`): real generator outputs labelled by best_subspan_em.

Pairs are split by question into a fitting and a held-out part (`--test_fraction`); the report gives ROC-AUC of
the cosine and the expected calibration error (ECE, 10 bins) and Brier score of the raw cosine and of the
calibrated probability on the held-out part. `isotonic` (default) is a non-decreasing step function;
`logistic` is a sigmoid of the cosine. Writes `<output_dir>/calibration.json` (used by `rag eval
--calibration`), `pairs/` (a dataset with every pair, its cosine, probability and split) and `manifest.json`.

    rag calibrate --records data/rag/questions.jsonl --output_dir runs/calibration
    rag calibrate --records ../shared/data/nq_open/nq-open-oracle-2000.jsonl.gz --limit 500 --method logistic
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, load_from_disk

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.options import Choice, Range
from align.core.outputs import StageOutput, base_manifest, write_json_atomic
from rag.data import load_records, read_rows
from rag.metrics import (
    brier_score,
    contains_answer,
    expected_calibration_error,
    first_line,
    normalize_answer,
    roc_auc,
)
from rag.retrieval import Embedder

STAGE = "rag calibrate"
METHODS = ("isotonic", "logistic")
CALIBRATION_FILE = "calibration.json"
logger = logging.getLogger("align")

# Shapes of a short answer in the way instruct models write them; `{}` is the answer.
ANSWER_SHAPES = ("{}", "{}.", "The answer is {}.", "It is {}.", "{}, according to the documents.")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_NUMBER_SIGN = re.compile(r"\bNos?\.$")  # "No. 40": an abbreviation before a number only
_ABBREVIATION = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|St|Mt|Vol|vs|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|"
                           r"Nov|Dec|Gen|Col|Capt|Lt|Sgt|Rev|Jr|Sr|Inc|Ltd|Co|Corp|approx|ca|c|e\.g|i\.e)|\b[A-Z])\.$")


def split_sentences(text: str) -> list[str]:
    """Sentences of a text (split after . ! ? before an upper-case letter or digit, and at line breaks; not after
    an abbreviation or an initial: "Sept. 21", "Dr. Lee", "J. Smith")."""
    sentences = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line):
            piece = piece.strip()
            if not piece:
                continue
            previous = sentences[-1][0] if sentences and sentences[-1][1] == len(sentences) else None
            if previous and (_ABBREVIATION.search(previous) or (_NUMBER_SIGN.search(previous)
                                                                and piece[0].isdigit())):
                sentences[-1] = (f"{sentences[-1][0]} {piece}", len(sentences))
            else:
                sentences.append((piece, len(sentences) + 1))
        sentences = [(s, -1) for s, _ in sentences]  # a line break always ends a sentence
    return [s for s, _ in sentences]


class Calibrator:
    """A non-decreasing map from cosine similarity to the probability that two answers mean the same."""

    def __init__(self, method: str, params: dict):
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}")
        self.method, self.params = method, params

    @classmethod
    def fit(cls, scores: Sequence[float], labels: Sequence[bool], method: str = "isotonic") -> Calibrator:
        x = np.asarray(scores, dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        if len(set(y.tolist())) < 2:
            raise ValueError("calibration needs both positive and negative pairs")
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
            return cls(method, {"x": model.X_thresholds_.tolist(), "y": model.y_thresholds_.tolist()})
        if method == "logistic":
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(C=100.0).fit(x[:, None], y)
            slope = float(model.coef_[0, 0])
            if slope < 0:  # more similar must never mean less likely the same; a flat map is the honest fallback
                slope = 0.0
                intercept = float(np.log(y.mean() / (1 - y.mean())))
            else:
                intercept = float(model.intercept_[0])
            return cls(method, {"slope": slope, "intercept": intercept})
        raise ValueError(f"unknown calibration method {method!r}")

    def __call__(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        x = np.asarray(scores, dtype=np.float64)
        if self.method == "isotonic":
            return np.interp(x, self.params["x"], self.params["y"])
        return 1.0 / (1.0 + np.exp(-(self.params["slope"] * x + self.params["intercept"])))

    def to_dict(self) -> dict:
        return {"method": self.method, **self.params}

    @classmethod
    def load(cls, path: str | Path, stage: str = STAGE) -> Calibrator:
        """From a `rag calibrate` output directory or its calibration.json."""
        path = Path(path)
        file = path / CALIBRATION_FILE if path.is_dir() else path
        try:
            data = json.loads(file.read_text())
            method = data.pop("method")
            needed = {"isotonic": ("x", "y"), "logistic": ("slope", "intercept")}.get(method, ())
            missing = [key for key in needed if key not in data]
            if missing:
                raise KeyError(", ".join(missing))
            return cls(method, data)
        except (OSError, json.JSONDecodeError, KeyError, ValueError, AttributeError) as exc:
            raise StageError(stage, f"cannot read a calibration from {file} ({exc}) — pass a `rag calibrate` "
                             "output directory") from None


def alias_similarity(embedder, outputs: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """Cosine similarity of each output's first line with its best-matching reference; 0.0 for an empty output."""
    lines = [first_line(o) for o in outputs]
    aliases = sorted({a for refs in references for a in refs})
    vectors = embedder.encode([*aliases, *[line for line in lines if line]])
    alias_vectors = dict(zip(aliases, vectors[:len(aliases)], strict=True))
    output_vectors = iter(vectors[len(aliases):])
    scores = []
    for line, refs in zip(lines, references, strict=True):
        if not line:
            scores.append(0.0)
            continue
        vector = next(output_vectors)
        scores.append(float(max(float(alias_vectors[a] @ vector) for a in refs)))
    return scores


def pairs_from_records(records: Sequence[dict], seed: int) -> list[dict]:
    """Labelled (answer, references) pairs in generator-like shapes; see the module docstring."""
    rng = random.Random(seed)
    pairs = []
    for i, record in enumerate(records):
        aliases, group = record["answers"], record["id"]
        other = _other_record(records, i, rng)
        gold = next((c["text"] for c in record["ctxs"] if c["isgold"]), "")
        sentences = split_sentences(gold)
        holding = [s for s in sentences if contains_answer(s, aliases) and len(s.split()) <= 40]
        lacking = [s for s in sentences if not contains_answer(s, aliases) and 4 <= len(s.split()) <= 40]

        def add(answer: str, label: int, kind: str, aliases=aliases, group=group) -> None:
            pairs.append({"answer": answer, "references": list(aliases), "label": label, "kind": kind,
                          "group": group})

        add(rng.choice(ANSWER_SHAPES).format(rng.choice(aliases)), 1, "alias")
        add(rng.choice(ANSWER_SHAPES).format(rng.choice(aliases)), 1, "alias")
        if holding:
            add(rng.choice(holding), 1, "passage_sentence")
        if other is not None:
            add(rng.choice(ANSWER_SHAPES).format(rng.choice(other["answers"])), 0, "other_answer")
            other_gold = next((c["text"] for c in other["ctxs"] if c["isgold"]), "")
            other_holding = [s for s in split_sentences(other_gold) if contains_answer(s, other["answers"])
                             and len(s.split()) <= 40]
            if other_holding:
                add(rng.choice(other_holding), 0, "other_passage_sentence")
        if lacking:
            add(rng.choice(lacking), 0, "on_topic_sentence")
    return pairs


def _other_record(records: Sequence[dict], i: int, rng: random.Random, tries: int = 10) -> dict | None:
    """A random other record whose answers share no alias with record i's (None if none found)."""
    aliases = records[i]["answers"]
    for _ in range(tries if len(records) > 1 else 0):
        other = records[rng.randrange(len(records))]
        if other is not records[i] and not any(contains_answer(a, aliases) or contains_answer(b, other["answers"])
                                               for a in other["answers"] for b in aliases):
            return other
    return None


def pairs_from_file(path: str | Path, stage: str = STAGE) -> list[dict]:
    pairs = []
    for where, row in read_rows(path, stage):
        row = row if isinstance(row, dict) else {}
        references = row.get("references", row.get("reference"))
        references = [references] if isinstance(references, str) else references
        if not isinstance(row.get("answer"), str) or not isinstance(references, list) or not references \
                or row.get("label") not in (0, 1, True, False):
            raise StageError(stage, f"{where}: a labelled pair needs `answer` (string), `references` (list of "
                             "strings) or `reference`, and `label` (0 or 1)")
        pairs.append({"answer": row["answer"], "references": [str(r) for r in references], "label": int(row["label"]),
                      "kind": "given", "group": str(row.get("group") or "|".join(sorted(map(normalize_answer,
                                                                                           references))))})
    return pairs


def pairs_from_eval(path: str | Path, stage: str = STAGE) -> list[dict]:
    """Real generator outputs of a finished `rag eval`, labelled by best_subspan_em."""
    directory = Path(path) / "examples"
    if not directory.is_dir():
        raise StageError(stage, f"{path} is not a finished `rag eval` output (no examples/)")
    data = load_from_disk(str(directory))
    return [{"answer": row["output"], "references": row["answers"], "label": int(row["best_subspan_em"]),
             "kind": "eval_output", "group": row["question_id"]} for row in data if first_line(row["output"])]


def split_pairs(pairs: Sequence[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Fitting and held-out pairs, split by `group` (question) so no question is in both."""
    groups = sorted({p["group"] for p in pairs})
    random.Random(seed).shuffle(groups)
    held = set(groups[:int(round(len(groups) * test_fraction))])
    return [p for p in pairs if p["group"] not in held], [p for p in pairs if p["group"] in held]


def calibration_metrics(scores: Sequence[float], probabilities: Sequence[float], labels: Sequence[int]) -> dict:
    raw = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0).tolist()
    return {"pairs": len(labels), "positives": int(sum(labels)), "roc_auc": roc_auc(scores, labels),
            "ece_raw_cosine": expected_calibration_error(raw, labels),
            "ece_calibrated": expected_calibration_error(list(probabilities), labels),
            "brier_raw_cosine": brier_score(raw, labels), "brier_calibrated": brier_score(list(probabilities), labels)}


def fit_calibration(pairs: list[dict], embedder, method: str, test_fraction: float, seed: int,
                    stage: str = STAGE) -> tuple[Calibrator, dict, list[dict]]:
    """Score every pair, fit on the fitting split, evaluate on the held-out one. Returns the calibrator, the
    metrics ({"fit": ..., "held_out": ...}) and the pairs with `cosine`, `probability` and `split` added."""
    train, test = split_pairs(pairs, test_fraction, seed)
    if len({p["label"] for p in train}) < 2:
        raise StageError(stage, f"the fitting split has {len(train)} pairs of one label only — calibration needs "
                         "positives and negatives; add records or labelled pairs")
    scores = alias_similarity(embedder, [p["answer"] for p in pairs], [p["references"] for p in pairs])
    by_id = {id(p): s for p, s in zip(pairs, scores, strict=True)}
    calibrator = Calibrator.fit([by_id[id(p)] for p in train], [p["label"] for p in train], method)
    rows = []
    for split, part in (("fit", train), ("held_out", test)):
        for p in part:
            rows.append({**p, "cosine": by_id[id(p)], "probability": float(calibrator([by_id[id(p)]])[0]),
                         "split": split})
    metrics = {}
    for split in ("fit", "held_out"):
        part = [r for r in rows if r["split"] == split]
        if part:
            metrics[split] = calibration_metrics([r["cosine"] for r in part], [r["probability"] for r in part],
                                                 [r["label"] for r in part])
    return calibrator, metrics, rows


@dataclass
class CalibrateArguments:
    records: str | None = field(default=None, metadata={"help": "QA records with gold passages to build labelled "
                                                                 "pairs from (default data/rag/questions.jsonl when "
                                                                 "neither --pairs nor --from_eval is given)."})
    pairs: str | None = field(default=None, metadata={"help": "A JSONL file of labelled pairs {answer, references, "
                                                               "label}."})
    from_eval: str | None = field(default=None, metadata={"help": "A finished `rag eval` output: its outputs "
                                                                   "labelled by best_subspan_em."})
    limit: int | None = field(default=None, metadata={"help": "Use at most N records."})
    method: str = field(default="isotonic", metadata={"help": "isotonic (step function) or logistic (sigmoid)."})
    test_fraction: float = field(default=0.3, metadata={"help": "Share of questions held out for the report."})
    seed: int = field(default=0, metadata={"help": "Seed for answer shapes and the held-out split."})
    embedding_model: str = field(default="all-minilm-l6-v2", metadata={"help": "sentence-transformers model."})
    output_dir: str = field(default="runs/calibration", metadata={"help": "Where the calibration goes."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})


def collect_pairs(args: CalibrateArguments) -> tuple[list[dict], dict[str, str]]:
    sources = {}
    pairs: list[dict] = []
    records_path = args.records or (None if args.pairs or args.from_eval else "data/rag/questions.jsonl")
    if records_path:
        pairs += pairs_from_records(load_records(records_path, STAGE)[:args.limit], args.seed)
        sources["records"] = records_path
    if args.pairs:
        pairs += pairs_from_file(args.pairs)
        sources["pairs"] = args.pairs
    if args.from_eval:
        pairs += pairs_from_eval(args.from_eval)
        sources["from_eval"] = args.from_eval
    return pairs, sources


# Checked by `parse_config` with the shared rules of `align.core.options`, before any work.
OPTION_RULES = {"method": Choice(METHODS), "test_fraction": Range(0, 1, low_open=True, high_open=True)}


def main(argv: list[str] | None = None) -> Path:

    (args,) = parse_config(STAGE, (CalibrateArguments,), argv, module="rag.similarity")
    if args.method not in METHODS:
        raise StageError(STAGE, f"unknown method {args.method!r} — choose isotonic or logistic")
    config = dataclasses.asdict(args)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir, restart=True)
    output.check()
    started = now_iso()
    pairs, sources = collect_pairs(args)
    embedder = Embedder(args.embedding_model, stage=STAGE)
    calibrator, metrics, rows = fit_calibration(pairs, embedder, args.method, args.test_fraction, args.seed)
    partial = output.open()
    write_json_atomic(partial / CALIBRATION_FILE, calibrator.to_dict())
    Dataset.from_list(rows).save_to_disk(str(partial / "pairs"))
    manifest = base_manifest(STAGE, config, sources, {"embedding_model": args.embedding_model}, started)
    manifest["outputs"] = {"calibration": CALIBRATION_FILE, "pairs": "pairs"}
    manifest["metrics"] = metrics
    manifest["finished"] = now_iso()
    final = output.publish(manifest, keep=[CALIBRATION_FILE, "pairs"])
    split = "held_out" if "held_out" in metrics else "fit"
    shown = metrics[split]
    auc = "n/a (one label)" if shown["roc_auc"] is None else f"{shown['roc_auc']:.3f}"
    print(f"{len(pairs)} pairs; {split.replace('_', '-')} ROC-AUC {auc}, ECE {shown['ece_raw_cosine']:.3f} (raw "
          f"cosine) -> {shown['ece_calibrated']:.3f} (calibrated, {args.method}); saved {final / CALIBRATION_FILE}")
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
