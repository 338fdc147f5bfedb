"""Every stage, fed a table of bad inputs and options: exit code 2, one line per problem (`error: <stage>: ...`), no
traceback, and nothing on disk. Also what messy real data is accepted (a byte-order mark, unusable public rows
skipped and counted), and that a working directory with nothing to resume is removed after a late error."""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from align.core.command import StageError, run_stage
from align.core.inputs import load_stage_dataset
from align.core.outputs import StageOutput, read_manifest
from tests.conftest import DEMONSTRATIONS, ROOT, write_jsonl

TINY = {stage: ["--config", str(ROOT / "configs" / "tiny" / f"{stage}.yaml")]
        for stage in ("sft", "reward", "ppo", "self-instruct", "comparisons")}
RAG_SET = ["--records", str(ROOT / "data" / "rag" / "questions.jsonl")]
MODULES = {"sft": "align.sft", "reward": "align.reward", "ppo": "align.ppo", "self-instruct": "align.self_instruct",
           "comparisons": "align.comparisons", "rag eval": "rag.evaluate", "pipeline": "align.pipeline",
           "evaluate": "align.evaluate"}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The bad (and the good) inputs the table refers to by name."""
    root = tmp_path_factory.mktemp("inputs")
    made: dict[str, Path] = {}

    def saved(name: str, columns: dict) -> None:
        DatasetDict(train=Dataset.from_dict(columns)).save_to_disk(str(root / name))
        made[name] = root / name

    saved("empty_chats", {"messages": []})
    saved("empty_comparisons", {"prompt": [], "responses": [], "ranks": []})
    saved("empty_prompts", {"prompt": []})
    made["no_assistant"] = write_jsonl(root / "no_assistant.jsonl", [
        {"messages": [user(f"question {i}")] + ([{"role": "assistant", "content": "answer"}] if i % 2 else [])}
        for i in range(12)])
    made["pairs_bad_prompt"] = write_jsonl(root / "pairs.jsonl", [{"prompt": 5, "chosen": "a", "rejected": "b"}] * 12)
    made["good_pairs"] = write_jsonl(root / "good_pairs.jsonl",
                                     [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(12)])
    made["not_adapter"] = root / "not_adapter"
    made["not_adapter"].mkdir()
    (made["not_adapter"] / "notes.txt").write_text("not an adapter")
    made["a_file"] = root / "a_file"
    made["a_file"].write_text("a file, not a directory")
    reward = root / "fake_reward"  # enough of a reward output for the checks that come before any model loads
    reward.mkdir()
    (reward / "manifest.json").write_text(json.dumps({"stage": "reward", "config": {}, "metrics": {}}))
    made["bare_reward"] = root / "bare_reward"  # a manifest without the adapter: not a finished output
    shutil.copytree(reward, made["bare_reward"])
    (reward / "adapter").mkdir()
    made["reward"] = reward
    gold = {"title": "t", "text": "Paris is in France.", "isgold": True}
    made["two_golds"] = write_jsonl(root / "two_golds.jsonl", [
        {"question": "Where is Paris?", "answers": ["France"], "ctxs": [gold, {**gold, "text": "Also France."}]}])
    made["string_gold"] = write_jsonl(root / "string_gold.jsonl", [
        {"question": "Where is Paris?", "answers": ["France"], "ctxs": [{**gold, "isgold": "yes"}]}])
    hh = "\n\nHuman: What is 2+2?\n\nAssistant:"
    made["hh_mismatch"] = write_jsonl(root / "hh.jsonl", [
        {"chosen": hh + " 4.", "rejected": hh + " 5."},
        {"chosen": hh + " 4.", "rejected": "\n\nHuman: Something else?\n\nAssistant: No."},
        {"chosen": hh + " Four.", "rejected": hh + " Fish."},
    ])
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(f"output_dir: {root / 'pipeline_runs'}\nmodel_name_or_path: tiny-llama\nstages:\n"
                        f"  sft:\n    config: configs/tiny/sft.yaml\n    dataset_name: {DEMONSTRATIONS}\n"
                        "    learning_rate: -1\n    lora_r: 0\n")
    made["pipeline"] = pipeline
    return made


# (stage, arguments — {name} is a file of the fixture, {out} the output directory —, expected lines, a phrase)
CASES = [
    ("sft", [*TINY["sft"], "--learning_rate", "-1"], 1, "--learning_rate must be > 0 (got -1.0)"),
    ("sft", [*TINY["sft"], "--learning_rate", "nan"], 1, "--learning_rate must be a finite number"),
    ("sft", [*TINY["sft"], "--lora_r", "0"], 1, "--lora_r must be >= 1"),
    ("sft", [*TINY["sft"], "--per_device_train_batch_size", "0"], 1, "--per_device_train_batch_size must be >= 1"),
    ("sft", [*TINY["sft"], "--eval_fraction", "1.5"], 1, "--eval_fraction must be in [0, 1)"),
    ("sft", [*TINY["sft"], "--max_length", "0"], 1, "--max_length must be >= 1"),
    ("sft", [*TINY["sft"], "--num_train_epochs", "0", "--max_steps", "-1"], 1, "--num_train_epochs 0 trains nothing"),
    ("sft", [*TINY["sft"], "--learning_rate", "-1", "--lora_r", "0", "--weight_decay", "-1"], 3, "--weight_decay"),
    ("sft", [*TINY["sft"], "--dataset_name", "{no_assistant}"], 1, "no assistant reply"),
    ("sft", [*TINY["sft"], "--dataset_name", "{empty_chats}"], 1, "holds no rows"),
    ("sft", [*TINY["sft"], "--dataset_name", "{a_file}/data.jsonl"], 1, "dataset not found"),
    ("sft", [*TINY["sft"], "--output_dir", "{a_file}/run"], 1, "is a file, not a directory"),
    ("sft", [*TINY["sft"], "--lerning_rate", "1e-4"], 1, "unknown option(s): --lerning_rate"),
    ("reward", [*TINY["reward"], "--lora_r", "0", "--dataset_name", "{good_pairs}"], 1, "--lora_r must be >= 1"),
    ("reward", [*TINY["reward"], "--dataset_name", "{pairs_bad_prompt}"], 1, "row 0 column 'prompt': expected"),
    ("reward", [*TINY["reward"], "--dataset_name", "{good_pairs}", "--sft_adapter", "{not_adapter}"], 1,
     "no adapter at"),
    ("reward", [*TINY["reward"], "--dataset_name", "{empty_comparisons}"], 1, "holds no rows"),
    ("reward", [*TINY["reward"], "--dataset_name", "{good_pairs}", "--backbone", "embedding", "--judge_learning_rate",
                "-1", "--judge_dropout", "1", "--sequences_per_pass", "-2"], 3, "--judge_learning_rate must be > 0"),
    ("reward", [*TINY["reward"], "--dataset_name", "{good_pairs}", "--cv_folds", "13"], 1,
     "--cv_folds 13 is more folds than the 12 conversations"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{reward}", "--learning_rate", "nan"], 1, "finite number"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{reward}", "--ptx_coef", "0.5"], 1, "--ptx_coef > 0 needs"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{reward}", "--gamma", "1.5", "--rollout_batch_size", "0"], 2, "--gamma"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{reward}", "--sft_adapter", "{not_adapter}"], 1, "no adapter at"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{reward}", "--dataset_name", "{empty_prompts}"], 1, "holds no rows"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{not_adapter}"], 1, "no reward model at"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{bare_reward}"], 1, "is not a finished `align reward` output"),
    ("ppo", [*TINY["ppo"], "--reward_model", "{reward}", "--value_model", "both"], 1, "choose reward or policy"),
    ("self-instruct", [*TINY["self-instruct"], "--temperature", "nan"], 1, "--temperature must be a finite"),
    ("self-instruct", [*TINY["self-instruct"], "--min_words", "5", "--max_words", "4"], 1, "--max_words must be >"),
    ("self-instruct", [*TINY["self-instruct"], "--prompt_mode", "poetry", "--batch_size", "0"], 2, "--prompt_mode"),
    ("comparisons", ["--source", "forum", "--input_path", "x.jsonl"], 1, "--source must be one of"),
    ("comparisons", [*TINY["comparisons"], "--num_responses", "1"], 1, "--num_responses must be >= 2"),
    ("comparisons", [*TINY["comparisons"], "--top_p", "0"], 1, "--top_p must be in (0, 1]"),
    ("comparisons", ["--source", "hh-rlhf", "--input_path", "{hh_mismatch}", "--strict", "true"], 1,
     "do not share the conversation"),
    ("rag eval", ["--benchmark", "trivia", *RAG_SET], 1, "--benchmark must be one of qa, kv"),
    ("rag eval", ["--num_questions", "0", *RAG_SET], 1, "--num_questions must be >= 1"),
    ("rag eval", ["--records", "{two_golds}"], 1, "2 gold passages"),
    ("rag eval", ["--records", "{string_gold}"], 1, "`isgold` must be true or false"),
    ("pipeline", ["--config", "{pipeline}"], 2, "stage 'sft': --learning_rate must be > 0"),
    ("evaluate", ["--policies", "a=tiny-llama"], 1, "no judges — pass --judges NAME=<align reward output>"),
    ("evaluate", ["--policies", "a=tiny-llama", "--judges", "j={reward}", "--max_prompts", "0", "--temperature", "0"],
     2, "--max_prompts must be >= 1"),
    ("evaluate", ["--policies", "a=tiny-llama", "a=tiny-llama", "--judges", "j={reward}"], 1, "unique names"),
    ("evaluate", ["--policies", "a=tiny-llama", "--judges", "j={bare_reward}"], 1,
     "not a finished `align reward` output"),
]


def run_case(stage: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    module = importlib.import_module(MODULES[stage])
    code = run_stage(stage, module.main, argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize(("stage", "arguments", "lines", "phrase"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_per_problem_and_nothing_on_disk(stage, arguments, lines, phrase, files, tmp_path,
                                                               capsys, one_thread):
    out = tmp_path / "out"
    names = {name: str(path) for name, path in files.items()}
    argv = [a.format(out=out, **names) for a in arguments]
    if stage not in ("pipeline",) and "--output_dir" not in argv:
        argv += ["--output_dir", str(out)]
    code, errors = run_case(stage, argv, capsys)
    assert code == 2, errors
    assert len(errors) == lines, errors
    assert all(line.startswith(f"error: {stage}: ") for line in errors), errors
    assert not any("Traceback" in line for line in errors)
    assert any(phrase in line for line in errors), errors
    assert not out.exists() and not out.with_name("out.partial").exists()
    assert not (files["pipeline"].parent / "pipeline_runs").exists()


def test_a_byte_order_mark_is_accepted(tmp_path):
    """Many editors and spreadsheet exports start UTF-8 files with a byte-order mark."""
    rows = [json.dumps({"messages": [user(f"q{i}"), {"role": "assistant", "content": f"a{i}"}]}) for i in range(3)]
    path = tmp_path / "chats.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())
    data = load_stage_dataset(path, "test")
    assert data["train"].num_rows == 3 and data["train"].column_names == ["messages"]


def test_unusable_public_rows_are_skipped_and_counted(files, tmp_path, capsys, caplog):
    """hh-rlhf holds a few pairs whose transcripts differ before the last reply: they are skipped and counted,
    and the rest imported; `--strict true` refuses the file instead (see the table)."""
    from align import comparisons

    out = tmp_path / "hh"
    code = run_stage("comparisons", comparisons.main, ["--source", "hh-rlhf", "--input_path",
                                                       str(files["hh_mismatch"]), "--output_dir", str(out)])
    assert code == 0, capsys.readouterr().err
    metrics = read_manifest(out)["metrics"]
    assert metrics["skipped"] == 1 and metrics["skipped_reasons"] == {"prompts_differ": 1}
    assert metrics["rows"] == {"train": 2}
    assert "skipped 1 of 3 records that cannot be used (prompts_differ: 1)" in caplog.text


def test_nothing_usable_left_is_refused(tmp_path, capsys):
    from align import comparisons

    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a?\n\nAssistant: b", "rejected": "no turns"}])
    code = run_stage("comparisons", comparisons.main, ["--source", "hh-rlhf", "--input_path", str(path),
                                                       "--output_dir", str(tmp_path / "out")])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(errors) == 1 and "no usable comparisons" in errors[0] and "1 skipped" in errors[0]
    assert not list(tmp_path.glob("out*"))


def late_failure(output: StageOutput, before_failing: Callable[[Path], None]) -> Callable:
    """A stage that opens its working directory, writes something, then fails with a user error."""
    def main(argv):
        output.check()
        partial = output.open()
        before_failing(partial)
        raise StageError("test", "the model does not fit — use a smaller one")
    return main


def test_a_late_error_removes_a_working_directory_with_nothing_to_resume(tmp_path, capsys):
    output = StageOutput("test", tmp_path / "out", {"data": {"x": 1}})
    assert run_stage("test", late_failure(output, lambda partial: (partial / "logs" / "a.log").write_text("x")),
                     []) == 2
    assert capsys.readouterr().err.strip() == "error: test: the model does not fit — use a smaller one"
    assert not output.partial.exists()


@pytest.mark.parametrize("resumable", ["checkpoints/checkpoint-2", "journal.jsonl"])
def test_a_late_error_keeps_work_a_rerun_resumes_from(resumable, tmp_path, capsys):
    def write(partial: Path) -> None:
        target = partial / resumable
        if target.suffix:
            target.write_text('{"position": 0}\n')
        else:
            target.mkdir(parents=True)

    output = StageOutput("test", tmp_path / "out", {"data": {"x": 1}})
    assert run_stage("test", late_failure(output, write), []) == 2
    assert (output.partial / resumable).exists()
