"""`rag build`: k-document contexts with the gold passage at chosen positions, and the evaluation cells.

A *cell* is one way of showing a question to a model: `closed_book` (no passages), `oracle` (the gold passage
alone) or `documents` (k passages, the gold one at a position). `rag eval` sweeps positions (Lost in the
Middle's U-curve) and numbers of documents; `rag build` writes the same contexts as files in the
Lost-in-the-Middle format (`k<k>_gold_at_<position>.jsonl.gz`, one per k and position), so they can be
inspected or given to other tools. Distractors are mined as described in `rag.data`; the same seeded subset of
questions is used in every file.

    rag build --records ../shared/data/nq_open/nq-open-oracle-2000.jsonl.gz --num_documents 10 \\
        --gold_positions 0 4 9 --num_questions 200 --output_dir runs/nq-10docs
    rag build --records data/rag/questions.jsonl --corpus data/rag/corpus.jsonl --num_documents 5 \\
        --gold_positions first middle last
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.outputs import StageOutput, base_manifest
from rag.data import POSITION_WORDS, DistractorMiner, build_contexts, load_corpus, load_records, resolve_position
from rag.retrieval import Embedder

STAGE = "rag build"
ARMS = ("closed_book", "oracle", "documents")
logger = logging.getLogger("align")


@dataclass(frozen=True)
class Cell:
    arm: str
    num_documents: int  # passages shown: 0 closed-book, 1 oracle, k
    gold_position: int | None  # index of the gold passage; None closed-book

    @property
    def key(self) -> str:
        return self.arm if self.arm != "documents" else f"k{self.num_documents}_gold{self.gold_position}"

    @property
    def label(self) -> str:
        if self.arm == "documents":
            return f"{self.num_documents} docs, gold at {self.gold_position}"
        return self.arm.replace("_", "-")


def plan_cells(arms: Sequence[str], ks: Sequence[int], positions: Sequence[str | int], stage: str) -> list[Cell]:
    """The cells of an evaluation, validated: known arms, k >= 1, every position inside 0..k-1 for every k."""
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        raise StageError(stage, f"unknown arm(s) {unknown or arms} — choose from {', '.join(ARMS)}")
    cells = [Cell(arm, {"closed_book": 0, "oracle": 1}[arm], None if arm == "closed_book" else 0)
             for arm in ARMS if arm in arms and arm != "documents"]
    if "documents" in arms:
        if not ks or min(ks) < 1:
            raise StageError(stage, f"num_documents must be positive integers, got {list(ks)}")
        if not positions:
            raise StageError(stage, f"the documents arm needs gold_positions (integers or {'/'.join(POSITION_WORDS)})")
        for k in sorted(set(ks)):
            for index in sorted({resolve_position(p, k, stage) for p in positions}):
                cells.append(Cell("documents", k, index))
    return cells


def select_questions(count: int, limit: int | None, seed: int) -> list[int]:
    """A seeded subset of record indices (all when `limit` is None or not smaller), in file order."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), limit))


@dataclass
class BuildArguments:
    records: str = field(default="data/rag/questions.jsonl",
                         metadata={"help": "QA records with a gold passage (JSONL(.gz), JSON or a saved dataset)."})
    corpus: str | None = field(default=None, metadata={"help": "Extra distractor passages (JSONL rows with `text`, "
                                                                "`title`); the records' own passages are always in."})
    num_documents: list[int] = field(default_factory=lambda: [10], metadata={"help": "k: passages per context."})
    gold_positions: list[str] = field(default_factory=lambda: ["0", "4", "9"],
                                      metadata={"help": "Where the gold passage goes: 0-based indices or "
                                                        "first/middle/last."})
    num_questions: int | None = field(default=None, metadata={"help": "A seeded subset of N questions (default: "
                                                                       "all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the question subset."})
    embedding_model: str = field(default="all-minilm-l6-v2", metadata={"help": "Embeds questions and passages."})
    output_dir: str = field(default="runs/rag-build", metadata={"help": "Where the context files go."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_config(STAGE, (BuildArguments,), argv, module="rag.position")
    if args.num_questions is not None and args.num_questions < 1:
        raise StageError(STAGE, f"num_questions must be at least 1, got {args.num_questions}")
    cells = plan_cells(["documents"], args.num_documents, args.gold_positions, STAGE)
    config = dataclasses.asdict(args)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir, restart=True)
    output.check()
    started = now_iso()
    records = load_records(args.records, STAGE)
    corpus = load_corpus(args.corpus, records, STAGE)
    if max(args.num_documents) > len(corpus):
        raise StageError(STAGE, f"{max(args.num_documents)} documents per context but the corpus has only "
                         f"{len(corpus)} passages — lower num_documents or pass a larger corpus")
    chosen = [records[i] for i in select_questions(len(records), args.num_questions, args.seed)]
    miner = DistractorMiner(corpus, Embedder(args.embedding_model, stage=STAGE).encode)
    built = {k: build_contexts(chosen, miner, k, [c.gold_position for c in cells if c.num_documents == k], STAGE)
             for k in sorted(set(args.num_documents))}
    partial = output.open()
    files = {}
    for cell in cells:
        name = f"k{cell.num_documents}_gold_at_{cell.gold_position}.jsonl.gz"
        with gzip.open(partial / name, "wt", encoding="utf-8") as handle:
            for record in built[cell.num_documents][cell.gold_position]:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        files[cell.key] = name
    manifest = base_manifest(STAGE, config, {"records": args.records, **({"corpus": args.corpus} if args.corpus
                                                                          else {})},
                             {"embedding_model": args.embedding_model}, started)
    manifest["outputs"] = files
    manifest["metrics"] = {"questions": len(chosen), "corpus_passages": len(corpus)}
    manifest["finished"] = now_iso()
    final = output.publish(manifest, keep=list(files.values()))
    print(f"{len(chosen)} questions x {len(files)} contexts -> {final}")
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
