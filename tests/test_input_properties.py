"""Property-based tests of the readers and record validators: arbitrary bytes and arbitrary JSON end in a result
or in the one error type the stage turns into a one-line message (`StageError`, `RecordError`) — never in any
other exception, which would be a traceback for the user."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from align.core.command import StageError
from align.core.inputs import _type_check, load_stage_dataset, parse_json_lines
from align.instruct.tasks import load_seed_tasks
from align.preferences import sources
from align.preferences.format import check_ranking
from rag.data import load_kv_records, load_records

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# Objects with the keys the readers look for, holding anything: they get past the first checks more often.
KEYS = ["question", "answers", "ctxs", "text", "title", "isgold", "chosen", "rejected", "prompt", "responses",
        "ranks", "messages", "role", "content", "instruction", "instances", "input", "output", "is_classification",
        "message_id", "replies", "rank", "synthetic", "deleted", "id", "num_responses", "response_1", "response_2",
        "prompt_messages", "ordered_kv_records", "key", "value"]
RECORD = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from(KEYS), children, max_size=6),
    max_leaves=16,
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def file_with(data: bytes, suffix: str) -> Path:
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    handle.write(data)
    handle.close()
    return Path(handle.name)


def lines_of(records: list) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def read_or_stage_error(data: bytes, suffix: str, *readers) -> None:
    """Each reader, given a file holding `data`, returns or raises StageError (anything else fails the test)."""
    path = file_with(data, suffix)
    try:
        for read in readers:
            try:
                read(path)
            except StageError:
                pass
    finally:
        path.unlink()


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from([".jsonl", ".json", ".jsonl.gz", ".csv"]))
def test_any_bytes_load_or_raise_a_stage_error(data, suffix):
    read_or_stage_error(data, suffix, lambda path: load_stage_dataset(path, "test"))


@SETTINGS
@given(st.lists(JSON, max_size=5))
def test_any_json_lines_load_or_raise_a_stage_error(records):
    read_or_stage_error(lines_of(records), ".jsonl", lambda path: load_stage_dataset(path, "test"))


@SETTINGS
@given(st.text(max_size=200))
def test_json_lines_parse_or_raise_a_stage_error(text):
    try:
        records = parse_json_lines(text, Path("x.jsonl"), "test")
    except StageError:
        return
    assert all(isinstance(record, dict) for _, record in records)


@SETTINGS
@given(st.lists(RECORD, max_size=4))
def test_any_rag_records_validate_or_raise_a_stage_error(records):
    read_or_stage_error(lines_of(records), ".jsonl", lambda path: load_records(path, "test"),
                        lambda path: load_kv_records(path, "test"))


@SETTINGS
@given(st.lists(RECORD, max_size=4))
def test_any_seed_tasks_load_or_raise_a_stage_error(records):
    read_or_stage_error(lines_of(records), ".jsonl", lambda path: load_seed_tasks(path, "test"))


@SETTINGS
@given(RECORD)
def test_any_source_record_converts_or_raises_a_record_error(data):
    record = sources.SourceRecord(0, 1, data if isinstance(data, dict) else {"value": data})
    for convert in (sources.oasst_comparisons, sources.hh_comparison, sources.sheet_comparison):
        try:
            rows = convert(record, Counter())
        except sources.RecordError:
            continue
        for row in rows:
            assert check_ranking(row["responses"], row["ranks"]) is None


@SETTINGS
@given(st.text(max_size=300))
def test_any_sheet_text_reads_or_raises_a_stage_error(text):
    def read_and_convert(path):
        for record in sources.read_sheet(path, "test"):
            try:
                sources.sheet_comparison(record, Counter())
            except sources.RecordError:
                pass

    read_or_stage_error(text.encode("utf-8", "surrogatepass"), ".csv", read_and_convert)


@SETTINGS
@given(JSON, JSON)
def test_column_kinds_and_rankings_judge_any_value(value, ranks):
    for kind in ("str", "text", "bool", "int", "messages", "str|messages", "list[str]", "list[int]"):
        assert _type_check(kind)(value) is None or isinstance(_type_check(kind)(value), str)
    assert check_ranking(value, ranks) is None or isinstance(check_ranking(value, ranks), str)
