"""How good is a judge: grouped cross-validation and its figures, the embedding judge, and the two-pass step
that bounds a reward model's memory."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from datasets import Dataset, DatasetDict

from align import reward
from align.core.outputs import read_manifest
from align.preferences.cross_validation import (
    agreement,
    bootstrap_interval,
    conversation_key,
    cross_validate,
    fold_problem,
    grouped_folds,
    pair_records,
    ranking_report,
    within_prompt_length_correlation,
)
from align.rlhf.embedding_judge import EmbeddingJudge
from tests.conftest import run_align
from tests.test_reward import TINY, identifiable_comparisons


def chat(first: str, *later: str) -> list[dict]:
    turns = [{"role": "user", "content": first}]
    for index, text in enumerate(later):
        turns += [{"role": "assistant", "content": f"reply {index}"}, {"role": "user", "content": text}]
    return turns


# ----------------------------------------------------------------------------- folds


def test_conversation_key_ties_the_turns_of_one_conversation():
    """Rankings deeper in one conversation share its first turn's key; a string prompt is its own first turn."""
    assert conversation_key(chat("How do I bake bread?")) == conversation_key(chat("How do I bake bread?", "And rye?"))
    assert conversation_key(chat("How do I bake bread?")) != conversation_key(chat("How do I bake cake?"))
    assert conversation_key("How do I bake bread?") == conversation_key(chat("How do I bake bread?"))


def test_grouped_folds_never_split_a_conversation_and_stay_balanced():
    rng = random.Random(0)
    keys = [f"tree{rng.randrange(40)}" for _ in range(300)]
    for count in (2, 3, 5, 10):
        folds = grouped_folds(keys, count, seed=1)
        fold_of: dict[str, int] = {}
        for key, fold in zip(keys, folds, strict=True):
            assert fold_of.setdefault(key, fold) == fold  # every row of a conversation is in one fold
        sizes = [folds.count(f) for f in range(count)]
        assert min(sizes) > 0 and max(sizes) - min(sizes) <= max(keys.count(k) for k in set(keys))
    assert grouped_folds(keys, 5, seed=1) == grouped_folds(keys, 5, seed=1)  # seeded
    assert grouped_folds(keys, 5, seed=1) != grouped_folds(keys, 5, seed=2)


def test_fold_problems_are_said_in_one_line():
    assert "at least 2" in fold_problem(1, 10) and "at least 2" in fold_problem(-3, 10)
    assert "more folds than the 4 conversations" in fold_problem(5, 4)
    assert fold_problem(4, 4) is None
    with pytest.raises(ValueError):
        grouped_folds(["a", "a", "b"], 3, seed=0)


# ----------------------------------------------------------------------------- the figures


def test_ranking_report_by_hand():
    """Two conversations, three rankings. Pairs (better, worse) and whether the judge got them right:
    row 0 (conv A, fold 0), ranks [0,1,2], scores [3,1,2]: (0,1) yes, (0,2) yes, (1,2) no;
    row 1 (conv A, fold 0), ranks [0,1], scores [1,1]: a tie, half;
    row 2 (conv B, fold 1), ranks [1,0], scores [0,5]: (1,0) yes.
    Accuracy (1+1+0+0.5+1)/5 = 0.7; fold 0: 2.5/4, fold 1: 1/1; K=3: 2/3, K=2: 1.5/2.
    Lengths in words: row 0 [4,1,2] -> the longer wins (0,1) and (0,2), loses (1,2); row 1 [1,1] tie;
    row 2 [1,3]: the better (index 1) is longer. Longer-is-better: (1+1+0+0.5+1)/5 = 0.7."""
    responses = [["a b c d", "a", "a b"], ["x", "y"], ["p", "q r s"]]
    scores = [[3.0, 1.0, 2.0], [1.0, 1.0], [0.0, 5.0]]
    ranks = [[0, 1, 2], [0, 1], [1, 0]]
    records = pair_records(scores, ranks, responses, ["A", "A", "B"], [0, 0, 1])
    report = ranking_report(records)
    assert report["pairs"] == 5 and report["conversations"] == 2
    assert report["accuracy"] == pytest.approx(0.7)
    assert report["accuracy_by_fold"] == {"0": pytest.approx(2.5 / 4), "1": 1.0}
    assert report["accuracy_by_k"] == {"2": pytest.approx(0.75), "3": pytest.approx(2 / 3)}
    assert report["longer_is_better_accuracy"] == pytest.approx(0.7)
    # gaps: (0,1) 3/4, (0,2) 2/4, (1,2) 1/2, tie 0, (1,0) 2/3 -> bins >=60%: 2 pairs, 30-60%: 2, <10%: 1
    assert report["pairs_by_length_gap"] == {"<10%": 1, "10-30%": 0, "30-60%": 2, ">=60%": 2}
    assert report["accuracy_by_length_gap"]["10-30%"] is None  # nothing to measure: None, never NaN
    low, high = report["accuracy_low"], report["accuracy_high"]
    assert low <= report["accuracy"] <= high and low >= 0.5 and high <= 1.0  # conversation means 0.625 and 1.0


def test_bootstrap_resamples_conversations():
    """All pairs of one conversation right and all of another wrong: the interval spans both, however many pairs
    each has; one conversation gives no interval."""
    records = [{"group": "A", "correct": 1.0}] * 50 + [{"group": "B", "correct": 0.0}] * 50
    low, high = bootstrap_interval(records, seed=3)
    assert low == 0.0 and high == 1.0
    assert bootstrap_interval(records[:50]) == (None, None)


def test_length_correlation_and_agreement():
    responses = [["one", "one two three four"], ["a b c", "a"]]
    log_length = [[math.log1p(1), math.log1p(4)], [math.log1p(3), math.log1p(1)]]
    assert within_prompt_length_correlation(log_length, responses) == pytest.approx(1.0)
    assert within_prompt_length_correlation([[-v for v in row] for row in log_length], responses) == pytest.approx(-1)
    by_length = [[1.0, 4.0], [3.0, 1.0]]
    ranks = [[0, 1], [1, 0]]
    assert agreement(by_length, by_length, ranks) == 1.0
    assert agreement(by_length, [[0.0, 1.0], [1.0, 3.0]], ranks) == 0.5  # row 0 alike, row 1 opposite
    assert agreement(by_length, [[1.0, 1.0], [3.0, 1.0]], ranks) == 0.75  # a tie counts half


def test_cross_validate_resumes_from_its_journal(tmp_path):
    """Every row is scored by the judge trained without its fold; a re-run after a kill fits only the missing
    folds; a journal record that no longer matches its fold is redone."""
    folds = [0, 1, 2, 0, 1, 2]
    calls = []

    def fit_and_score(train, held_out, fold):
        calls.append(fold)
        assert not set(train) & set(held_out) and sorted(train + held_out) == list(range(6))
        return [[float(fold), float(row)] for row in held_out]

    journal = tmp_path / "cv" / "folds.jsonl"
    scores, seconds = cross_validate(folds, fit_and_score, journal)
    assert calls == [0, 1, 2] and len(seconds) == 3
    assert scores == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    lines = journal.read_text().splitlines()
    journal.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed while writing fold 1
    calls.clear()
    assert cross_validate(folds, fit_and_score, journal)[0] == scores
    assert calls == [1, 2]
    calls.clear()
    assert cross_validate([1, 0, 2, 1, 0, 2], fit_and_score, journal)[0][0] == [1.0, 0.0]  # other folds: redone
    assert calls == [0, 1]  # fold 2 holds the same rows as before


# ----------------------------------------------------------------------------- the two-pass step


def test_two_pass_step_gives_the_full_batch_gradients(tiny_model_path, tmp_path, one_thread):
    """Groups of 2 sequences (length-sorted, trimmed): the same loss and the same parameter gradients as the whole
    batch in one pass, also with a margin and the centering term."""
    from peft import get_peft_model
    from transformers import TrainingArguments, set_seed
    from trl.trainer.utils import disable_dropout_in_model

    from align.lm.models import load_tokenizer, lora_config
    from align.rlhf.ranking_trainer import RankingCollator, RankingRewardTrainer, tokenize_comparisons
    from align.rlhf.reward_model import build_reward_model

    tokenizer = load_tokenizer(tiny_model_path)
    rows = identifiable_comparisons(3, seed=4)
    rows[1]["responses"][0] += " And a much longer answer, to make the lengths differ a lot." * 3
    encoded, _ = tokenize_comparisons(Dataset.from_list(rows), tokenizer, 256)
    collator = RankingCollator(tokenizer.pad_token_id, rank_margin=0.3)
    batch = collator([encoded[i] for i in range(3)])
    set_seed(0)
    model = build_reward_model(tiny_model_path, tokenizer, None)
    model = get_peft_model(model, lora_config(reward.RewardModelConfig(model_name_or_path="tiny-llama", lora_r=4)))
    disable_dropout_in_model(model)  # as the stage does by default: the two passes then compute the same function
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    gradients = {}
    for limit in (None, 2):
        trainer = RankingRewardTrainer(model=model, args=args, train_dataset=encoded, rank_collator=collator,
                                       sequences_per_pass=limit, center_rewards_coefficient=0.01,
                                       pair_weighting="prompt")
        trainer.current_gradient_accumulation_steps = 1
        model.zero_grad()
        loss = trainer.training_step(model, dict(batch))
        gradients[limit] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    (full_loss, full), (split_loss, split) = gradients[None], gradients[2]
    assert batch["input_ids"].shape[0] == 9 and full_loss > 0
    assert split_loss == pytest.approx(full_loss, rel=1e-5)
    assert full.keys() == split.keys() and len(full) > 4
    for name in full:
        assert torch.allclose(full[name], split[name], rtol=1e-4, atol=1e-6), name
    assert any(g.abs().sum() > 0 for g in split.values())


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Comparisons where quality is visible in the text (polite and helpful > curt > rude), 40 train, 12 test."""
    root = tmp_path_factory.mktemp("planted")
    data = DatasetDict(train=Dataset.from_list(identifiable_comparisons(40, seed=5)),
                       test=Dataset.from_list(identifiable_comparisons(12, seed=6)))
    data.save_to_disk(str(root / "cmp" / "dataset"))
    return root


def test_embedding_judge_learns_a_planted_preference(planted):
    """Cross-validated and held-out accuracy well above chance, the untrained head near chance; judge/ loads as a
    reward function whose normalised scores of the training responses have mean 0 and std 1."""
    out = reward.main(["--backbone", "embedding", "--dataset_name", str(planted / "cmp"), "--output_dir",
                       str(planted / "judge"), "--cv_folds", "4", "--report_to", "none"])
    metrics = read_manifest(out)["metrics"]
    assert metrics["eval_accuracy"] >= 0.9 and metrics["eval_accuracy"] > metrics["eval_accuracy_before"] + 0.2
    cv = metrics["cv"]
    assert cv["accuracy"] >= 0.9 and cv["accuracy_low"] > 0.6 and cv["folds"] == 4 and cv["pairs"] == 52 * 3
    assert len(cv["accuracy_by_fold"]) == 4 and len(cv["fold_seconds"]) == 4
    assert (out / "judge" / "head.safetensors").exists() and not (out / "adapter").exists()
    judge = EmbeddingJudge.from_output(out)
    rows = identifiable_comparisons(40, seed=5)
    prompts = [row["prompt"] for row in rows for _ in row["responses"]]
    scores = judge(prompts, [r for row in rows for r in row["responses"]])
    assert scores.mean().item() == pytest.approx(0.0, abs=1e-3) and scores.std().item() == pytest.approx(1.0, 1e-3)


def test_lm_reward_stage_cross_validates_then_trains(planted, one_thread):
    """--cv_folds 3 on the tiny model: every ranking held out once, figures in the manifest and the model card,
    then the final model as usual; --cv_only stops after the folds."""
    out = reward.main([*TINY, "--dataset_name", str(planted / "cmp"), "--output_dir", str(planted / "rm"),
                       "--cv_folds", "3", "--num_train_epochs", "3", "--learning_rate", "3e-3", "--max_length", "96",
                       "--sequences_per_pass", "4"])
    metrics = read_manifest(out)["metrics"]
    assert metrics["cv"]["pairs"] == 52 * 3 and metrics["cv"]["accuracy"] >= 0.75
    assert metrics["eval_accuracy"] >= 0.75
    assert "cv.accuracy" in (out / "adapter" / "README.md").read_text()
    journal = [json.loads(line) for line in (out / "cv" / "folds.jsonl").read_text().splitlines()]
    assert sorted(i for record in journal for i in record["rows"]) == list(range(52))
    only = reward.main([*TINY, "--dataset_name", str(planted / "cmp"), "--output_dir", str(planted / "cv_only"),
                        "--cv_folds", "2", "--cv_only", "true", "--max_steps", "2", "--max_length", "96"])
    assert sorted(p.name for p in only.iterdir()) == ["cv", "logs", "manifest.json"]
    assert read_manifest(only)["metrics"]["cv"]["folds"] == 2


@pytest.mark.parametrize("arguments, phrase", [
    (["--cv_folds", "1"], "--cv_folds must be 0 (no cross-validation) or at least 2, got 1"),
    (["--cv_folds", "60"], "--cv_folds 60 is more folds than the"),
    (["--cv_only", "true"], "--cv_only needs --cv_folds"),
    (["--backbone", "embedding", "--cv_folds", "1"], "--cv_folds must be 0"),
])
def test_bad_cross_validation_options(planted, tmp_path, arguments, phrase):
    """One line, exit code 2, nothing on disk."""
    result = run_align("reward", *TINY, "--dataset_name", planted / "cmp", "--output_dir", tmp_path / "rm",
                       *arguments)
    assert result.returncode == 2, result.stderr[-2000:]
    assert phrase in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "rm").exists() and not (tmp_path / "rm.partial").exists()


def test_ppo_refuses_an_embedding_judge(planted, tmp_path):
    judge = planted / "judge_for_ppo"
    judge.mkdir(exist_ok=True)
    manifest = {"stage": "reward", "config": {"model": {"backbone": "embedding"}}}
    (judge / "manifest.json").write_text(json.dumps(manifest))
    result = run_align("ppo", "--config", "configs/tiny/ppo.yaml", "--reward_model", judge, "--output_dir",
                       tmp_path / "ppo")
    assert result.returncode == 2 and "is an embedding judge" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "ppo").exists()
