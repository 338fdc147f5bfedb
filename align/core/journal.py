"""Journals: append-only JSON Lines files of finished work, so a killed stage loses nothing and repeats nothing.

A generation stage appends each finished item (a sampled prompt, a Self-Instruct step, an answer) with
`JournalWriter.write`, which is on disk (fsync) before the next item starts. On a re-run `replay` feeds
the complete records back, in order, and drops what a kill can leave: a torn last line, or a record
the stage no longer accepts. It then rewrites the journal with only the kept lines, atomically (a kill
while rewriting leaves the old journal, never a half-written one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

# What a malformed or foreign record raises inside an `accept` callback; such a record is dropped.
BAD_RECORD = (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError, AttributeError)


def replay(path: Path, accept: Callable[[dict], bool], stop_at_first_bad: bool = False) -> int:
    """Feed each record of the journal at `path` to `accept(record)`, in order, and keep those it takes.

    `accept` returns True to keep a record and False to drop it (e.g. a duplicate); a line that is not a
    JSON object, or for which `accept` raises one of `BAD_RECORD`, is dropped too. With
    `stop_at_first_bad`, the first dropped line ends the replay and every later line is dropped as well —
    for journals whose records build on each other (Self-Instruct steps). Returns how many records were
    kept; a missing journal keeps none.
    """
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            taken = isinstance(record, dict) and accept(record)
        except BAD_RECORD:
            taken = False
        if taken:
            kept.append(line)
        elif stop_at_first_bad:
            break
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(kept)


class JournalWriter:
    """Appends records to a journal; each `write` is flushed and fsync'd before it returns.

        with JournalWriter(partial / "journal.jsonl") as journal:
            for batch in work:
                journal.write(finished_records(batch))
    """

    def __init__(self, path: Path):
        self.path = path
        self._handle = None

    def __enter__(self) -> JournalWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in __exit__
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.close()
        self._handle = None

    def write(self, records: Iterable[dict]) -> None:
        for record in records:
            self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
