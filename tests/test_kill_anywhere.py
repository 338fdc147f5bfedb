"""Kill anywhere: every long stage, SIGKILLed at seeded random moments and re-run with the same command until it
finishes, ends with the output an uninterrupted run writes (rows, steps, metrics, weights).

The kill moments are drawn, per stage, from the uninterrupted run's own duration, so they land anywhere: while
the interpreter starts, while models load, mid-step, while a checkpoint or the output is being written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file

from align.core.outputs import read_manifest
from tests.conftest import DEMONSTRATIONS, ROOT, write_jsonl
from tests.test_rag_eval import CAPITALS

KILLS = 3  # kill points per stage
TINY = ["--model_name_or_path", "tiny-llama", "--seed", "0"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # the tiny model is fastest on one thread


def stage_args(stage: str, out: Path, inputs: dict[str, Path]) -> list[str]:
    configs = ROOT / "configs" / "tiny"
    if stage == "sft":
        return ["align.cli", "sft", "--config", str(configs / "sft.yaml"), "--dataset_name", str(DEMONSTRATIONS),
                "--max_steps", "16", "--save_steps", "4", "--eval_fraction", "0", "--output_dir", str(out)]
    if stage == "reward":
        return ["align.cli", "reward", "--config", str(configs / "reward.yaml"), "--dataset_name",
                str(inputs["comparisons"]), "--max_steps", "12", "--save_steps", "3", "--output_dir", str(out)]
    if stage == "ppo":
        return ["align.cli", "ppo", *TINY, "--reward_model", str(inputs["reward"]), "--dataset_name",
                str(DEMONSTRATIONS), "--total_steps", "6", "--rollout_batch_size", "4", "--mini_batch_size", "2",
                "--ppo_epochs", "1", "--max_new_tokens", "8", "--save_steps", "1", "--lora_r", "4", "--lora_alpha", "8",
                "--output_dir", str(out)]
    if stage == "self-instruct":
        return ["align.cli", "self-instruct", *TINY, "--max_rounds", "3", "--prompts_per_round", "2", "--batch_size",
                "1", "--new_instructions_per_prompt", "4", "--max_new_tokens", "32", "--instance_max_new_tokens", "16",
                "--min_words", "0", "--blocked_keywords", "nothing-blocked", "--output_dir", str(out)]
    if stage == "comparisons":
        return ["align.cli", "comparisons", "--config", str(configs / "comparisons.yaml"), "--batch_size", "1",
                "--source_limit", "8", "--max_new_tokens", "16", "--output_dir", str(out)]
    if stage == "rag eval":
        return ["rag.cli", "eval", "--records", str(inputs["questions"]), "--models", "tiny=tiny-llama",
                "--arms", "closed_book", "oracle", "--batch_size", "1", "--max_new_tokens", "8", "--output_dir",
                str(out)]
    raise ValueError(stage)


def run(args: list[str], log: Path, kill_after: float | None = None) -> float | None:
    """Run one command; with `kill_after`, SIGKILL it after that many seconds unless it ended first.
    Returns the wall time of a run that ended by itself (None when killed)."""
    started = time.perf_counter()
    with open(log, "a") as stderr:  # a file, not a pipe: progress bars would fill a pipe and block
        process = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        try:
            process.wait(timeout=kill_after if kill_after is not None else 600)
        except subprocess.TimeoutExpired:
            if kill_after is None:
                process.kill()
                raise
            process.send_signal(signal.SIGKILL)
            process.wait()
            return None
    assert process.returncode == 0, log.read_text()[-3000:]
    return time.perf_counter() - started


def adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def same_weights(a: Path, b: Path) -> None:
    first, second = adapter_weights(a), adapter_weights(b)
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=1e-5, rtol=1e-4, msg=name)


def dataset_rows(out: Path, name: str = "dataset") -> dict[str, list[dict]]:
    data = load_from_disk(str(out / name))
    return {split: data[split].to_list() for split in data}


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def same_output(stage: str, killed: Path, reference: Path) -> None:
    got, want = read_manifest(killed)["metrics"], read_manifest(reference)["metrics"]
    if stage in ("sft", "reward"):
        same_weights(killed, reference)
        assert got["global_step"] == want["global_step"]
        assert [r["step"] for r in history(killed)] == [r["step"] for r in history(reference)]
        if stage == "reward":
            assert got["reward_mean"] == pytest.approx(want["reward_mean"], abs=1e-4)
    elif stage == "ppo":
        same_weights(killed, reference)
        rows, expected = history(killed), history(reference)
        assert [r["prompts"] for r in rows] == [r["prompts"] for r in expected]
        assert [r["score_mean"] for r in rows] == pytest.approx([r["score_mean"] for r in expected], abs=1e-4)
    elif stage in ("self-instruct", "comparisons"):
        assert dataset_rows(killed) == dataset_rows(reference)
        if stage == "self-instruct":
            assert dataset_rows(killed, "discarded") == dataset_rows(reference, "discarded")
        resumed = {"resumed_steps", "resumed_prompts"}
        assert {k: v for k, v in got.items() if k not in resumed} == {k: v for k, v in want.items() if k not in resumed}
    else:
        def answers(path):
            return sorted((r["model"], r["cell"], r["question_id"], r["output"])
                          for r in load_from_disk(str(path / "examples")))

        assert answers(killed) == answers(reference)
        assert json.loads((killed / "summary.json").read_text())["accuracy_by_model"] == \
            json.loads((reference / "summary.json").read_text())["accuracy_by_model"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Comparisons for the reward stage, a reward model for PPO, a small RAG set: made once, uninterrupted."""
    root = tmp_path_factory.mktemp("inputs")
    log = root / "log"
    comparisons = root / "comparisons"
    run(["align.cli", "comparisons", "--config", str(ROOT / "configs" / "tiny" / "comparisons.yaml"), "--output_dir",
         str(comparisons)], log)
    reward = root / "reward"
    run(["align.cli", "reward", "--config", str(ROOT / "configs" / "tiny" / "reward.yaml"), "--dataset_name",
         str(comparisons), "--max_steps", "4", "--output_dir", str(reward)], log)
    questions = write_jsonl(root / "questions.jsonl", [
        {"id": f"q{i}", "question": f"What is the capital of {country}?", "answers": [city],
         "ctxs": [{"title": country, "text": f"{city} is the capital of {country}.", "isgold": True}]}
        for i, (country, city) in enumerate(CAPITALS)])
    return {"comparisons": comparisons, "reward": reward, "questions": questions}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "self-instruct", "comparisons", "rag eval"])
def test_killed_anywhere_the_rerun_ends_as_an_uninterrupted_run(stage, inputs, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    duration = run(stage_args(stage, reference, inputs), tmp_path / "reference.log")
    rng = random.Random(f"kill anywhere: {stage}")
    moments = sorted(rng.uniform(0.15, 0.95) * duration for _ in range(KILLS))
    outcomes = []
    for moment in moments:
        if killed.exists():  # finished before this kill point came
            break
        outcomes.append(run(stage_args(stage, killed, inputs), tmp_path / "killed.log", kill_after=moment))
        assert killed.exists() or not any(killed.parent.glob("killed.old")), "half-published output"
    if not killed.exists():
        run(stage_args(stage, killed, inputs), tmp_path / "killed.log")
    assert outcomes.count(None) >= 1, f"no kill landed (moments {moments}, run took {duration:.1f} s)"
    same_output(stage, killed, reference)
    assert not killed.with_name("killed.partial").exists()
