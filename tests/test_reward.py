"""The reward stage: the K-wise loss by hand, pair expansion, the collator, learning, and its outputs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from align import reward
from align.core.command import StageError
from align.core.outputs import read_manifest
from align.lm.precision import choose_precision, compute_in_fp32
from align.rlhf.ranking_loss import centering_penalty, kwise_loss, ranking_metrics
from align.rlhf.reward_model import encode_response, load_reward_model
from tests.conftest import write_jsonl

TINY = ["--model_name_or_path", "tiny-llama", "--report_to", "none", "--seed", "0"]


def test_ranking_pairs_skip_ties_and_count_k_choose_2():
    """Pairs run from better to worse; ties give none; a strict ranking of K gives C(K, 2) pairs."""
    assert reward.ranking_pairs([1, 0, 1]) == [(1, 0), (1, 2)]
    assert reward.ranking_pairs([0, 1]) == [(0, 1)]
    assert reward.ranking_pairs([0, 0]) == []
    for k in range(2, 10):
        ranks = list(range(k))
        random.Random(k).shuffle(ranks)
        assert len(reward.ranking_pairs(ranks)) == math.comb(k, 2)


def test_kwise_loss_equals_hand_computed_value_with_a_tie():
    """K = 3, ranks [0, 1, 1] (a tie), rewards [2, 1, 0]: pairs (0,1), (0,2); the loss is
    (-log s(1) - log s(2)) / 2 = (0.313262 + 0.126928) / 2 = 0.220095."""
    rewards = torch.tensor([2.0, 1.0, 0.0])
    pairs = reward.ranking_pairs([0, 1, 1])
    better = torch.tensor([p[0] for p in pairs])
    worse = torch.tensor([p[1] for p in pairs])
    for weighting in ("pair", "prompt"):  # one prompt: both weightings agree
        loss = kwise_loss(rewards, better, worse, torch.zeros(2, dtype=torch.long), 1, weighting=weighting)
        assert loss.item() == pytest.approx(0.220095, abs=1e-6)


def test_kwise_loss_weightings():
    """Prompt A has 3 pairs, prompt B one: 'pair' averages the 4 pairs, 'prompt' weighs each prompt the
    same (InstructGPT's 1/C(K,2)); a margin shifts every difference."""
    rewards = torch.tensor([1.0, 0.0, -1.0, 0.5, 0.0])  # A: responses 0-2 ranked [0,1,2]; B: 3-4 ranked [0,1]
    better = torch.tensor([0, 0, 1, 3])
    worse = torch.tensor([1, 2, 2, 4])
    prompt = torch.tensor([0, 0, 0, 1])
    nll = lambda d: -math.log(1 / (1 + math.exp(-d)))  # noqa: E731
    per_prompt = ((nll(1) + nll(2) + nll(1)) / 3 + nll(0.5)) / 2
    per_pair = (nll(1) + nll(2) + nll(1) + nll(0.5)) / 4
    assert kwise_loss(rewards, better, worse, prompt, 2, weighting="prompt").item() == pytest.approx(
        per_prompt, abs=1e-6)
    assert kwise_loss(rewards, better, worse, prompt, 2).item() == pytest.approx(per_pair, abs=1e-6)
    margins = torch.tensor([0.5, 1.0, 0.5, 0.5])
    expected_margin = ((nll(0.5) + nll(1) + nll(0.5)) / 3 + nll(0.0)) / 2
    got = kwise_loss(rewards, better, worse, prompt, 2, margins, weighting="prompt").item()
    assert got == pytest.approx(expected_margin, abs=1e-6)
    with pytest.raises(ValueError):
        kwise_loss(rewards, better, worse, prompt, 2, weighting="token")


def test_centering_penalty_matches_trl_for_pairs():
    """For K = 2 the centering term equals TRL's mean((r_chosen + r_rejected)^2)."""
    rewards = torch.tensor([1.0, 0.5, -2.0, 0.0])
    prompts = torch.tensor([0, 0, 1, 1])
    trl_value = ((1.0 + 0.5) ** 2 + (-2.0 + 0.0) ** 2) / 2
    assert centering_penalty(rewards, prompts, 2).item() == pytest.approx(trl_value)


def test_collator_keeps_each_prompt_whole():
    """Every response of every prompt is in the batch, pairs point inside their own prompt's block."""
    rows = [
        {"input_ids": [[1, 2, 3], [4], [5, 6]], "ranks": [2, 0, 1]},
        {"input_ids": [[7, 8], [9]], "ranks": [0, 1]},
    ]
    batch = reward.RankingCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 8, 0], [9, 0, 0]]
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 2, 1]
    assert batch["sequence_prompt"].tolist() == [0, 0, 0, 1, 1]
    pairs = list(zip(batch["better"].tolist(), batch["worse"].tolist(), strict=True))
    assert pairs == [(1, 0), (1, 2), (2, 0), (3, 4)]
    assert batch["pair_prompt"].tolist() == [0, 0, 0, 1]
    assert batch["num_prompts"] == 2


def test_encode_response_cuts_the_prompt_from_the_left(tiny_model_path):
    """Too long: the prompt loses its beginning, the response survives whole, and it is counted."""
    from align.lm.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    prompt = [{"role": "user", "content": "x" * 300 + " THE END OF THE QUESTION"}]
    ids, truncated = encode_response(tokenizer, prompt, "the answer", max_length=64)
    text = tokenizer.decode(ids)
    assert truncated == "prompt" and len(ids) == 64
    assert text.endswith("the answer<|im_end|>\n") and "THE END OF THE QUESTION" in text
    ids, truncated = encode_response(tokenizer, prompt, "y" * 100, max_length=64)
    assert truncated == "response" and len(ids) == 64
    text = tokenizer.decode(ids)
    assert text.startswith("ION<|im_end|>") and text.endswith("y" * 48)  # 16 prompt tokens: the question's end
    full, truncated = encode_response(tokenizer, prompt, "y" * 100, max_length=None)
    assert truncated is None and len(full) > 400
    ids, truncated = encode_response(tokenizer, "short?", "ok", max_length=200)
    assert truncated is None and tokenizer.decode(ids).endswith("ok<|im_end|>\n")


def test_ranking_metrics_by_hand():
    """Accuracy counts won pairs (ties in reward as half), by K too; margin is the mean difference."""
    metrics = ranking_metrics([[3.0, 1.0, 2.0], [0.0, 1.0]], [[0, 1, 2], [0, 1]])
    # pairs: (0,1) won +2, (0,2) won +1, (1,2) lost -1, second prompt (0,1) lost -1
    assert metrics["accuracy"] == pytest.approx(2 / 4)
    assert metrics["accuracy_by_k"] == {"2": 0.0, "3": pytest.approx(2 / 3)}
    assert metrics["mean_margin"] == pytest.approx((2 + 1 - 1 - 1) / 4)
    assert ranking_metrics([[1.0, 1.0]], [[0, 1]])["accuracy"] == 0.5


TOPICS = ["the weather", "a recipe", "my garden", "a train ride", "the library", "a bicycle", "the ocean",
          "a birthday", "the museum", "a quiet morning", "the city park", "an old friend"]


def identifiable_comparisons(count: int, seed: int) -> list[dict]:
    """Rows where quality is visible in the text: polite+helpful > neutral > rude shouting."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        topic = rng.choice(TOPICS)
        responses = [
            f"Thank you for asking about {topic}! Here is a helpful, friendly answer.",
            f"About {topic}: ok.",
            f"NO. {topic.upper()} IS STUPID!!! GO AWAY!!!",
        ]
        order = list(range(3))
        rng.shuffle(order)
        rows.append({
            "prompt": [{"role": "user", "content": f"Tell me about {topic} (#{index})."}],
            "responses": [responses[i] for i in order],
            "ranks": [i for i in order],  # responses[i] has rank i
        })
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reward")
    from datasets import Dataset, DatasetDict

    DatasetDict(
        train=Dataset.from_list(identifiable_comparisons(48, seed=1)),
        test=Dataset.from_list(identifiable_comparisons(16, seed=2)),
    ).save_to_disk(str(root / "comparisons" / "dataset"))
    return reward.main([*TINY, "--dataset_name", str(root / "comparisons"), "--output_dir", str(root / "rm"),
                        "--num_train_epochs", "4", "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                        "--logging_steps", "4", "--max_length", "256"])


def test_reward_model_learns_identifiable_rankings(trained):
    """Held-out pairwise accuracy is well above chance (0.5) and clearly above the untrained model's (seeded), and the
    training loss fell by more than half."""
    metrics = read_manifest(trained)["metrics"]
    assert metrics["eval_pairs"] == 16 * 3
    assert metrics["eval_accuracy"] >= 0.85, metrics
    assert metrics["eval_accuracy"] > metrics["eval_accuracy_before"] + 0.2  # seeded: 0.48 -> 1.0
    assert metrics["last_logged_loss"] < 0.5 * metrics["first_logged_loss"]
    assert set(metrics["eval_accuracy_by_k"]) == {"3"}


def test_outputs_and_reward_statistics(trained):
    """adapter/ holds LoRA + score head; load_reward_model reproduces the manifest's reward statistics."""
    manifest = read_manifest(trained)
    assert manifest["stage"] == "reward" and manifest["metrics"]["train_prompts"] == 48
    assert manifest["metrics"]["train_pairs"] == 48 * 3
    assert manifest["metrics"]["truncated_prompts"] == 0
    config = json.loads((trained / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in (config["modules_to_save"] or [])
    model, tokenizer, loaded = load_reward_model(trained)
    assert all(not p.requires_grad for p in model.parameters())
    rows = identifiable_comparisons(48, seed=1)
    from datasets import Dataset

    encoded, _ = reward.tokenize_comparisons(Dataset.from_list(rows), tokenizer, 256)
    # The statistics were measured at the precision the stage trained in (the score head in fp32): score alike.
    trained_in = choose_precision("bf16" if loaded["config"]["training"]["bf16"] else "fp32", "cpu")
    compute_in_fp32(model.get_base_model().score)
    with trained_in.autocast("cpu"):
        scores = reward.score_rows(model, encoded, reward.RankingCollator(tokenizer.pad_token_id))
    flat = [s for row in scores for s in row]
    mean = sum(flat) / len(flat)
    assert mean == pytest.approx(loaded["metrics"]["reward_mean"], abs=1e-3)
    assert loaded["metrics"]["reward_std"] > 0


def test_pairwise_rows_train_as_k2(tmp_path):
    """prompt/chosen/rejected rows are accepted and counted as one pair each."""
    rows = [{"prompt": f"Q{i}?", "chosen": "Thank you, here is help.", "rejected": "GO AWAY!!!"} for i in range(6)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = reward.main([*TINY, "--dataset_name", str(data), "--output_dir", str(tmp_path / "rm"), "--max_steps", "2",
                       "--eval_fraction", "0", "--max_length", "64"])
    metrics = read_manifest(out)["metrics"]
    assert metrics["train_pairs"] == 6 and metrics["eval_prompts"] == 0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "responses": ["a"], "ranks": [0]}, "row 0"),
        ({"prompt": "q", "responses": ["a", "b"], "ranks": [0, 2]}, "row 0"),
        ({"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1]}, "row 0"),
    ],
)
def test_invalid_rankings_are_refused(tmp_path, row, message):
    """K < 2, ranks that are not a dense ranking, and a length mismatch each stop the stage, naming the row."""
    data = write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(StageError, match=message):
        reward.main([*TINY, "--dataset_name", str(data), "--output_dir", str(tmp_path / "rm")])
    assert not (tmp_path / "rm").exists() and not (tmp_path / "rm.partial").exists()


@pytest.mark.slow
def test_reward_resumes_after_sigkill(tmp_path):
    """SIGKILL after the first checkpoint; the same command resumes from it and finishes all steps."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from datasets import Dataset, DatasetDict

    from tests.conftest import ROOT, run_align

    DatasetDict(train=Dataset.from_list(identifiable_comparisons(40, seed=3))).save_to_disk(str(tmp_path / "cmp"))
    out = tmp_path / "rm"
    args = ["reward", *TINY, "--dataset_name", str(tmp_path / "cmp"), "--output_dir", str(out), "--max_steps", "40",
            "--per_device_train_batch_size", "2", "--save_steps", "4", "--max_length", "192", "--eval_fraction", "0"]
    checkpoint = tmp_path / "rm.partial" / "checkpoints" / "checkpoint-4" / "trainer_state.json"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen([sys.executable, "-m", "align.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=log, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.time() + 120
        while not checkpoint.exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()
    second = run_align(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from checkpoint-" in second.stderr
    manifest = read_manifest(out)
    assert manifest["resumed_from"].startswith("checkpoint-") and manifest["metrics"]["global_step"] == 40


@pytest.mark.distributed
@pytest.mark.slow
def test_two_cpu_processes_train_the_reward_model(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: 2 CPU processes over gloo (with
    `--cpu` accelerate would start one). World size 2, both ranks ran every optimizer step, and the model still
    learns (each rank sees half the prompts of every step, whole prompts only)."""
    import os
    import shutil
    import subprocess
    import sys

    from datasets import Dataset, DatasetDict

    from tests.conftest import ROOT

    launcher = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert launcher, "accelerate not found next to the interpreter"
    DatasetDict(
        train=Dataset.from_list(identifiable_comparisons(32, seed=4)),
        test=Dataset.from_list(identifiable_comparisons(8, seed=5)),
    ).save_to_disk(str(tmp_path / "cmp"))
    out = tmp_path / "rm"
    result = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "align.reward", *TINY, "--dataset_name", str(tmp_path / "cmp"),
         "--output_dir", str(out), "--num_train_epochs", "4", "--per_device_train_batch_size", "2",
         "--learning_rate", "3e-3", "--logging_steps", "4", "--max_length", "256"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    steps = manifest["metrics"]["global_step"]
    assert manifest["distributed"]["world_size"] == 2
    assert manifest["distributed"]["steps_per_rank"] == [steps, steps]
    assert steps == 4 * 32 // (2 * 2)  # 4 epochs of 32 prompts, 2 prompts per rank per step
    assert manifest["metrics"]["eval_accuracy"] > manifest["metrics"]["eval_accuracy_before"]
    assert manifest["metrics"]["eval_accuracy"] >= 0.75
    assert not (tmp_path / "rm.partial").exists()
