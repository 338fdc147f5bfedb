"""align.core.journal: what a kill can leave in a journal is dropped on replay, everything complete is kept."""

from __future__ import annotations

import json

from align.core.journal import JournalWriter, replay


def write_lines(path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def test_writer_appends_records_that_a_replay_reads_back(tmp_path):
    path = tmp_path / "logs" / "journal.jsonl"  # the folder is made on first use
    with JournalWriter(path) as journal:
        journal.write([{"position": 0, "text": "é"}])
        assert json.loads(path.read_text(encoding="utf-8")) == {"position": 0, "text": "é"}  # on disk already
        journal.write({"position": i} for i in (1, 2))
    with JournalWriter(path) as journal:  # a second run appends
        journal.write([{"position": 3}])
    seen = []
    assert replay(path, lambda record: seen.append(record["position"]) is None) == 4
    assert seen == [0, 1, 2, 3]


def test_a_torn_line_is_dropped_and_the_rest_kept(tmp_path):
    path = tmp_path / "journal.jsonl"
    write_lines(path, ['{"position": 0}', '{"position": 1', '{"position": 2}', '[1, 2]', '{"other": 1}'])
    seen = []

    def accept(record):
        seen.append(record["position"])  # KeyError for the record without a position: dropped
        return True

    assert replay(path, accept) == 2
    assert seen == [0, 2]
    assert path.read_text(encoding="utf-8") == '{"position": 0}\n{"position": 2}\n'  # rewritten with the kept lines
    assert not list(tmp_path.glob("*.tmp"))


def test_records_the_stage_refuses_are_dropped(tmp_path):
    path = tmp_path / "journal.jsonl"
    write_lines(path, ['{"position": 0}', '{"position": 0}', '{"position": 9}'])
    done = set()

    def accept(record):
        if record["position"] in done or record["position"] >= 5:  # a duplicate, or out of range
            return False
        done.add(record["position"])
        return True

    assert replay(path, accept) == 1
    assert path.read_text(encoding="utf-8") == '{"position": 0}\n'


def test_stop_at_first_bad_drops_everything_after_it(tmp_path):
    """Self-Instruct steps build on each other: after a torn step nothing later can be trusted."""
    path = tmp_path / "journal.jsonl"
    write_lines(path, ['{"step": 0}', '{"step": 1', '{"step": 2}'])
    assert replay(path, lambda record: True, stop_at_first_bad=True) == 1
    assert path.read_text(encoding="utf-8") == '{"step": 0}\n'


def test_a_missing_journal_replays_nothing(tmp_path):
    assert replay(tmp_path / "absent.jsonl", lambda record: True) == 0
    assert not (tmp_path / "absent.jsonl").exists()
