"""Readers and writers of outside comparison data for `align comparisons`.

OASST message trees, Anthropic HH chosen/rejected pairs, and ranking sheets (JSONL or CSV) that people
fill in. Each converter turns one source record into canonical comparison rows (`comparison_row`) or
raises `RecordError` naming the record; the stage collects those into one error line.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from align.core.command import StageError
from align.core.inputs import parse_json_lines, read_text
from align.preferences.format import as_messages, check_ranking, comparison_row, dense_ranks

# How to fix a bad record, per source (the end of the one-line error).
FIXES = {
    "oasst": "the file must be an OASST message-tree export, one tree per line (see ../shared/data/README.md)",
    "hh-rlhf": "every row needs `chosen` and `rejected` transcripts ('\\n\\nHuman: ...\\n\\nAssistant: ...') that "
               "are identical up to the last '\\n\\nAssistant:'; fix or remove the row",
    "sheet": "fill `ranks` with one number per response, in response order (0 = best, ties share a number, no "
             "gaps, not all equal), then import the sheet again",
}
OASST_ROLES = {"prompter": "user", "assistant": "assistant"}
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ASSISTANT = "\n\nAssistant:"


class RecordError(Exception):
    """One bad source record; `message` names it (line, row, tree or sheet id), `reason` is a short key for
    counting the records a lenient import skips."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.message = message
        self.reason = reason


class SourceRecord(NamedTuple):
    index: int  # 0-based position among the file's records
    line: int  # 1-based line (JSONL) or row (CSV, header excluded)
    data: dict


def read_jsonl(path: Path, stage: str) -> list[SourceRecord]:
    """The JSON objects of a JSONL(.gz) file; a malformed line is a StageError naming it."""
    if not path.is_file():
        raise StageError(stage, f"input not found: {path} — pass --input_path <file.jsonl>")
    pairs = parse_json_lines(read_text(path, stage), path, stage)
    return [SourceRecord(index, line, data) for index, (line, data) in enumerate(pairs)]


# ----------------------------------------------------------------------------- OASST


def oasst_comparisons(record: SourceRecord, counts: Counter) -> list[dict]:
    """Every ranked group of >= 2 sibling assistant replies in one OASST tree -> one comparison row each.

    Synthetic and deleted messages are dropped and not descended into; ranks are re-densified.
    """
    root = record.data.get("prompt")
    where = f"line {record.line} (tree {record.data.get('message_tree_id', '?')})"
    if not isinstance(root, dict):
        raise RecordError(f"{where}: no 'prompt' message object")
    counts["trees"] += 1
    _check_message(root, where)
    if root.get("synthetic") or root.get("deleted"):
        counts["trees_skipped_synthetic_or_deleted_root"] += 1
        return []
    rows: list[dict] = []
    _walk(root, [], where, rows, counts)
    return rows


def _check_message(message: Any, where: str) -> None:
    if not isinstance(message, dict) or message.get("role") not in OASST_ROLES:
        raise RecordError(f"{where}: a message without role 'prompter' or 'assistant'")
    for key in ("message_id", "text"):
        if not isinstance(message.get(key), str):
            raise RecordError(f"{where}: message {message.get('message_id', '?')} has no string '{key}'")
    rank = message.get("rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool)):
        raise RecordError(f"{where}: message {message['message_id']} has a non-integer rank {rank!r}")
    if not isinstance(message.get("replies", []), list):
        raise RecordError(f"{where}: message {message['message_id']} has 'replies' that is not a list")


def _walk(message: dict, path: list[dict], where: str, rows: list[dict], counts: Counter) -> None:
    path = [*path, {"role": OASST_ROLES[message["role"]], "content": message["text"]}]
    kept = []
    for reply in message.get("replies", []):
        _check_message(reply, where)
        if reply.get("synthetic") or reply.get("deleted"):
            counts["dropped_replies"] += 1
        else:
            kept.append(reply)
    ranked = [r for r in kept if r["role"] == "assistant" and r.get("rank") is not None]
    if message["role"] == "prompter" and len(ranked) >= 2:
        responses, ranks = [r["text"] for r in ranked], dense_ranks([r["rank"] for r in ranked])
        if check_ranking(responses, ranks) is None:
            rows.append(comparison_row(path, responses, ranks, "human", "oasst", message["message_id"]))
        else:  # e.g. every remaining reply shares one rank
            counts["groups_skipped_no_preference"] += 1
    for reply in kept:
        _walk(reply, path, where, rows, counts)


# ----------------------------------------------------------------------------- Anthropic HH


def hh_messages(transcript: str) -> list[dict]:
    """Chat messages of a "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript (contents stripped)."""
    if transcript.startswith(("Human:", "Assistant:")):
        transcript = "\n\n" + transcript
    parts = HH_TURN.split(transcript)  # [text before the first turn, role, text, role, text, ...]
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    turns = zip(parts[1::2], parts[2::2], strict=True)
    return [{"role": HH_ROLES[role], "content": text.strip()} for role, text in turns]


def hh_comparison(record: SourceRecord, counts: Counter) -> list[dict]:
    """One chosen/rejected pair -> one row: prompt = the shared turns, responses = [chosen, rejected]."""
    where = f"row {record.index} (line {record.line})"
    chosen, rejected = record.data.get("chosen"), record.data.get("rejected")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise RecordError(f"{where}: needs string fields 'chosen' and 'rejected'", "not_text")
    cut_chosen, cut_rejected = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    prefix = chosen[:cut_chosen]
    if cut_chosen < 0 or cut_rejected < 0 or prefix != rejected[:cut_rejected]:
        raise RecordError(f"{where}: 'chosen' and 'rejected' do not share the conversation up to the last "
                          "'\\n\\nAssistant:'", "prompts_differ")
    try:
        prompt = hh_messages(prefix)
    except ValueError as exc:
        raise RecordError(f"{where}: {exc}") from None
    if not prompt or prompt[-1]["role"] != "user":
        raise RecordError(f"{where}: the conversation before the last 'Assistant:' must end with a 'Human:' turn",
                          "no_user_turn")
    responses = [chosen[cut_chosen + len(HH_ASSISTANT):].strip(), rejected[cut_rejected + len(HH_ASSISTANT):].strip()]
    if responses[0] == responses[1]:
        counts["skipped_identical"] += 1
        return []
    return [comparison_row(prompt, responses, [0, 1], "human", "hh-rlhf", str(record.index))]


# ----------------------------------------------------------------------------- ranking sheets


def prompt_text(messages: list[dict]) -> str:
    """A chat as text for people: a lone user turn as is, otherwise one 'Role: content' paragraph per turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{turn['role'].capitalize()}: {turn['content']}" for turn in messages)


def write_sheet(rows: list[dict], path: Path, seed: int) -> None:
    """Write a ranking sheet (JSONL or CSV by suffix), atomically; `rows` have id, prompt (messages), responses.

    Responses are shuffled (seeded) so that their position says nothing about a previous ranking.
    """
    rng = random.Random(seed)
    width = max((len(row["responses"]) for row in rows), default=0)
    records = []
    for row in rows:
        responses = rng.sample(list(row["responses"]), len(row["responses"]))
        records.append({
            "id": row["id"], "prompt": prompt_text(row["prompt"]),
            **{f"response_{i}": text for i, text in enumerate(responses, start=1)},
            "ranks": "", "num_responses": len(responses), "prompt_messages": row["prompt"],
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".csv":
        columns = ["id", "prompt", *(f"response_{i}" for i in range(1, width + 1)), "ranks", "num_responses",
                   "prompt_messages"]
        with open(tmp, "w", encoding="utf-8-sig", newline="") as handle:  # the BOM lets spreadsheets see UTF-8
            writer = csv.DictWriter(handle, fieldnames=columns, restval="")
            writer.writeheader()
            for record in records:
                writer.writerow({**record, "prompt_messages": json.dumps(record["prompt_messages"])})
    else:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    os.replace(tmp, path)


def read_sheet(path: Path, stage: str) -> list[SourceRecord]:
    """The rows of a filled sheet (.jsonl or .csv); duplicate ids are a StageError."""
    if path.suffix == ".csv":
        if not path.is_file():
            raise StageError(stage, f"sheet not found: {path} — pass --input_path <filled sheet .jsonl or .csv>")
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                records = [SourceRecord(i, i + 1, row) for i, row in enumerate(csv.DictReader(handle))]
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise StageError(stage, f"cannot read {path} as CSV: {exc} — save the sheet as UTF-8 CSV") from None
    elif path.suffix == ".jsonl":
        records = [SourceRecord(r.index, r.index + 1, r.data) for r in read_jsonl(path, stage)]
    else:
        raise StageError(stage, f"{path}: a ranking sheet is a .jsonl or .csv file — pass the filled sheet")
    seen: dict[str, int] = {}
    for record in records:
        sheet_id = str(record.data.get("id") or "")
        if sheet_id and sheet_id in seen:
            raise StageError(stage, f"{path}: rows {seen[sheet_id]} and {record.line} have the same id "
                             f"{sheet_id!r} — each prompt appears once; remove the duplicate")
        seen[sheet_id] = record.line
    return records


def parse_ranks(value: Any) -> list[int] | None:
    """'1 0 2', '1,0,2', '[1, 0, 2]' or a JSON list -> [1, 0, 2]; None when it is not a list of whole numbers."""
    if isinstance(value, list):
        return value if all(isinstance(v, int) and not isinstance(v, bool) for v in value) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    tokens = [t for t in re.split(r"[\s,;]+", value.strip().strip("[]()")) if t]
    return [int(t) for t in tokens] if tokens and all(re.fullmatch(r"-?\d+", t) for t in tokens) else None


def sheet_row(record: SourceRecord) -> tuple[str, list[dict], list[str]]:
    """One sheet row's id, prompt (chat messages) and responses (in sheet order), ranked or not."""
    data = record.data
    sheet_id = str(data.get("id") or "").strip()
    where = f"row {record.line} (id {sheet_id or '?'})"
    if not sheet_id:
        raise RecordError(f"row {record.line}: empty 'id' — keep the id the sheet was written with")
    try:
        count = int(data.get("num_responses") or 0)
    except (TypeError, ValueError):
        raise RecordError(f"{where}: num_responses {data.get('num_responses')!r} is not a number") from None
    if count == 0:  # a hand-made sheet: count the response columns
        while data.get(f"response_{count + 1}") not in (None, ""):
            count += 1
    missing = [f"response_{i}" for i in range(1, count + 1) if f"response_{i}" not in data]
    if missing:
        raise RecordError(f"{where}: no column {', '.join(missing)}")
    responses = [str(data[f"response_{i}"] or "") for i in range(1, count + 1)]
    return sheet_id, _sheet_prompt(data, where), responses


def sheet_comparison(record: SourceRecord, counts: Counter) -> list[dict]:
    """One filled sheet row -> one comparison row ranked by "human"."""
    sheet_id, prompt, responses = sheet_row(record)
    where = f"row {record.line} (id {sheet_id})"
    raw = record.data.get("ranks")
    if raw in (None, "", []):
        raise RecordError(f"{where}: not ranked yet")
    ranks = parse_ranks(raw)
    if ranks is None:
        raise RecordError(f"{where}: ranks {raw!r} are not whole numbers like '1 0 2'")
    problem = check_ranking(responses, ranks)
    if problem:
        raise RecordError(f"{where}: {problem}")
    counts["sheet_rows"] += 1
    return [comparison_row(prompt, responses, ranks, "human", "sheet", sheet_id)]


def _sheet_prompt(data: dict, where: str) -> list[dict]:
    messages = data.get("prompt_messages")
    if isinstance(messages, str) and messages.strip():
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RecordError(f"{where}: prompt_messages is not valid JSON (leave that column as written)") from None
    if messages:
        valid = isinstance(messages, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not valid or messages[-1]["role"] != "user":
            raise RecordError(f"{where}: prompt_messages must be chat messages ending with a user turn")
        return as_messages(messages)
    if not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
        raise RecordError(f"{where}: no prompt")
    return as_messages(data["prompt"])
