"""Training a reward model on whole rankings: the collator, tokenization, scoring and the Trainer.

A batch holds whole prompts: the K responses of a prompt are encoded once each and all of its pairs are
in the same batch (`RankingCollator`). `RankingRewardTrainer` is transformers' Trainer with the K-wise
loss and ranking evaluation; TRL's RewardTrainer takes chosen/rejected pairs only."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import Trainer

from align.rlhf.ranking_loss import centering_penalty, kwise_loss, ranking_metrics, ranking_pairs
from align.rlhf.reward_model import encode_response, sequence_rewards


class RankingCollator:
    """Flattens a batch of whole prompts into one padded batch of responses plus the pair indices.

    Rows carry `input_ids` (list of K token lists) and `ranks` (K ints); the collator never splits a
    prompt: its K sequences and all its pairs are in the same batch.
    """

    def __init__(self, pad_token_id: int, rank_margin: float = 0.0):
        self.pad_token_id = pad_token_id
        self.rank_margin = rank_margin

    def __call__(self, rows: list[dict]) -> dict:
        sequences, sequence_prompt, better, worse, pair_prompt, margins = [], [], [], [], [], []
        for prompt_index, row in enumerate(rows):
            offset = len(sequences)
            sequences.extend(row["input_ids"])
            sequence_prompt.extend([prompt_index] * len(row["input_ids"]))
            for i, j in ranking_pairs(row["ranks"]):
                better.append(offset + i)
                worse.append(offset + j)
                pair_prompt.append(prompt_index)
                margins.append(self.rank_margin * (row["ranks"][j] - row["ranks"][i]))
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)  # [N, L]
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [N, L]
        for index, sequence in enumerate(sequences):  # right padding: the reward is read at the last token
            input_ids[index, : len(sequence)] = torch.tensor(sequence)
            attention_mask[index, : len(sequence)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "sequence_prompt": torch.tensor(sequence_prompt),
            "better": torch.tensor(better, dtype=torch.long),
            "worse": torch.tensor(worse, dtype=torch.long),
            "pair_prompt": torch.tensor(pair_prompt, dtype=torch.long),
            "margins": torch.tensor(margins, dtype=torch.float),
            "num_prompts": len(rows),
        }


def tokenize_comparisons(data: Dataset, tokenizer, max_length: int) -> tuple[Dataset, dict]:
    """Add `input_ids` (K token lists per row); count truncations instead of dropping anything."""
    counts = {"prompt": 0, "response": 0}

    def encode(row):
        ids = []
        for response in row["responses"]:
            encoded, truncated = encode_response(tokenizer, row["prompt"], response, max_length)
            if truncated:
                counts[truncated] += 1
            ids.append(encoded)
        return {"input_ids": ids}

    encoded = data.map(encode, desc="tokenizing", load_from_cache_file=False)
    return encoded, {"truncated_prompts": counts["prompt"], "truncated_responses": counts["response"]}


@torch.no_grad()
def score_rows(model, rows: Dataset, collator: RankingCollator, batch_size: int = 8) -> list[list[float]]:
    """Rewards of every response of every row (tokenized), in order."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        batch_rows = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = collator(batch_rows)
        rewards = sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        rewards = rewards.float().cpu().tolist()
        offset = 0
        for row in batch_rows:
            scores.append(rewards[offset: offset + len(row["input_ids"])])
            offset += len(row["input_ids"])
    return scores


class RankingRewardTrainer(Trainer):
    """transformers' Trainer with the K-wise loss and ranking evaluation."""

    def __init__(self, *args, rank_collator: RankingCollator, center_rewards_coefficient: float | None = None,
                 pair_weighting: str = "pair", **kwargs):
        super().__init__(*args, data_collator=rank_collator, **kwargs)
        self.rank_collator = rank_collator
        self.pair_weighting = pair_weighting
        self.center_rewards_coefficient = center_rewards_coefficient
        self.model_accepts_loss_kwargs = False  # our loss is already a mean; let Trainer scale for accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = sequence_rewards(model, inputs["input_ids"], inputs["attention_mask"])  # [N]
        loss = kwise_loss(rewards, inputs["better"], inputs["worse"], inputs["pair_prompt"],
                          inputs["num_prompts"], inputs["margins"], self.pair_weighting)
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * centering_penalty(
                rewards, inputs["sequence_prompt"], inputs["num_prompts"])
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        scores = score_rows(model, dataset, self.rank_collator, self.args.per_device_eval_batch_size)
        model.train(was_training)
        metrics = ranking_metrics(scores, dataset["ranks"])
        flat = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if k != "accuracy_by_k"}
        flat.update({f"{metric_key_prefix}_accuracy_k{k}": v for k, v in metrics["accuracy_by_k"].items()})
        self.log(flat)
        return flat
