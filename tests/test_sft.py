"""The SFT stage: learning, outputs, the stage contract's errors, resuming and the distributed path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from align import sft
from align.core.command import StageError
from align.core.outputs import read_manifest
from align.lm.models import load_causal_lm, load_tokenizer
from tests.conftest import DEMONSTRATIONS, ROOT, chat, run_align, write_jsonl

TINY = ["--model_name_or_path", "tiny-llama", "--report_to", "none", "--seed", "0"]


def _logits(model, tokenizer, text: str) -> torch.Tensor:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny SFT run shared by the tests that inspect its outputs."""
    out = tmp_path_factory.mktemp("sft") / "run"
    sft.main([*TINY, "--dataset_name", str(DEMONSTRATIONS), "--output_dir", str(out), "--max_steps", "16",
              "--per_device_train_batch_size", "4", "--learning_rate", "3e-3", "--logging_steps", "2",
              "--save_steps", "8", "--report_to", "tensorboard"])
    return out


def test_training_loss_falls(trained):
    """The logged training loss at the end is clearly below the first logged loss."""
    records = [json.loads(line) for line in (trained / "logs" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 6
    assert losses[-1] < losses[0] - 0.1, losses
    metrics = read_manifest(trained)["metrics"]
    assert metrics["last_logged_loss"] < metrics["first_logged_loss"]
    assert metrics["eval_loss"] is not None and metrics["eval_examples"] == 5  # 10% of 48 held out


def test_outputs_follow_the_stage_contract(trained):
    """adapter/ with weights, tokenizer and model card; manifest with config, fingerprinted input; logs."""
    assert not trained.with_name(trained.name + ".partial").exists()
    adapter = trained / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "README.md"):
        assert (adapter / name).is_file(), name
    assert not (trained / "checkpoints").exists()  # pruned once finished
    assert list((trained / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    manifest = read_manifest(trained)
    assert manifest["stage"] == "sft"
    assert manifest["inputs"]["dataset"]["fingerprint"].startswith("sha256:")
    assert manifest["base_model"]["name_or_path"] == "tiny-llama"
    assert manifest["config"]["training"]["max_steps"] == 16
    assert manifest["metrics"]["global_step"] == 16
    assert manifest["started"] <= manifest["finished"]
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert manifest["inputs"]["dataset"]["fingerprint"] in card
    assert "train_loss" in card


def test_adapter_changes_the_base_model(trained, tiny_model_path):
    """Loading the saved adapter on the base model changes its logits."""
    tokenizer = load_tokenizer(tiny_model_path)
    text = "<|im_start|>user\nWhat is 15% of 240?<|im_end|>\n<|im_start|>assistant\n"
    base = _logits(load_causal_lm(tiny_model_path), tokenizer, text)
    tuned = _logits(load_causal_lm(tiny_model_path, adapter=str(trained)), tokenizer, text)
    assert base.shape == tuned.shape
    assert (base - tuned).abs().max() > 1e-3


def test_prompt_completion_data_trains(tmp_path):
    """prompt/completion rows train with the loss on completions, and the manifest records the format."""
    rows = [{"prompt": f"Q: what is {i} plus {i}?\nA:", "completion": f" {2 * i}"} for i in range(12)]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    out = sft.main([*TINY, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
                    "--per_device_train_batch_size", "4", "--eval_fraction", "0"])
    manifest = read_manifest(out)
    assert manifest["data_format"] == "prompt-completion"
    assert manifest["metrics"]["eval_examples"] == 0


def test_test_split_of_a_saved_dataset_is_used_for_evaluation(tmp_path):
    """A save_to_disk DatasetDict with train and test splits: test is the eval set, nothing held out."""
    from datasets import Dataset, DatasetDict

    rows = [chat(f"Say {i}.", f"{i}") for i in range(8)]
    DatasetDict(train=Dataset.from_list(rows), test=Dataset.from_list(rows[:3])).save_to_disk(str(tmp_path / "d"))
    out = sft.main([*TINY, "--dataset_name", str(tmp_path / "d"), "--output_dir", str(tmp_path / "out"),
                    "--max_steps", "2", "--per_device_train_batch_size", "4"])
    metrics = read_manifest(out)["metrics"]
    assert (metrics["train_examples"], metrics["eval_examples"]) == (8, 3)


def test_existing_output_is_refused_before_training(trained):
    """A finished output directory is not overwritten unless asked."""
    with pytest.raises(StageError, match="already exists"):
        sft.main([*TINY, "--dataset_name", str(DEMONSTRATIONS), "--output_dir", str(trained)])


BAD_INPUTS = {
    # case: (file content, or None for a config-file case; what the one error line must say)
    "missing_messages": ('{"text": "no chat here"}\n', "no 'messages' column"),
    "malformed_jsonl": (json.dumps(chat("hi", "hello")) + '\n{"messages": [oops\n', "line 2: malformed JSON"),
    "empty_split": ("", "is empty"),
    "wrong_type": ('{"messages": "not a list"}\n', "row 0 column 'messages'"),
    "unknown_yaml_key": (None, "unknown key(s) in the config file: lerning_rate"),
}


def _bad_input_args(tmp_path: Path, case: str) -> tuple[list, Path]:
    content, _ = BAD_INPUTS[case]
    data = tmp_path / "data.jsonl"
    data.write_text(content if content is not None else json.dumps(chat("hi", "hello")) + "\n")
    out = tmp_path / "out"
    if content is None:
        config = tmp_path / "sft.yaml"
        config.write_text(f"model_name_or_path: tiny-llama\ndataset_name: {data}\nlerning_rate: 0.1\n")
        return ["--config", str(config), "--output_dir", str(out)], out
    return [*TINY, "--dataset_name", str(data), "--output_dir", str(out)], out


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_ends_with_one_line_and_exit_code_2(tmp_path, capsys, case):
    """Bad input: exit code 2, one line on stderr naming the problem, nothing written."""
    args, out = _bad_input_args(tmp_path, case)
    assert sft.cli(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sft: "), lines
    assert BAD_INPUTS[case][1] in lines[0]
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    """The installed command, in a fresh process: exit code 2, one line, no traceback."""
    args, out = _bad_input_args(tmp_path, "malformed_jsonl")
    result = run_align("sft", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "Traceback" not in result.stderr and "line 2: malformed JSON" in result.stderr
    assert not out.exists()


def _wait_for(path: Path, process: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


@pytest.mark.slow
def test_resumes_from_the_last_checkpoint_after_sigkill(tmp_path, tiny_model_path):
    """SIGKILL after the first checkpoint; the same command resumes from it, says so, and finishes."""
    out = tmp_path / "out"
    args = ["sft", *TINY, "--dataset_name", str(DEMONSTRATIONS), "--output_dir", str(out), "--max_steps", "60",
            "--per_device_train_batch_size", "4", "--save_steps", "5", "--logging_steps", "5"]
    command = [sys.executable, "-m", "align.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:  # a file, not a pipe: the progress bar would fill a pipe and block
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        _wait_for(out.with_name("out.partial") / "checkpoints" / "checkpoint-5" / "trainer_state.json", first, 120,
                  log)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()  # nothing the next stage could mistake for a finished output

    second = run_align(*args)
    assert second.returncode == 0, second.stderr
    assert "resuming from checkpoint-" in second.stderr
    manifest = read_manifest(out)
    assert manifest["resumed_from"].startswith("checkpoint-")
    assert manifest["metrics"]["global_step"] == 60
    steps = [json.loads(line)["step"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # records after the checkpoint were not duplicated
    tokenizer = load_tokenizer(tiny_model_path)
    model = load_causal_lm(tiny_model_path, adapter=str(out))
    assert torch.isfinite(_logits(model, tokenizer, "hello")).all()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_cpu_processes_both_train(tmp_path):
    """torchrun with 2 CPU processes (gloo): world size 2, and both ranks ran every optimizer step."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun not found next to the interpreter"
    out = tmp_path / "ddp"
    result = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "align.sft", "--config", "configs/tiny/sft.yaml",
         "--output_dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["distributed"]["world_size"] == 2
    assert manifest["distributed"]["steps_per_rank"] == [12, 12]
    assert "rank 0/2 ran 12 optimizer steps" in result.stderr
    assert "rank 1/2 ran 12 optimizer steps" in result.stderr
