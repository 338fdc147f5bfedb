"""Comparisons: K responses per prompt ranked best to worst, the data a reward model learns from.

Reads one of four sources (`--source`):

- `oasst`: OpenAssistant message trees (one JSON tree per line). Every group of >= 2 ranked sibling
  assistant replies becomes a row: the conversation from the root to their parent is the prompt, the
  replies ordered by their human rank are the responses. Synthetic and deleted messages are dropped and
  never descended into; the remaining ranks are re-densified (0, 2, 3 -> 0, 1, 2).
- `hh-rlhf`: Anthropic HH pairs `{"chosen", "rejected"}` (whole "\\n\\nHuman: ...\\n\\nAssistant: ..."
  transcripts). The shared prefix up to the last "\\n\\nAssistant:" is the prompt, the two final replies
  are the responses (chosen first, ranks [0, 1]); pairs with identical replies are skipped and counted.
- `sample`: for each prompt of a dataset, sample K responses from a policy (`--model_name_or_path`,
  optionally `--adapter` = an SFT output) and rank them. The prompt is a `prompt` column (text or chat;
  the reference answer is then `--reference_column`, default `output`) or a `messages` column (the turns
  before the last assistant reply are the prompt, that reply is the reference). `--ranker reference`
  ranks by embedding cosine similarity to the reference, degenerate responses (empty, a word 3-gram
  repeated >= 4 times, cut off at max_new_tokens) below all others; a prompt whose responses all tie is
  skipped. Finished prompts are journaled to `<output_dir>.partial/journal.jsonl`: re-running the same
  command after a crash or kill resumes without losing or repeating a prompt. `--ranker human` writes
  a ranking sheet (below) instead of a dataset: rank it on `align label`'s page, or fill it in.
- `sheet`: a ranking sheet filled in by people; `--export_sheet` writes one to fill.

Ranking sheets (JSONL or CSV, picked by the file suffix) have one row per prompt: `id`, `prompt` (the
conversation as text), `response_1` ... `response_K` (shuffled with `--seed`, so position says nothing),
an empty `ranks` field, then `num_responses` and `prompt_messages` (machine-readable; leave them). Fill
`ranks` with one integer per response in response order, 0 = best, equal numbers = a tie, no gaps:
"1 0 2" means response_2 is best, then response_1, then response_3. Importing checks every row and
names each bad one (rows counted from 1, header excluded).

Writes `<output_dir>/dataset/` with split `train` (and `test` = the last `--test_records` source
records: trees, pairs, prompts or sheet rows) and columns `prompt` (chat messages ending with a user
turn), `responses` (K >= 2 strings, best first), `ranks` (0 = best, dense, ties equal), `ranker`
("human" | "reference"), `source` ("oasst" | "hh-rlhf" | "sampled" | "sheet"), `source_id`; and
`manifest.json` with the counts. Nothing is written when the input or config is bad.

    align comparisons --config configs/comparisons.yaml            # OASST human rankings, 64 train / 16 test trees
    align comparisons --config configs/tiny/comparisons.yaml       # sample + rank with the tiny model, seconds
    align comparisons --source hh-rlhf --input_path ../shared/data/hh_rlhf/harmless-base-test-1200.jsonl.gz \\
        --output_dir runs/hh --test_records 200
    align comparisons --source sample --input_path data/seed/demonstrations.jsonl --adapter runs/sft \\
        --num_responses 4 --output_dir runs/sampled
    align comparisons --source sample --ranker human --input_path prompts.jsonl --output_dir runs/to_rank
    align comparisons --source sheet --input_path runs/to_rank/sheet.jsonl --output_dir runs/human   # filled
    align comparisons --source sheet --input_path runs/comparisons --export_sheet to_rank.csv
    python -m align.comparisons --config configs/comparisons.yaml

Sampling runs in one process, on the GPU when there is one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetDict
from tqdm import tqdm

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.inputs import load_stage_dataset, validate_columns
from align.core.journal import JournalWriter, replay
from align.core.options import AT_LEAST_ONE, NON_NEGATIVE, Choice
from align.core.outputs import StageOutput, base_manifest, run_identity, save_dataset_atomic
from align.lm.generation import Generation, GenerationSettings, generate, render_chat
from align.lm.models import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_MODEL,
    load_for_inference,
    load_tokenizer,
    pick_device,
    require_adapter,
    resolve_embedding_model,
    resolve_model,
)
from align.lm.precision import PRECISION_HELP, precision_problems, stage_precision
from align.preferences import sources
from align.preferences.format import (
    as_messages,
    check_ranking,
    comparison_row,
    comparisons_dataset,
    validate_comparisons,
)
from align.preferences.prompts import prompt_records
from align.preferences.rankers import degenerate_reason, rank_against_references

STAGE = "comparisons"
SOURCES = ("oasst", "hh-rlhf", "sample", "sheet")
RANKERS = ("reference", "human")
logger = logging.getLogger("align")


@dataclass
class ComparisonsArguments:
    source: str = field(
        default="oasst",
        metadata={"help": "Where comparisons come from: 'oasst' (OASST message trees), 'hh-rlhf' (chosen/rejected "
                  "transcripts), 'sample' (sample K responses per prompt from a policy and rank them), 'sheet' "
                  "(import a filled ranking sheet, or write one with --export_sheet)."},
    )
    input_path: str | None = field(
        default=None,
        metadata={"help": "The input: a JSONL(.gz) file for oasst/hh-rlhf, a .jsonl/.csv sheet to import, or a "
                  "dataset (stage output, save_to_disk directory, data file, hub name) of prompts for sample "
                  "and of prompt+responses for --export_sheet."},
    )
    input_split: str | None = field(
        default=None, metadata={"help": "For a dataset input: use only this split (default: every split, in order)."}
    )
    output_dir: str = field(default="runs/comparisons", metadata={"help": "Where the finished stage output goes."})
    export_sheet: str | None = field(
        default=None,
        metadata={"help": "Write a ranking sheet for people to fill (PATH.jsonl or PATH.csv) instead of a dataset: "
                  "with --source sheet from the dataset at --input_path; with --source sample from the sampled "
                  "responses (--ranker human; default <output_dir>/sheet.jsonl)."},
    )
    source_start: int = field(default=0, metadata={"help": "Skip the first N source records (trees, pairs, "
                                                           "prompts or sheet rows)."})
    source_limit: int | None = field(
        default=None, metadata={"help": "Use at most N source records after the skip (default: all)."}
    )
    test_records: int = field(
        default=0, metadata={"help": "Put the rows of the LAST N selected source records in a `test` split."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing finished output_dir (or export_sheet file)."}
    )
    restart: bool = field(
        default=False, metadata={"help": "Discard an unfinished run in <output_dir>.partial instead of resuming it."}
    )
    strict: bool = field(
        default=False, metadata={"help": "oasst/hh-rlhf: refuse the file at the first record that cannot be used, "
                                 "instead of skipping and counting it (a filled sheet is always checked strictly)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for sampling and for shuffling responses in a sheet."})


@dataclass
class SamplingArguments:
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": f"sample: the policy: '{DEFAULT_MODEL}' (embedded), 'tiny-llama', a local model directory "
                  "or a hub id."},
    )
    adapter: str | None = field(
        default=None, metadata={"help": "sample: a LoRA adapter on top of the policy (an `align sft` output dir)."}
    )
    precision: str = field(default="auto", metadata={"help": "sample: " + PRECISION_HELP})
    num_responses: int = field(default=4, metadata={"help": "sample: responses per prompt (K >= 2)."})
    temperature: float = field(default=1.0, metadata={"help": "sample: sampling temperature (> 0)."})
    top_p: float = field(default=0.95, metadata={"help": "sample: nucleus sampling probability mass (0 < p <= 1)."})
    max_new_tokens: int = field(
        default=128, metadata={"help": "sample: longest response; one that hits it without ending is degenerate."}
    )
    batch_size: int = field(default=8, metadata={"help": "sample: prompts per generate call."})
    ranker: str = field(
        default="reference",
        metadata={"help": "sample: 'reference' (embedding similarity to the reference answer) or 'human' (write a "
                  "ranking sheet to fill)."},
    )
    reference_column: str = field(
        default="output", metadata={"help": "sample: the reference-answer column used with a `prompt` column."}
    )
    embedding_model: str = field(
        default=DEFAULT_EMBEDDING_MODEL,
        metadata={"help": "sample: sentence-transformers model of the reference ranker (alias, directory or hub id)."},
    )


CONFIG_CLASSES = (ComparisonsArguments, SamplingArguments)
# Checked by `parse_config` with the shared rules of `align.core.options`, before any work.
OPTION_RULES = {"source": Choice(SOURCES), "ranker": Choice(RANKERS), "source_start": NON_NEGATIVE,
                "source_limit": AT_LEAST_ONE, "test_records": NON_NEGATIVE}


# ----------------------------------------------------------------------------- sampling


def generate_responses(model, tokenizer, prompts: list[list[dict]], num_return_sequences: int,
                       settings: GenerationSettings) -> list[list[Generation]]:
    """Sample `num_return_sequences` replies to each chat prompt (one batch); one list per prompt."""
    texts = [render_chat(tokenizer, prompt) for prompt in prompts]
    return generate(model, tokenizer, texts, settings, num_return_sequences)


# ----------------------------------------------------------------------------- the stage


def select_records(count: int, args: ComparisonsArguments) -> tuple[range, range]:
    """Indices of the train and test records after source_start / source_limit / test_records."""
    stop = count if args.source_limit is None else min(count, args.source_start + args.source_limit)
    selected = range(min(args.source_start, count), stop)
    if len(selected) <= args.test_records:
        raise StageError(STAGE, f"{len(selected)} source records selected (of {count}; source_start "
                         f"{args.source_start}, source_limit {args.source_limit}) but test_records is "
                         f"{args.test_records} — leave some for train: lower --test_records or select more records")
    cut = len(selected) - args.test_records
    return selected[:cut], selected[cut:]


def option_problems(args: ComparisonsArguments, sampling: SamplingArguments) -> list[str]:
    """What the option ranges (`OPTION_RULES`) cannot say: which options go together."""
    problems = []
    if not args.input_path:
        problems.append("--input_path is required")
    if args.export_sheet and args.source not in ("sheet", "sample"):
        problems.append("--export_sheet works with --source sheet or --source sample")
    if args.export_sheet and not args.export_sheet.endswith((".jsonl", ".csv")):
        problems.append(f"--export_sheet {args.export_sheet} must end in .jsonl or .csv")
    if args.source == "sample":
        problems += precision_problems(sampling.precision)
    return problems


def run_config(args: ComparisonsArguments, sampling: SamplingArguments) -> dict:
    """What the manifest records and a resumed run must match (sampling options only when sampling)."""
    config = {"data": dataclasses.asdict(args)}
    if args.source == "sample":
        config["sampling"] = dataclasses.asdict(sampling)
    return run_identity(config)


def main(argv: list[str] | None = None) -> Path:
    args, sampling = parse_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()
    if args.source == "sheet" and args.export_sheet:
        return export_sheet(args)
    config = run_config(args, sampling)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()
    if args.source == "sample":
        return run_sampling(args, sampling, output, config, started)
    data, counts = import_comparisons(args)
    return publish(output, output.open(), args, config, started, counts, base_model=None, data=data)


def import_comparisons(args: ComparisonsArguments) -> tuple[DatasetDict, dict]:
    """oasst / hh-rlhf / sheet: parse and check every selected record in memory (nothing is written)."""
    path = Path(args.input_path)
    records = sources.read_sheet(path, STAGE) if args.source == "sheet" else sources.read_jsonl(path, STAGE)
    train, test = select_records(len(records), args)
    convert = {"oasst": sources.oasst_comparisons, "hh-rlhf": sources.hh_comparison,
               "sheet": sources.sheet_comparison}[args.source]
    counts: Counter = Counter(records=len(train) + len(test))
    if args.source == "hh-rlhf":
        counts["skipped_identical"] = 0  # reported even when nothing was skipped
    # Public data is a little messy: its unusable records are skipped and counted. A sheet people filled in is
    # refused instead, naming its bad rows, since they can fix it.
    strict = args.strict or args.source == "sheet"
    splits: dict[str, list[dict]] = {"train": [], **({"test": []} if test else {})}
    problems: list[str] = []
    skipped: Counter = Counter()
    for split, index in [*(("train", i) for i in train), *(("test", i) for i in test)]:
        try:
            splits[split].extend(convert(records[index], counts))
        except sources.RecordError as exc:
            if not strict:
                skipped[exc.reason] += 1
                problems.append(exc.message)
                continue
            problems.append(exc.message)
            if len(problems) == (5 if args.source == "sheet" else 1):  # a sheet reports several rows at once
                break
    if strict and problems:
        raise StageError(STAGE, f"{path}: {'; '.join(problems)} — {sources.FIXES[args.source]}")
    if skipped:
        counts["skipped"] = sum(skipped.values())
        counts["skipped_reasons"] = dict(sorted(skipped.items()))
        logger.warning("skipped %d of %d records that cannot be used (%s), e.g. %s — --strict true refuses the "
                       "file instead", counts["skipped"], counts["records"],
                       ", ".join(f"{reason}: {n}" for reason, n in sorted(skipped.items())), problems[0])
    if not splits["train"]:
        raise StageError(STAGE, f"{path}: no usable comparisons in the {len(train)} training records"
                         + (f" ({counts['skipped']} skipped, e.g. {problems[0]})" if skipped else "")
                         + f" — {sources.FIXES[args.source]}")
    if "test" in splits and not splits["test"]:
        logger.warning("no usable comparisons in the %d test records: the output has no test split", len(test))
        del splits["test"]
    data = comparisons_dataset(splits)
    validate_comparisons(data, STAGE)
    return data, dict(counts)


def run_sampling(args: ComparisonsArguments, sampling: SamplingArguments, output: StageOutput, config: dict,
                 started: str) -> Path:
    """sample: K responses per prompt from the policy, journaled as they finish, then ranked (or a sheet)."""
    from transformers import set_seed  # here, not at import: the other sources and every check need none

    human = sampling.ranker == "human" or args.export_sheet is not None
    records = prompt_records(load_stage_dataset(args.input_path, STAGE), args.input_split,
                                       sampling.reference_column, need_reference=not human, stage=STAGE)
    train, test = select_records(len(records), args)
    selected = [records[i] for i in (*train, *test)]
    sheet = Path(args.export_sheet) if args.export_sheet else None
    if sheet is not None and sheet.exists() and not args.overwrite_output_dir:
        raise StageError(STAGE, f"{sheet} already exists — choose another --export_sheet or pass "
                         "--overwrite_output_dir true")
    model_path = resolve_model(sampling.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    if not tokenizer.chat_template:
        raise StageError(STAGE, f"{sampling.model_name_or_path} has no chat template — use a chat (instruct) model")
    if sampling.adapter:
        require_adapter(sampling.adapter, STAGE)
    embedding_path = None if human else resolve_embedding_model(sampling.embedding_model, STAGE)
    device = pick_device()

    partial = output.open()
    journal = partial / "journal.jsonl"
    done = read_journal(journal, len(selected))
    pending = [position for position in range(len(selected)) if position not in done]
    if done:
        logger.info("resuming: %d of %d prompts already sampled (%s)", len(done), len(selected), journal)
    if pending:
        precision = stage_precision(sampling.precision, device, STAGE)
        model = load_for_inference(model_path, precision, [sampling.adapter] if sampling.adapter else [], device,
                                   STAGE)
        settings = GenerationSettings(sampling.temperature, sampling.top_p, sampling.max_new_tokens)
        with JournalWriter(journal) as writer, \
                tqdm(total=len(selected), initial=len(done), desc="sampling", unit="prompt") as progress:
            for start in range(0, len(pending), sampling.batch_size):
                positions = pending[start:start + sampling.batch_size]
                set_seed(args.seed + positions[0])  # the same batch samples the same responses on a re-run
                groups = generate_responses(model, tokenizer, [selected[p]["prompt"] for p in positions],
                                            sampling.num_responses, settings)
                done.update(zip(positions, groups, strict=True))
                writer.write({"position": position, "source_id": selected[position]["source_id"],
                              "responses": [g.text for g in group], "truncated": [g.truncated for g in group]}
                             for position, group in zip(positions, groups, strict=True))
                progress.update(len(positions))
    groups = [done[position] for position in range(len(selected))]
    counts: Counter = Counter(prompts=len(selected), resumed_prompts=len(selected) - len(pending),
                              skipped_all_tied=0, degenerate_empty=0, degenerate_loop=0, degenerate_truncated=0)
    counts.update(f"degenerate_{reason}" for group in groups for g in group
                  if (reason := degenerate_reason(g.text, g.truncated)))
    base_model = {"name_or_path": sampling.model_name_or_path, "resolved": model_path, "adapter": sampling.adapter}
    inputs = {"input": args.input_path, **({"adapter": sampling.adapter} if sampling.adapter else {})}
    if human:
        rows = [{"id": record["source_id"], "prompt": record["prompt"], "responses": [g.text for g in group]}
                for record, group in zip(selected, groups, strict=True)]
        sources.write_sheet(rows, sheet or partial / "sheet.jsonl", args.seed)
        final = publish(output, partial, args, config, started, counts, base_model, inputs, sheet=sheet)
        _say_how_to_import(sheet or final / "sheet.jsonl", len(rows))
        return final

    from sentence_transformers import SentenceTransformer

    embedder = SentenceTransformer(embedding_path, device=device)
    ranks = rank_against_references(embedder, groups, [record["reference"] for record in selected])
    splits: dict[str, list[dict]] = {"train": [], **({"test": []} if test else {})}
    for position, (record, group, group_ranks) in enumerate(zip(selected, groups, ranks, strict=True)):
        responses = [g.text for g in group]
        if check_ranking(responses, group_ranks) is not None:  # every response tied: no preference to learn
            counts["skipped_all_tied"] += 1
            continue
        split = "train" if position < len(train) else "test"
        splits[split].append(comparison_row(record["prompt"], responses, group_ranks, "reference", "sampled",
                                            record["source_id"]))
    data = comparisons_dataset(splits)
    validate_comparisons(data, STAGE)
    return publish(output, partial, args, config, started, dict(counts), base_model, inputs, data=data)


def read_journal(journal: Path, size: int) -> dict[int, list[Generation]]:
    """Prompts finished by an earlier, interrupted run; a line torn by a kill is dropped (and sampled again)."""
    done: dict[int, list[Generation]] = {}

    def accept(record: dict) -> bool:
        position = int(record["position"])
        group = [Generation(t, bool(c)) for t, c in zip(record["responses"], record["truncated"], strict=True)]
        if not 0 <= position < size or position in done:
            return False
        done[position] = group
        return True

    replay(journal, accept)
    return done


def publish(output: StageOutput, partial: Path, args: ComparisonsArguments, config: dict, started: str,
            counts: dict, base_model: dict | None, inputs: dict | None = None, data: DatasetDict | None = None,
            sheet: Path | None = None) -> Path:
    """Write the manifest (with the counts) beside `dataset/` (saved here) or a sheet, and publish."""
    manifest = base_manifest(STAGE, config, inputs or {"input": args.input_path}, base_model, started)
    partial_journal = (partial / "journal.jsonl").exists()  # sample mode keeps its raw generations
    if data is not None:
        save_dataset_atomic(data, partial / "dataset")
        manifest["outputs"] = {"dataset": "dataset", **({"journal": "journal.jsonl"} if partial_journal else {})}
        responses = [len(r) for split in data.values() for r in split["responses"]]
        counts = {"rows": {split: len(rows) for split, rows in data.items()},
                  "responses_per_row": dict(sorted(Counter(responses).items())), **counts}
    else:
        manifest["outputs"] = {"sheet": "sheet.jsonl" if sheet is None else str(sheet), "journal": "journal.jsonl"}
    manifest["metrics"] = dict(counts)
    manifest["finished"] = now_iso()
    final = output.publish(manifest, keep=["dataset"] if data is not None else ["sheet.jsonl"] if sheet is None else [])
    if data is not None:
        logger.info("%s comparisons (%s) -> %s", args.source,
                    ", ".join(f"{split}: {len(rows)} rows" for split, rows in data.items()), final / "dataset")
    return final


def export_sheet(args: ComparisonsArguments) -> Path:
    """`--source sheet --export_sheet PATH`: a ranking sheet from a dataset with `prompt` and `responses`."""
    path = Path(args.export_sheet)
    if path.exists() and not args.overwrite_output_dir:
        raise StageError(STAGE, f"{path} already exists — choose another --export_sheet or pass "
                         "--overwrite_output_dir true")
    data = load_stage_dataset(args.input_path, STAGE)
    splits = [args.input_split] if args.input_split else list(data)
    validate_columns(data, STAGE, {"prompt": "str|messages", "responses": "list[str]"}, splits=splits)
    records = [(split, index, row) for split in splits for index, row in enumerate(data[split])]
    train, test = select_records(len(records), args)
    selected = [records[i] for i in [*train, *test]]
    ids = [str(row.get("source_id") or "") for _, _, row in selected]
    if not all(ids) or len(set(ids)) < len(ids):  # no usable ids of its own: name rows by position
        ids = [f"{split}:{index}" for split, index, _ in selected]
    rows = [{"id": sheet_id, "prompt": as_messages(row["prompt"]), "responses": row["responses"]}
            for sheet_id, (_, _, row) in zip(ids, selected, strict=True)]
    sources.write_sheet(rows, path, args.seed)
    _say_how_to_import(path, len(rows))
    return path


def _say_how_to_import(sheet: Path, rows: int) -> None:
    logger.info("wrote a ranking sheet with %d prompts to %s — rank them in a browser with `align label --input %s "
                "--output_dir <dir>`, or fill its `ranks` column and run `align comparisons --source sheet "
                "--input_path %s --output_dir <dir>`", rows, sheet, sheet, sheet)


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
