"""The comparisons stage: the ranking format, the OASST / HH / sheet importers, sampling with the reference
ranker, and resuming a killed sampling run."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from datasets import load_from_disk

from align import comparisons
from align.core.command import StageError
from align.core.outputs import read_manifest
from align.lm.generation import Generation
from align.preferences import format, rankers, sources
from align.preferences.format import check_ranking
from align.preferences.prompts import prompt_records
from align.preferences.rankers import degenerate_reason, rank_by_scores
from tests.conftest import DEMONSTRATIONS, ROOT, kill_after_journal_line, write_jsonl

TINY = ["--model_name_or_path", "tiny-llama", "--seed", "0", "--max_new_tokens", "24"]
# One intra-op thread for the tiny model: its ops are too small to split, and on a busy machine two spinning
# OpenMP threads make generate() ~50x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def message(message_id: str, role: str, text: str, rank: int | None = None, replies: list | None = None,
            synthetic: bool = False, deleted: bool = False) -> dict:
    """An OASST message as in the export (rank absent on prompter messages)."""
    node = {"message_id": message_id, "text": text, "role": role, "lang": "en", "deleted": deleted,
            "synthetic": synthetic, "replies": replies or []}
    if rank is not None:
        node["rank"] = rank
    return node


def small_tree() -> dict:
    """Root prompt with 3 ranked replies (the rank-1 one synthetic); reply a0 has a follow-up with 2 ranked
    replies (one ranked 2 after a deleted rank-1 sibling); reply a2 has a deleted follow-up with ranked replies."""
    deleted_branch = message("p2", "prompter", "Deleted follow-up", deleted=True, replies=[
        message("d0", "assistant", "Under a deleted message", rank=0),
        message("d1", "assistant", "Also under it", rank=1),
    ])
    follow_up = message("p1", "prompter", "And in winter?", replies=[
        message("b0", "assistant", "Wear a coat.", rank=0),
        message("b1", "assistant", "Deleted reply.", rank=1, deleted=True),
        message("b2", "assistant", "Stay inside.", rank=2),
        message("b3", "assistant", "An unranked reply."),
    ])
    root = message("root", "prompter", "How do I stay warm?", replies=[
        message("a2", "assistant", "Move around.", rank=2, replies=[deleted_branch]),
        message("a1", "assistant", "A synthetic reply.", rank=1, synthetic=True),
        message("a0", "assistant", "Wear layers.", rank=0, replies=[follow_up]),
    ])
    return {"message_tree_id": "root", "tree_state": "ready_for_export", "prompt": root}


def stage_rows(output: Path, split: str = "train") -> list[dict]:
    return load_from_disk(str(output / "dataset"))[split].to_list()


# ----------------------------------------------------------------------------- the format


@pytest.mark.parametrize("responses, ranks, problem", [
    (["a", "b"], [0, 1], None),
    (["a", "b", "c"], [1, 0, 1], None),  # a tie below the best
    (["a", "b", "c"], [0, 0, 1], None),  # a tie at the top
    (["a"], [0], "at least 2 responses"),
    (["a", "b"], [0, 1, 2], "3 ranks for 2 responses"),
    (["a", "b"], [0, 1.0], "list of integers"),
    (["a", "b"], [0, True], "list of integers"),
    (["a", "b"], ["0", "1"], "list of integers"),
    (["a", "b"], [-1, 0], ">= 0"),
    (["a", "b", "c"], [0, 2, 3], "skip a value"),
    (["a", "b", "c"], [1, 2, 1], "skip a value"),
    (["a", "b"], [0, 0], "tied"),
    ("ab", [0, 1], "list of strings"),
])
def test_check_ranking(responses, ranks, problem):
    """Valid rankings (ties allowed) give None; each kind of invalid one is named."""
    result = check_ranking(responses, ranks)
    if problem is None:
        assert result is None
    else:
        assert result is not None and problem in result, result


def test_validate_comparisons_names_split_and_row():
    """validate_comparisons raises naming the split and row of each bad ranking, and passes good data."""
    good = format.comparison_row([user("q")], ["x", "y"], [1, 0], "human", "sheet", "1")
    assert good["responses"] == ["y", "x"] and good["ranks"] == [0, 1]  # stored best first
    format.validate_comparisons(format.comparisons_dataset({"train": [good]}), "reward")
    bad = {**good, "ranks": [0, 0]}
    data = format.comparisons_dataset({"train": [good, good], "test": [good, bad]})
    with pytest.raises(StageError) as raised:
        format.validate_comparisons(data, "reward")
    assert raised.value.stage == "reward"
    assert "split 'test' row 1: all 2 responses are tied" in raised.value.message
    assert "split 'train'" not in raised.value.message


# ----------------------------------------------------------------------------- OASST


def test_oasst_tree_gives_exactly_the_expected_rows(tmp_path):
    """Synthetic and deleted messages are dropped (and not descended into); ranks are re-densified."""
    source = write_jsonl(tmp_path / "trees.jsonl", [small_tree()])
    output = comparisons.main(["--source", "oasst", "--input_path", str(source), "--output_dir", str(tmp_path / "o")])
    expected_prompt = [user("How do I stay warm?"), assistant("Wear layers."), user("And in winter?")]
    assert stage_rows(output) == [
        {"prompt": [user("How do I stay warm?")], "responses": ["Wear layers.", "Move around."], "ranks": [0, 1],
         "ranker": "human", "source": "oasst", "source_id": "root"},
        {"prompt": expected_prompt, "responses": ["Wear a coat.", "Stay inside."],
         "ranks": [0, 1], "ranker": "human", "source": "oasst", "source_id": "p1"},
    ]
    metrics = read_manifest(output)["metrics"]
    assert metrics["rows"] == {"train": 2} and metrics["dropped_replies"] == 3


def test_oasst_malformed_line_is_named(tmp_path):
    """A malformed JSON line is a StageError naming the line; nothing is written."""
    source = tmp_path / "trees.jsonl"
    source.write_text(json.dumps(small_tree()) + "\n{not json\n")
    with pytest.raises(StageError, match="line 2: malformed JSON"):
        comparisons.main(["--source", "oasst", "--input_path", str(source), "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_real_oasst_file_imports(shared_data, tmp_path):
    """80 real trees -> ranked groups with K between 2 and 9; trees 1-64 go to train and 65-80 to test."""
    path = shared_data / "oasst" / "en_trees_80.jsonl"
    output = comparisons.main(["--source", "oasst", "--input_path", str(path), "--source_limit", "80",
                               "--test_records", "16", "--output_dir", str(tmp_path / "o")])
    data = load_from_disk(str(output / "dataset"))
    assert (len(data["train"]), len(data["test"])) == (128, 40)
    format.validate_comparisons(data, "test")
    sizes = [len(r) for split in data.values() for r in split["responses"]]
    assert min(sizes) == 2 and max(sizes) == 9

    def message_ids(node: dict) -> set[str]:
        return {node["message_id"]}.union(*(message_ids(r) for r in node["replies"]))

    trees = [json.loads(line) for line in path.read_text().splitlines()]
    train_ids = set().union(*(message_ids(t["prompt"]) for t in trees[:64]))
    test_ids = set().union(*(message_ids(t["prompt"]) for t in trees[64:80]))
    assert set(data["train"]["source_id"]) <= train_ids
    assert set(data["test"]["source_id"]) <= test_ids


# ----------------------------------------------------------------------------- Anthropic HH


HH_PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman:  What is 2+2? \n\nAssistant:"


def test_hh_row_gives_the_exact_row():
    """The shared prefix becomes chat messages (stripped); responses are [chosen, rejected], ranks [0, 1]."""
    record = sources.SourceRecord(7, 8, {"chosen": HH_PROMPT + " It is 4.", "rejected": HH_PROMPT + " Fish."})
    assert sources.hh_comparison(record, Counter()) == [{
        "prompt": [user("Hi there"), assistant("Hello! How can I help?"), user("What is 2+2?")],
        "responses": ["It is 4.", "Fish."], "ranks": [0, 1], "ranker": "human", "source": "hh-rlhf",
        "source_id": "7",
    }]


def test_hh_row_without_a_shared_prompt_is_named_under_strict(tmp_path):
    """A pair whose transcripts differ before the last Assistant turn: with --strict true a StageError naming the
    row and nothing written (without it the row is skipped and counted, see test_bad_inputs.py)."""
    rows = [{"chosen": HH_PROMPT + " 4", "rejected": HH_PROMPT + " 5"},
            {"chosen": HH_PROMPT + " 4", "rejected": "\n\nHuman: Something else\n\nAssistant: 5"}]
    source = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(StageError) as raised:
        comparisons.main(["--source", "hh-rlhf", "--input_path", str(source), "--output_dir", str(tmp_path / "o"),
                          "--strict", "true"])
    assert "row 1 (line 2)" in raised.value.message and "do not share" in raised.value.message
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_hh_identical_replies_are_skipped_and_counted(tmp_path):
    """A pair whose two replies are the same text gives no row and is counted as skipped_identical."""
    rows = [{"chosen": HH_PROMPT + " 4", "rejected": HH_PROMPT + " 5"},
            {"chosen": HH_PROMPT + " 4", "rejected": HH_PROMPT + "  4 "}]
    source = write_jsonl(tmp_path / "hh.jsonl", rows)
    output = comparisons.main(["--source", "hh-rlhf", "--input_path", str(source), "--output_dir", str(tmp_path / "o")])
    assert len(stage_rows(output)) == 1
    assert read_manifest(output)["metrics"]["skipped_identical"] == 1


def test_real_hh_file_imports(shared_data, tmp_path):
    """All 1,200 real pairs import as K = 2 rows; source_start/source_limit/test_records select them."""
    path = shared_data / "hh_rlhf" / "harmless-base-test-1200.jsonl.gz"
    output = comparisons.main(["--source", "hh-rlhf", "--input_path", str(path), "--test_records", "200",
                               "--output_dir", str(tmp_path / "all")])
    data = load_from_disk(str(output / "dataset"))
    assert (len(data["train"]), len(data["test"])) == (1000, 200)
    assert read_manifest(output)["metrics"]["skipped_identical"] == 0
    format.validate_comparisons(data, "test")
    first = json.loads(gzip.open(path, "rt").readline())
    row = data["train"][0]
    assert row["prompt"][0] == user("what are some pranks with a pen i can do?")
    assert first["chosen"].endswith(row["responses"][0]) and first["rejected"].endswith(row["responses"][1])
    window = comparisons.main(["--source", "hh-rlhf", "--input_path", str(path), "--source_start", "100",
                               "--source_limit", "10", "--output_dir", str(tmp_path / "window")])
    assert stage_rows(window)[0]["source_id"] == "100" and len(stage_rows(window)) == 10


# ----------------------------------------------------------------------------- ranking sheets


def fill_sheet(path: Path, ranks_by_id: dict[str, list[int] | str]) -> None:
    """Write `ranks` into a sheet the way a person would: as text in CSV, as a list or text in JSONL."""
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns, rows = reader.fieldnames, list(reader)
        for row in rows:
            ranks = ranks_by_id[row["id"]]
            row["ranks"] = ranks if isinstance(ranks, str) else " ".join(map(str, ranks))
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        write_jsonl(path, [{**row, "ranks": ranks_by_id[row["id"]]} for row in rows])


def sheet_responses(row: dict) -> list[str]:
    return [row[f"response_{i}"] for i in range(1, int(row["num_responses"]) + 1)]


def read_sheet_rows(path: Path) -> list[dict]:
    return [record.data for record in sources.read_sheet(path, "test")]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_sheet_export_fill_import_round_trip(tmp_path, suffix):
    """Export a ranked dataset to a sheet, rank it as the original did, import it: the same comparisons."""
    tree = small_tree()
    original = comparisons.main(["--source", "oasst", "--input_path", str(write_jsonl(tmp_path / "t.jsonl", [tree])),
                                 "--output_dir", str(tmp_path / "original")])
    sheet = tmp_path / f"sheet{suffix}"
    comparisons.main(["--source", "sheet", "--input_path", str(original), "--export_sheet", str(sheet)])
    rows = read_sheet_rows(sheet)
    assert [r["id"] for r in rows] == ["root", "p1"] and all(r["ranks"] == "" for r in rows)
    assert rows[1]["prompt"] == "User: How do I stay warm?\n\nAssistant: Wear layers.\n\nUser: And in winter?"
    truth = {row["source_id"]: dict(zip(row["responses"], row["ranks"], strict=True)) for row in stage_rows(original)}
    fill_sheet(sheet, {r["id"]: [truth[r["id"]][text] for text in sheet_responses(r)] for r in rows})

    imported = comparisons.main(["--source", "sheet", "--input_path", str(sheet), "--output_dir", str(tmp_path / "h")])
    expected = [{**row, "source": "sheet"} for row in stage_rows(original)]
    assert stage_rows(imported) == expected


def test_filled_sheet_with_a_bad_ranking_is_one_line_exit_2(tmp_path, capsys):
    """cli(): a sheet row ranked with a gap, and an unranked row: exit code 2, one line naming both rows."""
    sheet = tmp_path / "sheet.csv"
    sources.write_sheet([{"id": f"q{i}", "prompt": [user(f"question {i}")], "responses": ["a", "b", "c"]}
                           for i in range(3)], sheet, seed=0)
    fill_sheet(sheet, {"q0": "0 1 2", "q1": "0, 2, 3", "q2": ""})
    assert comparisons.cli(["--source", "sheet", "--input_path", str(sheet), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: comparisons: "), err
    assert "row 2 (id q1): ranks [0, 2, 3] skip a value" in err[0] and "row 3 (id q2): not ranked" in err[0]
    assert "row 1 " not in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("value, ranks", [
    ("1 0 2", [1, 0, 2]), ("1,0,2", [1, 0, 2]), ("[1, 0, 2]", [1, 0, 2]), ([0, 0, 1], [0, 0, 1]), (10, [10]),
    ("first", None), ([0, "1"], None), ("1.5 0", None),
])
def test_parse_ranks(value, ranks):
    """Ranks in a sheet may be written '1 0 2', '1,0,2', '[1, 0, 2]' or a JSON list; anything else is rejected."""
    assert sources.parse_ranks(value) == ranks


# ----------------------------------------------------------------------------- sampling and the reference ranker


def test_degenerate_reason():
    """Empty, looping (a word 3-gram repeated 4 times) and truncated responses are degenerate; others are not."""
    assert degenerate_reason("  \n ") == "empty"
    assert degenerate_reason("I am fine. " + "and then we " * 4) == "loop"
    assert degenerate_reason("and then we " * 3) is None
    assert degenerate_reason("A complete answer.", truncated=True) == "truncated"
    assert degenerate_reason("A complete answer.") is None


def test_rank_by_scores_puts_degenerate_last_and_ties_only_equal_scores():
    """Higher score ranks first, degenerate below every sound response whatever its score, ties only for equal."""
    assert rank_by_scores([0.2, 0.9, 0.5], [False, False, False]) == [2, 0, 1]
    assert rank_by_scores([0.99, 0.1, 0.5], [True, False, False]) == [2, 1, 0]
    assert rank_by_scores([0.5, 0.5, 0.4], [False, False, False]) == [0, 0, 1]
    assert rank_by_scores([0.5, 0.5], [False, True]) == [0, 1]


def test_reference_ranker_puts_the_copy_first_and_degenerate_last():
    """With the real embedding model: an exact copy of the reference ranks 0, a paraphrase next, then an
    unrelated answer; empty, looping and cut-off responses come last even when they are close to the reference."""
    from sentence_transformers import SentenceTransformer

    from align.lm.models import resolve_embedding_model

    embedder = SentenceTransformer(resolve_embedding_model(), device="cpu")
    reference = "The capital of Australia is Canberra."
    group = [Generation("", False), Generation("Bananas are rich in potassium.", False),
             Generation("The capital of Australia is Canberra. " * 4, False),  # a loop that says the right thing
             Generation("Canberra is the capital city of Australia.", False), Generation(reference, False),
             Generation("The capital of Australia is Canberra", True), Generation(reference, False)]
    [ranks] = rankers.rank_against_references(embedder, [group], [reference])
    assert ranks[4] == ranks[6] == 0 and ranks[3] == 1 and ranks[1] == 2  # identical texts tie
    assert min(ranks[0], ranks[2], ranks[5]) == 3 and sorted(set(ranks)) == list(range(max(ranks) + 1))


def test_sheet_responses_are_shuffled_with_the_seed(tmp_path):
    """write_sheet shuffles each row's responses (seeded, so the same sheet every time) and keeps them all."""
    rows = [{"id": str(i), "prompt": [user("q")], "responses": ["a", "b", "c"]} for i in range(12)]
    for name in ("one.jsonl", "two.jsonl"):
        sources.write_sheet(rows, tmp_path / name, seed=3)
    written = [sheet_responses(r) for r in read_sheet_rows(tmp_path / "one.jsonl")]
    assert all(sorted(r) == ["a", "b", "c"] for r in written)
    assert any(r != ["a", "b", "c"] for r in written)
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()


def test_prompt_records_from_messages_and_prompt_columns():
    """A chat ending with an assistant reply gives the turns before it and the reply as reference; a `prompt`
    column uses `output` as reference; a prompt without one is an error for the reference ranker only."""
    from datasets import Dataset, DatasetDict

    chats = DatasetDict(train=Dataset.from_list([
        {"messages": [user("a"), assistant("b"), user("c"), assistant("d")]},
        {"messages": [user("e")]},
    ]))
    records = prompt_records(chats, None, "output", need_reference=False, stage="test")
    assert records == [
        {"prompt": [user("a"), assistant("b"), user("c")], "reference": "d", "source_id": "train:0"},
        {"prompt": [user("e")], "reference": None, "source_id": "train:1"},
    ]
    with pytest.raises(StageError, match="split 'train' row 1: no reference answer"):
        prompt_records(chats, None, "output", need_reference=True, stage="test")
    prompts = DatasetDict(train=Dataset.from_list([{"instruction": "x", "prompt": "Say hi", "output": "Hi"}]))
    assert prompt_records(prompts, "train", "output", True, "test")[0]["prompt"] == [user("Say hi")]


def prompts_file(tmp_path: Path, count: int) -> Path:
    """Self-Instruct-style rows: prompt text + reference output."""
    return write_jsonl(tmp_path / "prompts.jsonl", [
        {"instruction": f"Question {i}", "input": "", "prompt": f"What is {i} + {i}?",
         "output": f"{i} + {i} = {2 * i}."}
        for i in range(count)
    ])


def test_sample_mode_with_the_tiny_model(tmp_path, tiny_model_path, one_thread):
    """K = 3 responses to each of 4 prompts, ranked against the reference: 4 valid rows, 1 in test."""
    output = comparisons.main(["--source", "sample", *TINY, "--input_path", str(prompts_file(tmp_path, 4)),
                               "--num_responses", "3", "--batch_size", "2", "--test_records", "1",
                               "--output_dir", str(tmp_path / "o")])
    data = load_from_disk(str(output / "dataset"))
    format.validate_comparisons(data, "test")
    rows = data["train"].to_list() + data["test"].to_list()
    assert [r["source_id"] for r in rows] == ["train:0", "train:1", "train:2", "train:3"] and len(data["test"]) == 1
    assert all(len(r["responses"]) == 3 and r["ranker"] == "reference" and r["source"] == "sampled" for r in rows)
    assert rows[2]["prompt"] == [user("What is 2 + 2?")]
    manifest = read_manifest(output)
    assert manifest["base_model"]["name_or_path"] == "tiny-llama" and manifest["metrics"]["prompts"] == 4
    journal = [json.loads(line) for line in (output / "journal.jsonl").read_text().splitlines()]
    assert sorted(r["position"] for r in journal) == [0, 1, 2, 3]


def test_sample_mode_human_ranker_writes_a_sheet_that_imports(tmp_path, tiny_model_path, one_thread):
    """--ranker human: sampled responses go to <output_dir>/sheet.jsonl; filled in, it imports as human rankings."""
    output = comparisons.main(["--source", "sample", *TINY, "--ranker", "human", "--num_responses", "2",
                               "--input_path", str(DEMONSTRATIONS), "--source_limit", "2",
                               "--output_dir", str(tmp_path / "samples")])
    sheet = output / "sheet.jsonl"
    rows = read_sheet_rows(sheet)
    assert [r["id"] for r in rows] == ["train:0", "train:1"] and all(r["num_responses"] == 2 for r in rows)
    assert rows[0]["prompt"] == "What is photosynthesis?"
    fill_sheet(sheet, {r["id"]: [1, 0] for r in rows})
    imported = comparisons.main(["--source", "sheet", "--input_path", str(sheet), "--output_dir", str(tmp_path / "h")])
    first = stage_rows(imported)[0]
    assert first["responses"] == [rows[0]["response_2"], rows[0]["response_1"]] and first["ranker"] == "human"


@pytest.mark.parametrize("args, message", [
    (["--source", "nope"], "--source must be one of oasst, hh-rlhf, sample, sheet"),
    (["--source", "sample", "--num_responses", "1"], "--num_responses must be >= 2"),
    (["--source", "oasst", "--test_records", "1"], "leave some for train"),
    (["--source", "sample", "--input_path", "{demonstrations}", "--adapter", "{tmp}"], "no adapter at"),
    (["--source", "sample", "--input_path", "{prompts_without_reference}"], "no reference answer"),
])
def test_bad_options_fail_before_writing(tmp_path, args, message):
    """Bad options and inputs are one StageError, raised before anything is written."""
    bare = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "Say hi"}])
    tree = write_jsonl(tmp_path / "t.jsonl", [small_tree()])
    args = [a.format(demonstrations=DEMONSTRATIONS, tmp=tmp_path, prompts_without_reference=bare) for a in args]
    if "--input_path" not in args:
        args += ["--input_path", str(tree)]
    with pytest.raises(StageError, match=message.replace("(", r"\(").replace("+", r"\+")):
        comparisons.main([*args, *TINY, "--output_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.slow
def test_killed_sampling_run_resumes_without_losing_or_repeating_prompts(tmp_path, tiny_model_path):
    """SIGKILL once the journal has a line (plus a torn last line); the same command finishes every prompt once."""
    count = 30
    out = tmp_path / "out"
    args = ["comparisons", "--source", "sample", "--model_name_or_path", "tiny-llama", "--seed", "0",
            "--input_path", str(prompts_file(tmp_path, count)), "--num_responses", "2", "--batch_size", "1",
            "--max_new_tokens", "128", "--output_dir", str(out)]
    journal = out.with_name("out.partial") / "journal.jsonl"
    log = tmp_path / "first.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    kill_after_journal_line(args, journal, log, env)
    assert not out.exists()
    journaled = journal.read_text().count("\n")
    assert 1 <= journaled < count, "the run finished before it could be killed; make it longer"
    with open(journal, "a") as handle:  # as if killed in the middle of a write
        handle.write('{"position": 29, "source_id": "train:29", "respon')

    second = subprocess.run([sys.executable, "-m", "align.cli", *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "resuming:" in second.stderr
    data = load_from_disk(str(out / "dataset"))
    ids = data["train"]["source_id"]
    metrics = read_manifest(out)["metrics"]
    assert sorted(ids) == sorted(f"train:{i}" for i in range(count)) or metrics["skipped_all_tied"] > 0
    assert len(ids) == len(set(ids)) and len(ids) + metrics["skipped_all_tied"] == count
    assert metrics["resumed_prompts"] == journaled
    positions = [json.loads(line)["position"] for line in (out / "journal.jsonl").read_text().splitlines()]
    assert sorted(positions) == list(range(count))
