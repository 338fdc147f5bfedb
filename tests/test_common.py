"""Unit tests of the stage contract in align/core: loading, validation, fingerprints,
manifests, atomic outputs, config parsing and the CLI error path."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from align.core.command import StageError, parse_config, run_stage
from align.core.inputs import load_stage_dataset, validate_columns
from align.core.outputs import (
    MANIFEST,
    PARTIAL_SUFFIX,
    RUN_CONFIG,
    StageOutput,
    fingerprint,
    read_manifest,
    save_dataset_atomic,
    strip_secrets,
    write_manifest,
)
from tests.conftest import chat, write_jsonl

ROWS = [chat("What is 2+2?", "4"), chat("Capital of France?", "Paris"), chat("Say hi", "hi")]


def _questions(data: Dataset) -> list[str]:
    return [row[0]["content"] for row in data["messages"]]


# ----------------------------------------------------------------------------- load_stage_dataset


def test_load_jsonl_file(tmp_path):
    """A JSONL file loads as a one-split DatasetDict with every row, in order, under the given split."""
    path = write_jsonl(tmp_path / "demo.jsonl", ROWS)
    data = load_stage_dataset(path, "sft")
    assert isinstance(data, DatasetDict)
    assert list(data) == ["train"]
    assert _questions(data["train"]) == ["What is 2+2?", "Capital of France?", "Say hi"]
    assert load_stage_dataset(path, "sft", split="eval").keys() == {"eval"}


def test_load_gzipped_jsonl(tmp_path):
    """A gzipped JSONL file is decompressed and loads the same rows."""
    path = tmp_path / "demo.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in ROWS))
    data = load_stage_dataset(path, "sft")
    assert len(data["train"]) == 3
    assert data["train"][1]["messages"][1]["content"] == "Paris"


def test_load_json_array(tmp_path):
    """A file holding one JSON array of objects loads each element as a row."""
    path = tmp_path / "demo.json"
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    path.write_text(json.dumps(rows, indent=2))
    data = load_stage_dataset(path, "sft")
    assert data["train"]["prompt"] == ["a", "c"]
    assert data["train"]["completion"] == ["b", "d"]


def test_load_parquet(tmp_path):
    """A Parquet file loads with its columns and rows."""
    path = tmp_path / "pairs.parquet"
    Dataset.from_dict({"prompt": ["p1", "p2"], "chosen": ["c1", "c2"]}).to_parquet(str(path))
    data = load_stage_dataset(path, "reward")
    assert list(data) == ["train"]
    assert data["train"]["prompt"] == ["p1", "p2"]
    assert data["train"]["chosen"] == ["c1", "c2"]


def test_load_save_to_disk_dir_keeps_splits(tmp_path):
    """A DatasetDict.save_to_disk directory loads with its own splits, not renamed."""
    DatasetDict({
        "train": Dataset.from_list(ROWS[:2]),
        "test": Dataset.from_list(ROWS[2:]),
    }).save_to_disk(str(tmp_path / "saved"))
    data = load_stage_dataset(tmp_path / "saved", "sft")
    assert set(data) == {"train", "test"}
    assert _questions(data["train"]) == ["What is 2+2?", "Capital of France?"]
    assert _questions(data["test"]) == ["Say hi"]


def test_load_stage_output_dir_uses_dataset_subdir(tmp_path):
    """A stage output directory (holding dataset/ and a manifest) loads its dataset/ splits."""
    out = tmp_path / "self-instruct"
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(out / "dataset"))
    (out / MANIFEST).write_text("{}")
    data = load_stage_dataset(out, "sft")
    assert list(data) == ["train"]
    assert len(data["train"]) == 3


def test_load_malformed_jsonl_names_file_and_line(tmp_path):
    """A malformed JSONL line raises StageError naming the file and the 1-based line number."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n")
    with pytest.raises(StageError) as info:
        load_stage_dataset(path, "sft")
    assert info.value.stage == "sft"
    assert str(path) in info.value.message
    assert "line 3" in info.value.message


def test_load_missing_path_not_found(tmp_path):
    """A path that does not exist raises StageError saying 'not found' and naming the path."""
    missing = tmp_path / "nope" / "data.jsonl"
    with pytest.raises(StageError) as info:
        load_stage_dataset(missing, "sft")
    assert "not found" in info.value.message
    assert str(missing) in info.value.message
    with pytest.raises(StageError, match="not found"):
        load_stage_dataset("./no/such/data.jsonl", "sft")


def test_load_non_object_row(tmp_path):
    """A JSONL row that is not a JSON object (here a list) raises StageError naming the record."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(StageError) as info:
        load_stage_dataset(path, "sft")
    assert str(path) in info.value.message
    assert "line 2" in info.value.message
    assert "expected a JSON object" in info.value.message


# ----------------------------------------------------------------------------- validate_columns


def test_validate_missing_column_names_producer():
    """A missing column is named in the error together with the stage that produces it."""
    data = DatasetDict({"train": Dataset.from_dict({"text": ["a"]})})
    with pytest.raises(StageError) as info:
        validate_columns(data, "sft", {"messages": "messages"})
    assert info.value.stage == "sft"
    assert "'messages'" in info.value.message
    assert "self-instruct" in info.value.message


def test_validate_messages_string_names_row_and_column():
    """messages given as a plain string is rejected naming the row index and the column."""
    data = DatasetDict({"train": Dataset.from_dict({"messages": ["hello", "there"]})})
    with pytest.raises(StageError) as info:
        validate_columns(data, "sft", {"messages": "messages"})
    message = info.value.message
    assert "row 0 column 'messages'" in message
    assert "row 1 column 'messages'" in message


def test_validate_bad_row_index_is_exact():
    """Only the bad row (index 1, content null) is reported, by its index."""
    rows = [chat("q", "a"), {"messages": [{"role": "user", "content": None}]}]
    data = DatasetDict({"train": Dataset.from_list(rows)})
    with pytest.raises(StageError) as info:
        validate_columns(data, "sft", {"messages": "messages"})
    assert "row 1 column 'messages'" in info.value.message
    assert "row 0" not in info.value.message


def test_validate_ranks_with_string():
    """A ranks list holding strings fails the list[int] check naming row and column."""
    data = DatasetDict({"train": Dataset.from_dict({"ranks": [[0, 1], [2, 3]]})})
    validate_columns(data, "reward", {"ranks": "list[int]"})  # control: integers pass
    bad = DatasetDict({"train": Dataset.from_dict({"ranks": [["0", "x"]]})})
    with pytest.raises(StageError) as info:
        validate_columns(bad, "reward", {"ranks": "list[int]"})
    assert "row 0 column 'ranks'" in info.value.message
    assert "integers" in info.value.message


def test_validate_empty_split():
    """A split with the right columns but no rows is reported as empty."""
    data = DatasetDict({"train": Dataset.from_dict({"messages": []})})
    with pytest.raises(StageError) as info:
        validate_columns(data, "sft", {"messages": "messages"})
    assert "split 'train' is empty" in info.value.message


def test_validate_reports_all_missing_columns_at_once():
    """Two missing columns are both named in one StageError, each with its producer."""
    data = DatasetDict({"train": Dataset.from_dict({"prompt": ["p"]})})
    with pytest.raises(StageError) as info:
        validate_columns(data, "reward", {"prompt": "str", "chosen": "str", "rejected": "str"})
    message = info.value.message
    assert "'chosen'" in message and "'rejected'" in message
    assert message.count("(produced by comparisons (align comparisons)") == 2
    assert "'prompt'" not in message


def test_validate_valid_data_passes():
    """Well-formed data of every checked kind passes, on every split, returning None."""
    train = {**chat("q", "a"), "prompt": "p", "ranks": [1, 0], "responses": ["x", "y"]}
    test = {**chat("q2", "a2"), "prompt": "p2", "ranks": [0, 1], "responses": ["z", "w"]}
    data = DatasetDict({"train": Dataset.from_list([train]), "test": Dataset.from_list([test])})
    columns = {"messages": "messages", "prompt": "text", "ranks": "list[int]", "responses": "list[str]"}
    assert validate_columns(data, "x", columns) is None
    with pytest.raises(StageError, match="split 'eval' is missing"):
        validate_columns(data, "x", columns, splits=["train", "eval"])


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_file(tmp_path):
    """A file's fingerprint depends on its content only: equal bytes equal, changed bytes differ."""
    a = write_jsonl(tmp_path / "a.jsonl", ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", ROWS)
    c = write_jsonl(tmp_path / "c.jsonl", ROWS[:2])
    assert fingerprint(a).startswith("sha256:")
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    before = fingerprint(a)
    a.write_text(a.read_text() + json.dumps(chat("x", "y")) + "\n")
    assert fingerprint(a) != before


def test_fingerprint_saved_dataset(tmp_path):
    """Two save_to_disk dirs of the same rows fingerprint equal; different rows differ; a stage dir
    fingerprints as its dataset/."""
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "one"))
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "two"))
    DatasetDict({"train": Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "three"))
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "stage" / "dataset"))
    one = fingerprint(tmp_path / "one")
    assert one.startswith("sha256:")
    assert one == fingerprint(tmp_path / "two")
    assert one != fingerprint(tmp_path / "three")
    assert fingerprint(tmp_path / "stage") == one


def test_fingerprint_hub_name():
    """A name that is not on disk fingerprints as 'name:<name>'."""
    assert fingerprint("trl-lib/Capybara") == "name:trl-lib/Capybara"


# ----------------------------------------------------------------------------- manifests


def test_strip_secrets_any_depth():
    """Credential keys (hub_token, *password*, *secret*, any case) are dropped at every depth; tokenizer
    settings such as pad_token are kept, since a change to them must still be noticed on resume."""
    config = {
        "hub_token": "hf_x",
        "pad_token": "<pad>",
        "lr": 0.1,
        "nested": {"DB_Password": "p", "keep": 1, "deeper": [{"client_secret": "s", "name": "n"}]},
        "path": Path("/a/b"),
    }
    assert strip_secrets(config) == {
        "pad_token": "<pad>",
        "lr": 0.1,
        "nested": {"keep": 1, "deeper": [{"name": "n"}]},
        "path": "/a/b",
    }


def test_manifest_round_trip_without_secrets(tmp_path):
    """write_manifest/read_manifest round-trip the data and the hub_token never reaches the disk."""
    manifest = {"stage": "sft", "metrics": {"loss": 1.5}, "config": {"hub_token": "hf_SECRET123", "lr": 2e-4}}
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST
    assert "hf_SECRET123" not in path.read_text()
    assert "hub_token" not in path.read_text()
    assert read_manifest(tmp_path) == {"stage": "sft", "metrics": {"loss": 1.5}, "config": {"lr": 2e-4}}


def test_read_manifest_missing(tmp_path):
    """read_manifest on a directory without manifest.json raises StageError saying 'not found'."""
    with pytest.raises(StageError, match="not found"):
        read_manifest(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- StageOutput


def _out(tmp_path, config=None, **kwargs) -> StageOutput:
    config = config if config is not None else {"lr": 0.1, "epochs": 2}
    return StageOutput("sft", tmp_path / "run", config, **kwargs)


def test_check_refuses_existing_output(tmp_path):
    """check() raises when output_dir exists, and passes with overwrite=True."""
    (tmp_path / "run").mkdir()
    with pytest.raises(StageError) as info:
        _out(tmp_path).check()
    assert "already exists" in info.value.message
    assert info.value.stage == "sft"
    assert _out(tmp_path, overwrite=True).check() is None


def test_open_creates_partial_with_logs(tmp_path):
    """open() creates <out>.partial/ with logs/ and the run config, and nothing at output_dir."""
    out = _out(tmp_path)
    out.check()
    partial = out.open()
    assert partial == tmp_path / ("run" + PARTIAL_SUFFIX)
    assert (partial / "logs").is_dir()
    assert json.loads((partial / RUN_CONFIG).read_text()) == {"lr": 0.1, "epochs": 2}
    assert out.resumed is False
    assert not (tmp_path / "run").exists()


def test_publish_renames_partial(tmp_path):
    """publish() moves partial -> output_dir with manifest.json and the stage's files; no .partial remains."""
    out = _out(tmp_path)
    partial = out.open()
    (partial / "adapter").mkdir()
    (partial / "adapter" / "weights.bin").write_text("w")
    final = out.publish({"stage": "sft", "metrics": {"loss": 0.5}}, keep=["adapter"])
    assert final == tmp_path / "run"
    assert read_manifest(final) == {"stage": "sft", "metrics": {"loss": 0.5}}
    assert (final / "adapter" / "weights.bin").read_text() == "w"
    assert not (final / RUN_CONFIG).exists()
    assert not partial.exists()


def test_partial_with_other_config_refused(tmp_path):
    """A partial started with one config and checked with another raises naming the changed key."""
    _out(tmp_path, {"lr": 0.1, "epochs": 2}).open()
    with pytest.raises(StageError) as info:
        _out(tmp_path, {"lr": 0.5, "epochs": 2}).check()
    assert "changed: lr" in info.value.message
    assert "epochs" not in info.value.message


def test_partial_with_same_config_resumes(tmp_path):
    """Re-running with the same config passes check() and open() reports resumed=True, keeping files."""
    first = _out(tmp_path)
    partial = first.open()
    (partial / "checkpoint.txt").write_text("step 10")
    second = _out(tmp_path)
    assert second.check() is None
    assert second.open() == partial
    assert second.resumed is True
    assert (partial / "checkpoint.txt").read_text() == "step 10"


def test_restart_discards_partial(tmp_path):
    """restart=True accepts a partial with another config and open() empties it (resumed=False)."""
    partial = _out(tmp_path, {"lr": 0.1}).open()
    (partial / "checkpoint.txt").write_text("old")
    again = _out(tmp_path, {"lr": 0.9}, restart=True)
    again.check()
    assert again.open() == partial
    assert again.resumed is False
    assert not (partial / "checkpoint.txt").exists()
    assert (partial / "logs").is_dir()
    assert json.loads((partial / RUN_CONFIG).read_text()) == {"lr": 0.9}


def test_publish_overwrite_replaces_output(tmp_path):
    """publish with overwrite replaces an existing output dir's content; no .old or .partial remains."""
    final = tmp_path / "run"
    final.mkdir()
    (final / "old.txt").write_text("old")
    out = _out(tmp_path, overwrite=True)
    out.check()
    partial = out.open()
    (partial / "new.txt").write_text("new")
    out.publish({"stage": "sft"})
    assert (final / "new.txt").read_text() == "new"
    assert not (final / "old.txt").exists()
    assert read_manifest(final) == {"stage": "sft"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ----------------------------------------------------------------------------- save_dataset_atomic


def test_save_dataset_atomic_round_trip(tmp_path):
    """save_dataset_atomic writes a dataset that loads back with the same splits and rows."""
    data = DatasetDict({"train": Dataset.from_list(ROWS[:2]), "test": Dataset.from_list(ROWS[2:])})
    save_dataset_atomic(data, tmp_path / "dataset")
    loaded = load_stage_dataset(tmp_path / "dataset", "x")
    assert set(loaded) == {"train", "test"}
    assert _questions(loaded["train"]) == _questions(data["train"])
    assert _questions(loaded["test"]) == ["Say hi"]


def test_save_dataset_atomic_failure_leaves_no_output(tmp_path, monkeypatch):
    """If save_to_disk fails midway, the final path does not exist (a previous version stays intact)."""

    def broken_save(self, dataset_dict_path, *args, **kwargs):
        target = Path(dataset_dict_path)
        target.mkdir(parents=True, exist_ok=True)
        (target / "stray.arrow").write_text("half written")
        raise OSError("disk full")

    data = DatasetDict({"train": Dataset.from_list(ROWS)})
    monkeypatch.setattr(DatasetDict, "save_to_disk", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_dataset_atomic(data, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()
    monkeypatch.undo()

    save_dataset_atomic(DatasetDict({"train": Dataset.from_list(ROWS[:1])}), tmp_path / "kept")
    monkeypatch.setattr(DatasetDict, "save_to_disk", broken_save)
    with pytest.raises(OSError):
        save_dataset_atomic(data, tmp_path / "kept")
    monkeypatch.undo()
    assert len(load_stage_dataset(tmp_path / "kept", "x")["train"]) == 1


# ----------------------------------------------------------------------------- parse_config


@pytest.fixture(scope="module")
def sft_types():
    from align.sft import SFTDataArguments, SFTModelConfig, SFTStageConfig

    return (SFTDataArguments, SFTStageConfig, SFTModelConfig)


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_parse_config_applies_yaml(tmp_path, sft_types):
    """Values from the YAML config land in the right dataclasses."""
    config = _yaml(tmp_path, "learning_rate: 0.001\nmodel_name_or_path: tiny-llama\neval_fraction: 0.25\n")
    data_args, training_args, model_args = parse_config(
        "sft", sft_types, ["--config", config, "--output_dir", str(tmp_path / "out")]
    )
    assert training_args.learning_rate == 0.001
    assert model_args.model_name_or_path == "tiny-llama"
    assert data_args.eval_fraction == 0.25
    assert training_args.output_dir == str(tmp_path / "out")


def test_parse_config_cli_overrides_yaml(tmp_path, sft_types):
    """A CLI flag overrides the same key in the YAML, other YAML keys still apply."""
    config = _yaml(tmp_path, "learning_rate: 0.001\neval_fraction: 0.25\n")
    argv = ["--config", config, "--output_dir", str(tmp_path / "out"), "--learning_rate", "0.5"]
    data_args, training_args, _ = parse_config("sft", sft_types, argv)
    assert training_args.learning_rate == 0.5
    assert data_args.eval_fraction == 0.25


def test_parse_config_unknown_yaml_key(tmp_path, sft_types):
    """An unknown key in the YAML raises StageError naming the key."""
    config = _yaml(tmp_path, "learning_rate: 0.001\nlearning_rat: 3\n")
    with pytest.raises(StageError) as info:
        parse_config("sft", sft_types, ["--config", config, "--output_dir", str(tmp_path / "out")])
    assert info.value.stage == "sft"
    assert "learning_rat" in info.value.message
    assert "config file" in info.value.message


def test_parse_config_unknown_cli_flag(tmp_path, sft_types):
    """An unknown CLI flag raises StageError naming the flag."""
    with pytest.raises(StageError) as info:
        parse_config("sft", sft_types, ["--output_dir", str(tmp_path / "out"), "--no_such_flag", "1"])
    assert info.value.stage == "sft"
    assert "--no_such_flag" in info.value.message


def test_parse_config_missing_file(tmp_path, sft_types):
    """A --config path that does not exist raises StageError naming it."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(StageError) as info:
        parse_config("sft", sft_types, ["--config", str(missing), "--output_dir", str(tmp_path / "out")])
    assert "config file not found" in info.value.message
    assert str(missing) in info.value.message


def test_parse_config_malformed_yaml(tmp_path, sft_types):
    """Malformed YAML raises StageError (not a yaml exception)."""
    config = _yaml(tmp_path, "learning_rate: [0.1\n  bad: :\n")
    with pytest.raises(StageError) as info:
        parse_config("sft", sft_types, ["--config", config, "--output_dir", str(tmp_path / "out")])
    assert info.value.stage == "sft"
    assert "configuration" in info.value.message


# ----------------------------------------------------------------------------- run_stage


def test_run_stage_stage_error_one_line(capsys):
    """A StageError from main() returns 2 and prints exactly one 'error: <stage>: ...' line to stderr."""

    def main(argv):
        raise StageError("sft", "dataset not found: x.jsonl — check the path")

    assert run_stage("sft", main, ["--output_dir", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: sft: dataset not found: x.jsonl — check the path\n"
    assert captured.out == ""


def test_run_stage_debug_propagates():
    """With --debug in argv the StageError propagates instead of being turned into exit code 2."""

    def main(argv):
        raise StageError("sft", "boom")

    with pytest.raises(StageError, match="boom"):
        run_stage("sft", main, ["--debug"])


def test_run_stage_success_strips_debug():
    """A successful main() returns 0 and receives argv without --debug."""
    seen = []
    assert run_stage("sft", seen.append, ["--a", "1", "--debug"]) == 0
    assert seen == [["--a", "1"]]
