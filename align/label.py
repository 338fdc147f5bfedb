"""Rank responses in a browser: a local web page where people rank each prompt's K responses, written as
a comparisons dataset that `align reward` trains on.

Reads the items to rank from `--input`: an `align comparisons` output (its dataset, any ranks ignored; or
the `sheet.jsonl` that `--source sample --ranker human` writes), a ranking sheet (.jsonl or .csv), or a
JSONL file with `prompt` (text or chat messages) and `responses` (2-9 strings), `id` optional. Serves the
page on `--host`:`--port` and prints its address: open it, give your name once, and rank. Each prompt's
responses appear in an order shuffled per labeler; rank them by dragging them into order, or with the
keyboard alone (arrows move, 1-9 gives the focused response that rank — the same number twice is a tie —,
Enter submits); skip an item, or flag it as unusable or unsafe with a reason.

Every submission is in `<output_dir>.partial/journal.jsonl` (fsync'd) before the page moves on: closing
the browser, killing the server or a power cut loses at most the item being ranked, and running the same
command again resumes where each labeler left off. Several people can rank at once; `--overlap` gives
that fraction of the items to `--labelers_per_overlap_item` people, to measure how well they agree.

When every item has the judgements it needs the server stops and publishes `<output_dir>/`: `dataset/`
in the comparisons format (`prompt, responses, ranks, ranker="human", source, source_id`, plus `labeler`
and `num_labelers`; an input `test` split stays `test`), one row per item — several people's rankings of
an item combined by Borda score (`align.preferences.labeling`), an item anyone flagged left out and listed
in `flagged.jsonl` — with `journal.jsonl` and `manifest.json` (counts, skips and flags, seconds per
ranking, and inter-annotator agreement: mean pairwise Kendall tau-b and pairwise-preference agreement on
the overlapping items). `--finish true` publishes what is ranked so far without serving.

Served beyond loopback (`--host 0.0.0.0`), the page needs an access token, printed once in the address.

    align comparisons --source sample --ranker human --input_path prompts.jsonl --adapter runs/sft \\
        --output_dir runs/to_rank
    align label --input runs/to_rank --output_dir runs/labels            # open the printed address
    align label --input runs/to_rank --output_dir runs/labels --host 0.0.0.0 --overlap 0.2   # a team
    align label --input runs/to_rank --output_dir runs/labels --finish true                  # stop here
    align reward --dataset_name runs/labels --output_dir runs/reward_human
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from datasets import Value

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.inputs import load_stage_dataset, validate_columns
from align.core.journal import JournalWriter
from align.core.options import POSITIVE, Range
from align.core.outputs import OutputArguments, StageOutput, base_manifest, fingerprint, save_dataset_atomic
from align.preferences import sources
from align.preferences.format import as_messages, comparisons_dataset
from align.preferences.label_server import LabelServer, is_loopback
from align.preferences.labeling import MAX_RESPONSES, Item, LabelingRound, summarize

STAGE = "label"
logger = logging.getLogger("align")


@dataclass
class LabelArguments(OutputArguments):
    input: str | None = field(
        default=None,
        metadata={"help": "What to rank: an `align comparisons` output (its dataset, or its sheet.jsonl), a ranking "
                  "sheet (.jsonl/.csv), or a JSONL file with `prompt` and `responses` (2-9), `id` optional."},
    )
    output_dir: str | None = field(default=None, metadata={"help": "Where the finished round is published."})
    input_split: str | None = field(
        default=None, metadata={"help": "Only this split of a dataset input (default: every split)."}
    )
    overlap: float = field(
        default=0.0, metadata={"help": "Fraction of the items (seeded, 0-1) given to several labelers, to "
                               "measure agreement."}
    )
    labelers_per_overlap_item: int = field(
        default=2, metadata={"help": "How many people judge each overlapping item (>= 2)."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for the item order, the overlap and the response orders."})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to listen on; anything but loopback (e.g. 0.0.0.0) requires the access token "
                  "printed with the address."},
    )
    port: int = field(default=8765, metadata={"help": "Port to listen on (0 = any free port)."})
    lease_minutes: float = field(
        default=30.0, metadata={"help": "An item opened by a labeler is not given to anyone else for this long."}
    )
    finish: bool = field(
        default=False, metadata={"help": "Publish the dataset from what is ranked so far, without serving the page."}
    )


CONFIG_CLASSES = (LabelArguments,)
OPTION_RULES = {"overlap": Range(0, 1), "labelers_per_overlap_item": Range(2), "port": Range(0, 65535),
                "lease_minutes": POSITIVE}
LOCK = "server.lock"  # held by the process serving the round (see `_hold`)
# How to serve and when to stop: not part of the round's identity (a re-run with another port resumes).
SERVING = ("host", "port", "lease_minutes", "finish", "overwrite_output_dir", "restart")


def option_problems(args: LabelArguments) -> list[str]:
    problems = []
    if not args.input:
        problems.append("--input is required")
    if not args.output_dir:
        problems.append("--output_dir is required")
    return problems


# ----------------------------------------------------------------------------- the items


def load_items(source: str, split: str | None) -> list[Item]:
    """The items to rank, checked: ids unique, 2-9 responses each, prompts ending with a user turn."""
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "dataset").is_dir() and (path / "sheet.jsonl").is_file():
        path = path / "sheet.jsonl"  # `align comparisons --source sample --ranker human`
    if path.is_file() and path.suffix in (".jsonl", ".csv"):
        items = _file_items(path)
    elif path.is_file():
        raise StageError(STAGE, f"{path}: items to rank come in a .jsonl or .csv file, or a stage output directory")
    else:
        items = _dataset_items(source, split)
    if not items:
        raise StageError(STAGE, f"{source} holds no items to rank — give it prompts with their responses")
    seen: dict[str, int] = {}
    for number, item in enumerate(items, start=1):
        if item.id in seen:
            raise StageError(STAGE, f"{source}: items {seen[item.id]} and {number} have the same id {item.id!r} — "
                             "make the ids unique")
        seen[item.id] = number
        if not 2 <= len(item.responses) <= MAX_RESPONSES:
            raise StageError(STAGE, f"{source}: item {item.id!r} has {len(item.responses)} responses — a ranking "
                             f"page shows 2 to {MAX_RESPONSES}; split or trim it")
        if not item.prompt or item.prompt[-1]["role"] != "user":
            raise StageError(STAGE, f"{source}: item {item.id!r}: the prompt must end with a user turn")
    return items


def _file_items(path: Path) -> list[Item]:
    items = []
    for record in sources.read_sheet(path, STAGE):
        data = record.data
        try:
            if "responses" in data and "response_1" not in data:  # prompt + responses rows
                responses = data["responses"]
                if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
                    raise sources.RecordError(f"line {record.line}: `responses` must be a list of strings")
                prompt = data.get("prompt", data.get("messages"))
                if not (isinstance(prompt, str) and prompt.strip()) and not _is_chat(prompt):
                    raise sources.RecordError(f"line {record.line}: `prompt` must be text or chat messages")
                item_id = str(data.get("id") or f"line-{record.line}")
                items.append(Item(item_id, as_messages(prompt), responses, "train", str(data.get("source") or "label")))
            else:
                item_id, prompt, responses = sources.sheet_row(record)
                items.append(Item(item_id, prompt, responses, "train", "sheet"))
        except sources.RecordError as exc:
            raise StageError(STAGE, f"{path}: {exc.message} — each line needs `prompt` and `responses` (or a "
                             "ranking sheet's id, prompt and response_1..K)") from None
    return items


def _is_chat(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _dataset_items(source: str, split: str | None) -> list[Item]:
    data = load_stage_dataset(source, STAGE)
    if split is not None and split not in data:
        raise StageError(STAGE, f"{source} has no split {split!r} (it has {', '.join(data)}) — pass --input_split "
                         "with one of those")
    splits = [split] if split else list(data)
    validate_columns(data, STAGE, {"prompt": "str|messages", "responses": "list[str]"}, splits=splits)
    rows = [(name, index, row) for name in splits for index, row in enumerate(data[name])]
    ids = [str(row.get("source_id") or "") for _, _, row in rows]
    if not all(ids) or len(set(ids)) < len(ids):  # no usable ids of its own: name rows by position
        ids = [f"{name}:{index}" for name, index, _ in rows]
    return [Item(item_id, as_messages(row["prompt"]), list(row["responses"]), name, str(row.get("source") or "label"))
            for item_id, (name, _, row) in zip(ids, rows, strict=True)]


# ----------------------------------------------------------------------------- the stage


def publish(output: StageOutput, labeling: LabelingRound, args: LabelArguments, config: dict,
            started: str) -> Path:
    """Write the dataset of what is ranked, the flagged items and the manifest, and publish the round."""
    splits, metrics = summarize(labeling)
    if not splits:
        raise StageError(STAGE, f"no item has a usable ranking yet ({metrics['rankings']} rankings, "
                         f"{metrics['skips']} skips, {metrics['flags']} flags) — rank some items first (run without "
                         "--finish)")
    partial = output.partial
    save_dataset_atomic(comparisons_dataset(splits, extra={"labeler": Value("string"), "num_labelers": Value("int64")}),
                        partial / "dataset")
    with JournalWriter(partial / "flagged.jsonl") as flagged:
        flagged.write({"item": r["item"], "labeler": r["labeler"], "reason": r["reason"], "note": r["note"],
                       "prompt": labeling.by_id[r["item"]].prompt, "responses": labeling.by_id[r["item"]].responses}
                      for r in labeling.submissions if r["action"] == "flag")
    manifest = base_manifest(STAGE, config, {"input": args.input}, None, started)
    manifest["outputs"] = {"dataset": "dataset", "journal": "journal.jsonl", "flagged": "flagged.jsonl"}
    manifest["metrics"] = metrics
    manifest["finished"] = now_iso()
    final = output.publish(manifest, keep=["dataset", "journal.jsonl"])
    agreement = metrics["agreement"]
    logger.info("%s -> %s (%s; %d skips, %d flags; agreement on %d overlapping items: Kendall tau-b %s, pairwise %s)",
                args.input, final / "dataset", ", ".join(f"{s}: {n} rows" for s, n in metrics["rows"].items()),
                metrics["skips"], metrics["flags"], agreement["items"], agreement["kendall_tau_b"],
                agreement["pairwise_agreement"])
    return final


def main(argv: list[str] | None = None) -> Path | int:
    (args,) = parse_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()
    items = load_items(args.input, args.input_split)
    config = {"data": {**{k: v for k, v in asdict(args).items() if k not in SERVING},
                       "input_fingerprint": fingerprint(args.input)}}
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()
    _refuse_if_served(output.partial)
    if args.finish and not (output.partial / "journal.jsonl").is_file():
        raise StageError(STAGE, f"nothing has been ranked in {output.partial} — serve the page first (run without "
                         "--finish)")
    server = None
    if not args.finish:
        try:  # bind before writing anything: a busy port is the user's to fix
            server = LabelServer(args.host, args.port, require_token=not is_loopback(args.host))
        except OSError as exc:
            raise StageError(STAGE, f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}) — check "
                             "--host, or pass another --port (0 = any free one)") from None
    partial = output.open()
    lock = _hold(partial, server.address if server else "--finish")  # noqa: F841 - held until the process ends
    labeling = LabelingRound(items, partial / "journal.jsonl", args.overlap, args.labelers_per_overlap_item,
                             args.seed, args.lease_minutes * 60)
    if labeling.dropped:
        logger.warning("dropped %d unreadable journal line(s) (a torn last line after a kill)", labeling.dropped)
    if server is not None and labeling.complete():
        server.close()
    elif server is not None:
        logger.info("%d items to rank, %d of them by %d people; %d complete, %d submissions so far%s", len(items),
                    sum(n > 1 for n in labeling.needed.values()), args.labelers_per_overlap_item,
                    labeling.complete_items(), len(labeling.submissions), " (resumed)" if output.resumed else "")
        print(f"align label: open {server.address} to rank (Ctrl-C stops; the same command resumes)", flush=True)
        server.serve(labeling)  # returns when the round is complete, or on Ctrl-C
        if not labeling.complete():
            if not output.resumable():  # nothing was submitted: nothing to resume
                shutil.rmtree(output.partial, ignore_errors=True)
            print(f"align label: stopped with {labeling.complete_items()} of {len(items)} items complete — run the "
                  "same command to go on, or add --finish true to publish what is ranked", flush=True)
            return 130
    (partial / LOCK).unlink(missing_ok=True)  # the lock stays held; the published output has no lock file
    return publish(output, labeling, args, config, started)


def _refuse_if_served(partial: Path) -> None:
    """A round is served by one process at a time: two would each hand out items the other does not know of."""
    if (partial / LOCK).is_file():
        _hold(partial, "").close()


def _hold(partial: Path, address: str) -> IO:
    """Lock the round for this process (released when it ends, however it ends)."""
    import fcntl

    handle = open(partial / LOCK, "a+")  # noqa: SIM115 - held open for the process's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StageError(STAGE, f"this round is being served by {holder} — open that address, or stop that "
                         "server first") from None
    if address:
        handle.seek(0)
        handle.truncate()
        handle.write(f"`align label` (pid {os.getpid()}) at {address}\n")
        handle.flush()
    return handle


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
