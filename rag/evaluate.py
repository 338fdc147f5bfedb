"""`rag eval`: how models use retrieved passages — position of the gold passage, number of passages, answer
similarity and grounding — with intervals and paired tests.

Every model (`--models`, entries `NAME=MODEL` or `NAME=MODEL+ADAPTER[+ADAPTER]`; adapters are merged in order,
and a PPO output brings in the SFT adapter it was trained on by itself) answers the same seeded subset of
questions in every cell: `closed_book` (no passages), `oracle` (the gold passage alone) and `documents`
(k passages, the gold one at each of `gold_positions`, for each k in `num_documents`; distractors are the
most similar passages without an answer, see `rag.data`). Answers are greedy, batched (left padding, prompts
sorted by length) and stop at the first newline.

Scored per answer: best_subspan_em (primary: a normalised alias occurs in the first line) and exact match;
embedding cosine to the best alias and the calibrated probability that the answer means the same
(`--calibration` from `rag calibrate`, otherwise fitted on pairs built from the benchmark's records); and the
grounding check of `rag.hallucination` against the passages shown (claims read for quantities, dates, swaps,
roles, negation and qualifiers; `--grounding words` keeps the word-level check, `--grounding_verifier MODEL` adds
an LM asked whether each claim is supported); closed-book answers, which have no passages, get a consistency
score instead: agreement with `--consistency_samples` sampled answers of the same model. Every rate carries a
Wilson 95% interval;
positions (within a model and k) and models (within a cell) are compared with McNemar's exact test on the
paired questions.

Writes `<output_dir>/summary.json`, `report.md`, `plots/accuracy_by_position.png`,
`plots/accuracy_by_num_documents.png`, `examples/` (a dataset: one row per model x cell x question with the
prompt, output and every metric) and `manifest.json`. Answers are journaled in `<output_dir>.partial/
journal.jsonl` as they are generated: re-running the same command after a crash resumes where it stopped.

    rag eval --config configs/rag/eval.yaml                 # the team's RAG set, default model, minutes on a CPU
    rag eval --config configs/rag/eval-nq.yaml              # 200 NQ-open questions, k = 10, gold at 0 / 4 / 9
    rag eval --config configs/rag/eval.yaml --models base=smollm2-135m-instruct sft=smollm2-135m-instruct+runs/sft
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.journal import JournalWriter, replay
from align.core.options import AT_LEAST_ONE, NON_NEGATIVE, Choice
from align.core.outputs import StageOutput, base_manifest
from align.lm.generation import GenerationSettings, generate
from align.lm.models import load_tokenizer, pick_device, resolve_model
from align.lm.policies import PolicySpec, adapter_chain, load_policy, parse_policies, policy_problems
from align.lm.precision import PRECISION_HELP, Precision, precision_problems, stage_precision
from rag import report
from rag.data import (
    DistractorMiner,
    build_contexts,
    gold_passage,
    kv_context,
    load_corpus,
    load_kv_records,
    load_records,
)
from rag.position import ARMS, Cell, plan_cells, select_questions
from rag.retrieval import Embedder
from rag.scoring import (
    add_prompt_tokens,
    calibration_for,
    make_checker,
    render_prompt,
    score_examples,
    write_results,
)

STAGE = "rag eval"
BENCHMARKS = ("qa", "kv")
GROUNDING = ("claims", "words")
logger = logging.getLogger("align")

QA_INSTRUCTION = "Answer the question using the documents below. Reply with the answer only: a few words, no " \
                 "explanation."
CLOSED_BOOK_INSTRUCTION = "Answer the question. Reply with the answer only: a few words, no explanation."
KV_INSTRUCTION = "Below is a JSON object of key-value pairs. Reply with the value of the requested key only."


@dataclass
class EvalArguments:
    benchmark: str = field(default="qa", metadata={"help": "qa (questions with a gold passage, Lost-in-the-Middle "
                                                          "format) or kv (key-value retrieval records)."})
    records: str = field(default="data/rag/questions.jsonl", metadata={"help": "The benchmark records: JSONL(.gz), "
                                                                               "JSON or a saved dataset."})
    corpus: str | None = field(default=None, metadata={"help": "qa: extra distractor passages (rows with `text`, "
                                                                "`title`); the records' own passages are always in."})
    models: list[str] = field(default_factory=lambda: ["base=smollm2-135m-instruct"],
                              metadata={"help": "Models side by side: NAME=MODEL or NAME=MODEL+ADAPTER[+ADAPTER...] "
                                                "(a model alias, directory or hub id; adapters = stage outputs)."})
    arms: list[str] = field(default_factory=lambda: list(ARMS),
                            metadata={"help": "Cells to run: closed_book, oracle, documents."})
    num_documents: list[int] = field(default_factory=lambda: [10], metadata={"help": "k values (documents arm)."})
    gold_positions: list[str] = field(default_factory=lambda: ["first", "middle", "last"],
                                      metadata={"help": "Gold positions for every k: 0-based indices or "
                                                        "first/middle/last."})
    num_questions: int | None = field(default=None, metadata={"help": "A seeded subset of N questions, the same in "
                                                                       "every cell (default: all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the question subset and of calibration pairs."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    max_new_tokens: int = field(default=32, metadata={"help": "Longest answer, in tokens."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP})
    embedding_model: str = field(default="all-minilm-l6-v2", metadata={"help": "Embeddings for distractors, "
                                                                              "similarity and grounding."})
    calibration: str | None = field(default=None, metadata={"help": "A `rag calibrate` output (default: fit one on "
                                                                     "pairs built from the records)."})
    grounding_threshold: float = field(default=0.6, metadata={"help": "Cosine a passage sentence needs to support a "
                                                                       "claim."})
    nli_model: str | None = field(default=None, metadata={"help": "A local CrossEncoder NLI directory: entailment "
                                                                   "decides support instead of cosine."})
    grounding: str = field(default="claims", metadata={"help": "claims (read numbers with units, dates, who did what "
                                                                "to whom, negation, qualifiers) or words (names and "
                                                                "numbers as written)."})
    grounding_verifier: str | None = field(default=None, metadata={"help": "A model (alias, directory or hub id) "
                                                                           "asked 'is this claim supported?' for every "
                                                                           "claim, averaged with the checker."})
    consistency_samples: int = field(default=4, metadata={"help": "Sampled answers per closed-book question "
                                                                  "(temperature 1): the greedy answer's agreement "
                                                                  "with them is its consistency (0 = none)."})
    output_dir: str = field(default="runs/rag-eval", metadata={"help": "Where the report goes."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing output_dir."})
    restart: bool = field(default=False, metadata={"help": "Discard an unfinished run in <output_dir>.partial."})


CONFIG_CLASSES = (EvalArguments,)
# Checked by `parse_config` with the shared rules of `align.core.options`, before any work.
OPTION_RULES = {"benchmark": Choice(BENCHMARKS), "num_questions": AT_LEAST_ONE, "grounding": Choice(GROUNDING),
                "consistency_samples": NON_NEGATIVE}


def option_problems(args: EvalArguments) -> list[str]:
    """What the option ranges (`OPTION_RULES`) cannot say: whether this machine has the precision asked for."""
    return precision_problems(args.precision)


def check_prompt_lengths(specs: Sequence[PolicySpec], tasks: list[dict], args: EvalArguments) -> None:
    """Fail before any work when the longest prompt plus the answer does not fit a model's context."""
    from transformers import AutoConfig  # torch and transformers load only once a run starts, not for --help

    longest = max(tasks, key=lambda t: len(t["prompt"]))["prompt"]  # by characters; tokens follow closely
    for spec in specs:
        path = resolve_model(spec.model, STAGE)
        tokenizer = load_tokenizer(path, STAGE)
        text = render_prompt(tokenizer, args.benchmark, longest)
        tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        try:
            limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        except (OSError, ValueError):
            limit = None
        if limit and tokens + args.max_new_tokens > limit:
            raise StageError(STAGE, f"the longest prompt is {tokens} tokens; with max_new_tokens={args.max_new_tokens} "
                             f"that is more than model {spec.name} takes ({limit}) — lower num_documents")


def load_model(spec: PolicySpec, precision: Precision, device: str):
    path = resolve_model(spec.model, STAGE)
    tokenizer = load_tokenizer(path, STAGE)
    return load_policy(path, spec.adapters, precision, device, STAGE), tokenizer


# ----------------------------------------------------------------------------- prompts


def context_passages(benchmark: str, ctxs: Sequence) -> list[str]:
    """The passages shown, as plain text, for the grounding check."""
    if benchmark == "kv":
        return [f"{key}: {value}" for key, value in ctxs]
    return [f"{c['title']}. {c['text']}" if c["title"] else c["text"] for c in ctxs]


def prompt_text(benchmark: str, question: str, ctxs: Sequence) -> str:
    """The user message: instruction, passages (if any), question."""
    if benchmark == "kv":
        data = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in ctxs) + "\n}"
        return f"{KV_INSTRUCTION}\n\nJSON data:\n{data}\n\nKey: {json.dumps(question)}"
    if not ctxs:
        return f"{CLOSED_BOOK_INSTRUCTION}\n\nQuestion: {question}"
    documents = "\n".join(f"Document [{i}] (Title: {c['title']}) {c['text']}" for i, c in enumerate(ctxs, start=1))
    return f"{QA_INSTRUCTION}\n\n{documents}\n\nQuestion: {question}"


# ----------------------------------------------------------------------------- contexts


def build_cell_contexts(args: EvalArguments, records: list[dict], cells: list[Cell], embedder,
                        corpus: list | None = None) -> dict[str, list]:
    """{cell key: the context shown with each record}: [] closed-book, [gold] oracle, k passages/pairs.
    Distractors come from `corpus` (default: the corpus file plus the passages of `records`); pass the corpus
    of every record of the benchmark when `records` is a subset, as `rag eval` and `rag build` do."""

    contexts: dict[str, list] = {}
    documents = [c for c in cells if c.arm == "documents"]
    if args.benchmark == "kv":
        for cell in cells:
            if cell.arm == "closed_book":
                contexts[cell.key] = [[] for _ in records]
            elif cell.arm == "oracle":
                contexts[cell.key] = [[[r["question"], r["answers"][0]]] for r in records]
            else:
                contexts[cell.key] = [kv_context(r, cell.num_documents, cell.gold_position, STAGE) for r in records]
        return contexts
    for cell in cells:
        if cell.arm == "closed_book":
            contexts[cell.key] = [[] for _ in records]
        elif cell.arm == "oracle":
            contexts[cell.key] = [[gold_passage(r).as_ctx(True, True)] for r in records]
    if documents:
        corpus = corpus if corpus is not None else load_corpus(args.corpus, records, STAGE)
        miner = DistractorMiner(corpus, embedder.encode)
        for k in sorted({c.num_documents for c in documents}):
            positions = [c.gold_position for c in documents if c.num_documents == k]
            for position, built in build_contexts(records, miner, k, positions, STAGE).items():
                contexts[f"k{k}_gold{position}"] = [r["ctxs"] for r in built]
    return contexts


# ----------------------------------------------------------------------------- journal


def read_journal(path: Path) -> tuple[dict[tuple[str, str, str], dict], dict[tuple[str, str, str], list[str]]]:
    """Answers and closed-book samples of an interrupted run, each keyed by (model, cell, question id); a torn
    last line is dropped."""
    done: dict[tuple[str, str, str], dict] = {}
    samples: dict[tuple[str, str, str], list[str]] = {}

    def accept(entry: dict) -> bool:
        key = (entry["model"], entry["cell"], entry["question_id"])
        if "samples" in entry:
            if key in samples:
                return False
            samples[key] = [str(s) for s in entry["samples"]]
            return True
        if key in done:
            return False
        done[key] = {"output": str(entry["output"]), "truncated": bool(entry["truncated"])}
        return True

    replay(path, accept)
    return done, samples


def generate_answers(spec: PolicySpec, tasks: list[dict], args: EvalArguments, journal: Path,
                     done: dict, samples: dict, device: str, precision: Precision) -> None:
    """Answer every task of one model that the journal does not hold yet, longest prompts first, in batches;
    then sample the closed-book questions for the consistency signal."""
    pending = [t for t in tasks if (spec.name, t["cell"], t["question_id"]) not in done]
    to_sample = [t for t in tasks if t["cell"] == "closed_book" and args.consistency_samples
                 and (spec.name, t["cell"], t["question_id"]) not in samples]
    if not pending and not to_sample:
        return
    model, tokenizer = load_model(spec, precision, device)
    if pending:
        _answer_pending(spec, model, tokenizer, pending, len(tasks), args, journal, done)
    if to_sample:
        _sample_closed_book(spec, model, tokenizer, to_sample, args, journal, samples)
    del model


def _sample_closed_book(spec: PolicySpec, model, tokenizer, tasks: list[dict], args: EvalArguments, journal: Path,
                        samples: dict) -> None:
    """`consistency_samples` answers at temperature 1 per closed-book question, seeded by the question, so a
    resumed run draws what the uninterrupted one would have."""
    import zlib

    from transformers import set_seed

    settings = GenerationSettings(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, stop=("\n",))
    with JournalWriter(journal) as writer:
        for task in tqdm(tasks, desc=f"sampling closed-book ({spec.name})", unit="question"):
            set_seed(args.seed + zlib.crc32(f"{spec.name}/{task['question_id']}".encode()) % 1_000_000)
            text = render_prompt(tokenizer, args.benchmark, task["prompt"])
            drawn = [g.text for g in generate(model, tokenizer, [text], settings,
                                              num_return_sequences=args.consistency_samples)[0]]
            key = (spec.name, task["cell"], task["question_id"])
            samples[key] = drawn
            writer.write([{"model": spec.name, "cell": task["cell"], "question_id": task["question_id"],
                           "samples": drawn}])


def _answer_pending(spec: PolicySpec, model, tokenizer, pending: list[dict], total: int, args: EvalArguments,
                    journal: Path, done: dict) -> None:
    texts = [render_prompt(tokenizer, args.benchmark, t["prompt"]) for t in pending]
    with JournalWriter(journal) as writer, \
            tqdm(total=total, initial=total - len(pending), desc=f"answering ({spec.name})",
                 unit="answer") as progress:
        for batch, outputs in answer_batches(model, tokenizer, texts, args.batch_size, args.max_new_tokens):
            entries = [{"model": spec.name, "cell": pending[i]["cell"], "question_id": pending[i]["question_id"],
                        "output": generation.text, "truncated": generation.truncated}
                       for i, generation in zip(batch, outputs, strict=True)]
            done.update(((e["model"], e["cell"], e["question_id"]), e) for e in entries)
            writer.write(entries)
            progress.update(len(batch))


def answer_batches(model, tokenizer, texts: Sequence[str], batch_size: int, max_new_tokens: int):
    """Greedy short answers: yields (indices into `texts`, their Generations) batch by batch, longest prompts
    first (similar lengths share a batch, so little padding; the largest batch comes first, so a memory error
    shows at once). Each answer ends at its first newline."""

    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    settings = GenerationSettings(temperature=0.0, max_new_tokens=max_new_tokens, stop=("\n",))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        yield batch, [group[0] for group in generate(model, tokenizer, [texts[i] for i in batch], settings)]


# ----------------------------------------------------------------------------- scoring


# ----------------------------------------------------------------------------- main


def validate(args: EvalArguments) -> tuple[list[PolicySpec], list[Cell]]:
    """Everything that can be checked before loading a model; errors are one line, exit code 2."""
    cells = plan_cells(args.arms, args.num_documents, args.gold_positions, STAGE)
    specs = parse_policies(args.models, STAGE)
    for spec in specs:
        resolve_model(spec.model, STAGE)
    problems = [problem for spec in specs for problem in policy_problems(spec)]
    if problems:
        raise StageError(STAGE, problems)
    return specs, cells


def run_config(args: EvalArguments) -> dict:
    """What the manifest records (the resume check leaves out batching and directory handling)."""
    return dataclasses.asdict(args)


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_config(STAGE, (EvalArguments,), argv, module="rag.evaluate")
    specs, cells = validate(args)
    config = run_config(args)
    # What an unfinished run must share with its re-run: the answers. Not how they were batched or launched.
    resume_config = {k: v for k, v in config.items() if k not in ("restart", "overwrite_output_dir", "batch_size")}
    output = StageOutput(STAGE, Path(args.output_dir), resume_config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()
    started = now_iso()
    records = load_kv_records(args.records, STAGE) if args.benchmark == "kv" else load_records(args.records, STAGE)
    if args.num_questions and args.num_questions > len(records):
        logger.warning("num_questions=%d but %s has %d records: using all", args.num_questions, args.records,
                       len(records))
    chosen = [records[i] for i in select_questions(len(records), args.num_questions, args.seed)]
    corpus = None
    if args.benchmark == "qa" and "documents" in args.arms:
        corpus = load_corpus(args.corpus, records, STAGE)  # distractors from every record, not only the subset
        if max(args.num_documents) > len(corpus):
            raise StageError(STAGE, f"{max(args.num_documents)} documents per context but the corpus has only "
                             f"{len(corpus)} passages — lower num_documents or pass a larger corpus")
    embedder = Embedder(args.embedding_model, stage=STAGE)
    contexts = build_cell_contexts(args, chosen, cells, embedder, corpus)
    tasks = [{"cell": cell.key, "question_id": record["id"],
              "prompt": prompt_text(args.benchmark, record["question"], contexts[cell.key][i])}
             for cell in cells for i, record in enumerate(chosen)]

    check_prompt_lengths(specs, tasks, args)
    calibrator, calibration = calibration_for(args, records, embedder)
    partial = output.open()
    journal = partial / "journal.jsonl"
    done, samples = read_journal(journal)
    if done:
        logger.info("resuming: %d of %d answers already in %s", len(done), len(tasks) * len(specs), journal)
    device = pick_device()
    precision = stage_precision(args.precision, device, STAGE)
    checker = make_checker(args, embedder, device, precision, STAGE)
    for spec in specs:
        generate_answers(spec, tasks, args, journal, done, samples, device, precision)

    by_cell = {cell.key: cell for cell in cells}
    index = {record["id"]: i for i, record in enumerate(chosen)}
    rows = []
    for spec in specs:
        for task in tasks:
            cell, i = by_cell[task["cell"]], index[task["question_id"]]
            key = (spec.name, task["cell"], task["question_id"])
            rows.append({"model": spec.name, "cell": cell.key, "arm": cell.arm, "num_documents": cell.num_documents,
                         "gold_position": cell.gold_position, "question_id": task["question_id"],
                         "question": chosen[i]["question"], "answers": chosen[i]["answers"], "prompt": task["prompt"],
                         "passages": context_passages(args.benchmark, contexts[cell.key][i]), **done[key],
                         "samples": samples.get(key, [])})
    windows = add_prompt_tokens(rows, specs, args.benchmark, STAGE)
    score_examples(rows, embedder, calibrator, checker)
    summary = write_results(rows, specs, cells, calibration, args, len(chosen), windows, partial)
    inputs = {"records": args.records, **({"corpus": args.corpus} if args.corpus else {}),
              **{f"adapter_{spec.name}_{n}": a for spec in specs for n, a in enumerate(adapter_chain(spec.adapters))}}
    manifest = base_manifest(STAGE, config, inputs, {s.name: {"model": s.model, "adapters": adapter_chain(s.adapters)}
                                                     for s in specs}, started)
    manifest["outputs"] = {"summary": "summary.json", "report": "report.md", "plots": "plots", "examples": "examples",
                           "journal": "journal.jsonl"}
    manifest["metrics"] = {name: {cell: values["accuracy"]["rate"] for cell, values in cells_.items()}
                           for name, cells_ in summary["accuracy_by_model"].items()}
    manifest["finished"] = now_iso()
    final = output.publish(manifest, keep=["summary.json", "report.md", "plots", "examples"])
    print(report.headline(summary, final))
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
