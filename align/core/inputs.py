"""Reading a stage's input: saved datasets, data files and hub names, and checking their columns.

Every stage reads through `load_stage_dataset` and checks what it needs with `validate_columns` before
anything is written; both raise `StageError` naming the file, split, row and column."""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from align.core.command import StageError

# Which stage (or outside source) produces each canonical column, for error messages.
PRODUCED_BY = {
    "messages": "self-instruct (align self-instruct), or any TRL conversational dataset",
    "prompt": "self-instruct (align self-instruct), or any TRL prompt dataset",
    "completion": "a TRL prompt/completion dataset",
    "responses": "comparisons (align comparisons)",
    "ranks": "comparisons (align comparisons)",
    "chosen": "comparisons (align comparisons) or a TRL preference dataset",
    "rejected": "comparisons (align comparisons) or a TRL preference dataset",
}


# "name" or "org/name": anything else that does not exist on disk is a missing local path.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


DATA_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


def parse_json_lines(text: str, path: Path, stage: str) -> list[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of JSON Lines text; a malformed line or a
    line that is not a JSON object is a StageError naming the file and the line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(stage, f"{path} line {number}: malformed JSON ({exc.msg}) — fix or remove that line"
                             ) from None
        if not isinstance(record, dict):
            raise StageError(stage, f"{path} line {number}: expected a JSON object, got {type(record).__name__} "
                             "— one object per line")
        records.append((number, record))
    return records


def read_text(path: Path, stage: str) -> str:
    """The text of a (possibly gzipped) UTF-8 file; unreadable files are a StageError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:  # a byte-order mark (editors, exports) is dropped
            return handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise StageError(stage, f"cannot read {path}: {exc} — check that it is a UTF-8 JSON/JSONL file") from None


def _read_json_records(path: Path, stage: str) -> list[dict]:
    """Read a JSON Lines file (or a JSON array), optionally gzipped, reporting the bad line."""
    stripped = read_text(path, stage).lstrip()
    if not stripped.startswith("["):
        return [record for _, record in parse_json_lines(stripped, path, stage)]
    try:  # a whole-file JSON array
        records = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise StageError(stage, f"{path}: not valid JSON ({exc}) — fix the file") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise StageError(stage, f"{path} record {number}: expected a JSON object, got {type(record).__name__}")
    return records


def load_stage_dataset(source: str | os.PathLike, stage: str, split: str = "train") -> DatasetDict:
    """Load a stage's input as a DatasetDict.

    Args:
        source: a stage output directory (its ``dataset/`` is used), a directory written by
            ``save_to_disk``, a JSON/JSONL(.gz)/Parquet/CSV file, or a hub dataset name.
        stage: the stage asking, for error messages.
        split: the split name given to the rows of a single file.

    Raises:
        StageError: when the source is missing, unreadable or malformed.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset").is_dir():  # a stage output directory
            path = path / "dataset"
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = _load_saved(path, stage)
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({split: loaded})
        files = sorted(p for p in path.iterdir() if p.name.endswith(DATA_FILE_SUFFIXES))
        if not files:
            raise StageError(
                stage,
                f"{path} holds no saved dataset and no data files ({', '.join(DATA_FILE_SUFFIXES)}) — "
                "point --dataset_name at a stage output directory or a data file",
            )
        return DatasetDict({p.name.split(".")[0]: _load_file(p, stage) for p in files})
    if path.is_file():
        return DatasetDict({split: _load_file(path, stage)})
    name = str(source)
    if not HUB_NAME.fullmatch(name) or name.endswith(DATA_FILE_SUFFIXES):
        raise StageError(stage, f"dataset not found: {source} — check the path (did the previous stage finish?)")
    try:  # a hub dataset name such as "trl-lib/Capybara"
        loaded = load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure is a user-facing error here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(
            stage, f"dataset not found locally and could not be loaded from the hub: {name} ({first_line}) — "
            "pass a local path"
        ) from None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({split: loaded})


def _load_saved(path: Path, stage: str) -> Dataset | DatasetDict:
    """`load_from_disk`, with its failures as one line: `datasets` cannot load a split saved with no rows."""
    try:
        return load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to read a saved dataset is the user's to fix
        empty = []
        for state in sorted(path.rglob("state.json")):
            try:
                if not json.loads(state.read_text()).get("_data_files"):
                    empty.append(state.parent.name if state.parent != path else "the dataset")
            except (OSError, ValueError):
                continue
        if empty:
            raise StageError(stage, f"{path}: split {', '.join(map(repr, empty))} holds no rows — give the stage a "
                             "dataset with rows") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(stage, f"cannot read the saved dataset at {path} ({first}) — save it again with "
                         "save_to_disk") from None


def _load_file(path: Path, stage: str) -> Dataset:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        records = _read_json_records(path, stage)
        if not records:
            return Dataset.from_dict({})
        try:
            return Dataset.from_list(records)
        except Exception as exc:  # noqa: BLE001 - arrow type conflicts between rows
            raise StageError(stage, f"{path}: rows do not share one schema ({exc}) — make every row's fields "
                             "the same types") from None
    kind = "parquet" if name.endswith(".parquet") else "csv"
    try:
        return load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001
        raise StageError(stage, f"cannot read {path} as {kind}: {exc}") from None


def _is_messages(value: Any) -> str | None:
    """Return None when `value` is a valid chat (list of {role, content} with str content)."""
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of {role, content} messages"
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return "every message needs a string 'role'"
        if not isinstance(turn.get("content"), str):
            return "every message needs a string 'content'"
    return None


def _type_check(kind: str) -> Callable[[Any], str | None]:
    checks: dict[str, Callable[[Any], str | None]] = {
        "str": lambda v: None if isinstance(v, str) else f"expected a string, got {type(v).__name__}",
        "text": lambda v: None if isinstance(v, str) and v.strip() else "expected a non-empty string",
        "bool": lambda v: None if isinstance(v, bool) else f"expected true/false, got {type(v).__name__}",
        "int": lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "expected an integer",
        "messages": _is_messages,
        "str|messages": lambda v: None if isinstance(v, str) else _is_messages(v),
        "list[str]": lambda v: None
        if isinstance(v, list) and all(isinstance(x, str) for x in v)
        else "expected a list of strings",
        "list[int]": lambda v: None
        if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        else "expected a list of integers",
    }
    if kind not in checks:
        raise ValueError(f"unknown column kind {kind!r}")
    return checks[kind]


def validate_columns(
    data: DatasetDict,
    stage: str,
    columns: dict[str, str],
    splits: Iterable[str] | None = None,
    max_problems: int = 5,
) -> None:
    """Check that every split has the columns with values of the right kind, and is not empty.

    Reports every problem found (up to `max_problems` per column) in one error.

    Args:
        data: the loaded dataset.
        stage: the stage asking, for the message.
        columns: column name -> kind ("str", "text", "bool", "int", "messages", "str|messages",
            "list[str]", "list[int]").
        splits: which splits to check (default: all).

    Raises:
        StageError: naming each missing column (and which stage produces it), each bad row, each empty split.
    """
    problems: list[str] = []
    for split in splits if splits is not None else list(data):
        if split not in data:
            problems.append(f"split '{split}' is missing (found: {', '.join(data) or 'none'})")
            continue
        rows = data[split]
        missing = [c for c in columns if c not in rows.column_names]
        for column in missing:
            source = PRODUCED_BY.get(column, "the previous stage")
            problems.append(f"split '{split}' has no '{column}' column (produced by {source})")
        if missing:
            continue
        if len(rows) == 0:
            problems.append(f"split '{split}' is empty")
            continue
        for column, kind in columns.items():
            check = _type_check(kind)
            bad = 0
            for index, value in enumerate(rows[column]):
                reason = check(value)
                if reason:
                    if bad < max_problems:
                        problems.append(f"split '{split}' row {index} column '{column}': {reason}")
                    bad += 1
            if bad > max_problems:
                problems.append(f"... and {bad - max_problems} more bad rows in '{column}'")
    if problems:
        raise StageError(stage, "invalid input: " + "; ".join(problems))
