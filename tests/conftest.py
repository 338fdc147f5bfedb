"""Shared fixtures: the tiny offline model, the team's seed data, the public data in ../shared/data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DEMONSTRATIONS = ROOT / "data" / "seed" / "demonstrations.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cpu_has_bf16() -> bool:
    from align.lm.precision import cpu_bf16_flag

    return cpu_bf16_flag() is not None


# Tests of the bf16 path run where the CPU computes bf16 natively (CI's machines do).
NEEDS_BF16 = pytest.mark.skipif(not _cpu_has_bf16(), reason="this CPU has no native bf16")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    """A 2-layer Llama with a byte-level tokenizer, built offline (cached after the first build)."""
    from align.lm.models import TINY_MODEL, resolve_model

    return resolve_model(TINY_MODEL)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public data not found at {SHARED_DATA} (present in CI, absent in a fresh clone)")
    return SHARED_DATA


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def run_align(*args: str, cwd: Path | None = None, timeout: float = 300,
              command: str = "align.cli") -> subprocess.CompletedProcess:
    """Run the `align` command (or another `command` module, e.g. rag.cli) in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", command, *map(str, args)],
        cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def kill_after_journal_line(args: list[str], journal: Path, log: Path, env: dict, timeout: float = 180,
                            lines: int = 1, command: str = "align.cli") -> None:
    """Run `align *args` (or another `command` module) and SIGKILL it as soon as `journal` exists with `lines`
    complete lines, as a crash would."""
    with open(log, "w") as stderr:  # a file, not a pipe: the progress bar would fill a pipe and block
        process = subprocess.Popen([sys.executable, "-m", command, *args], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.time() + timeout
        while not (journal.exists() and journal.read_text().count("\n") >= lines):
            assert process.poll() is None, f"run ended before {journal.name} appeared:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no {journal.name} within {timeout} s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.fixture
def one_thread():
    """One intra-op thread for the tiny model: its ops are too small to split, and on a busy machine two
    spinning OpenMP threads make it many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
