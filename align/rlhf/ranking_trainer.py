"""Training a reward model on whole rankings: the collator, tokenization, scoring and the Trainer.

A batch holds whole prompts: the K responses of a prompt are encoded once each and all of its pairs are
in the same batch (`RankingCollator`). `RankingRewardTrainer` is transformers' Trainer with the K-wise
loss and ranking evaluation; TRL's RewardTrainer takes chosen/rejected pairs only.

Memory: the loss couples every response of a prompt, so a batch's activations would all be alive at once
(4 prompts x ~3.4 OASST replies x 384 tokens is ~13 GB in fp32). With `sequences_per_pass` the step runs
in two passes instead: the rewards of all sequences without a graph, the loss and its gradient with
respect to those rewards (a vector of N numbers), then each group of at most `sequences_per_pass`
sequences again with a graph, back-propagating its rewards times their gradient. By the chain rule the
parameter gradients are those of the full batch; groups are cut from the length-sorted batch and trimmed
to their own longest sequence, so the padding the full batch would compute is mostly skipped.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch
from accelerate.utils import DistributedType
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import Trainer

from align.rlhf.ranking_loss import centering_penalty, kwise_loss, ranking_metrics, ranking_pairs
from align.rlhf.reward_model import encode_response, sequence_rewards

logger = logging.getLogger("align")


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


def length_groups(attention_mask: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Indices of the batch's sequences, longest first, in groups of at most `size`."""
    order = torch.argsort(attention_mask.sum(1), descending=True, stable=True)
    return list(order.split(size))


def group_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor):
    """The sequences at `index`, trimmed to the longest of them (right padding, so nothing real is cut)."""
    width = int(attention_mask[index].sum(1).max())
    return input_ids[index, :width], attention_mask[index, :width]


@torch.no_grad()
def score_rows(model, rows: Dataset, collator: RankingCollator, batch_size: int = 8,
               desc: str | None = None) -> list[list[float]]:
    """Rewards of every response of every row (tokenized), in order; a progress bar when `desc` is given."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=desc is None, leave=False):
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
                 pair_weighting: str = "pair", sequences_per_pass: int | None = None, **kwargs):
        super().__init__(*args, data_collator=rank_collator, **kwargs)
        self.rank_collator = rank_collator
        self.pair_weighting = pair_weighting
        self.center_rewards_coefficient = center_rewards_coefficient
        self.sequences_per_pass = sequences_per_pass
        if sequences_per_pass and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in self.model.modules()):
            logger.warning("dropout is on: the two passes of a step draw different masks, so its gradients only "
                           "approximate the whole batch's — keep disable_dropout true, or set sequences_per_pass 0")
        self.model_accepts_loss_kwargs = False  # our loss is already a mean; let Trainer scale for accumulation

    def loss_of_rewards(self, rewards: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The K-wise loss (plus the centering term) of the batch's [N] rewards."""
        loss = kwise_loss(rewards, inputs["better"], inputs["worse"], inputs["pair_prompt"],
                          inputs["num_prompts"], inputs["margins"], self.pair_weighting)
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * centering_penalty(
                rewards, inputs["sequence_prompt"], inputs["num_prompts"])
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = sequence_rewards(model, inputs["input_ids"], inputs["attention_mask"])  # [N]
        loss = self.loss_of_rewards(rewards, inputs)
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        limit = self.sequences_per_pass
        if (not limit or inputs["input_ids"].shape[0] <= limit
                or self.accelerator.distributed_type == DistributedType.DEEPSPEED):  # DeepSpeed: one backward a step
            return super().training_step(model, inputs, num_items_in_batch)
        return self.two_pass_step(model, inputs)

    def two_pass_step(self, model, inputs) -> torch.Tensor:
        """One step in groups of `sequences_per_pass` sequences with the full batch's gradients (module docstring).
        Exact when the forward pass is deterministic (dropout off, as the reward stage has it by default)."""
        model.train()
        inputs = self._prepare_inputs(inputs)
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        groups = length_groups(attention_mask, self.sequences_per_pass)
        rewards = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)  # [N]
        with torch.no_grad(), self.compute_loss_context_manager():
            for index in groups:
                rewards[index] = sequence_rewards(model, *group_inputs(input_ids, attention_mask, index)).float()
        rewards.requires_grad_(True)
        loss = self.loss_of_rewards(rewards, inputs)
        (reward_grad,) = torch.autograd.grad(loss, rewards)  # [N]
        scale = 1.0 / self.current_gradient_accumulation_steps
        for number, index in enumerate(groups):
            last = number == len(groups) - 1
            with (nullcontext() if last else self.accelerator.no_sync(model)):  # DDP: all-reduce once, at the end
                with self.compute_loss_context_manager():
                    group_rewards = sequence_rewards(model, *group_inputs(input_ids, attention_mask, index))
                self.accelerator.backward((group_rewards.float() * reward_grad[index]).sum() * scale)
        return loss.detach() * scale

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        scores = score_rows(model, dataset, self.rank_collator, self.args.per_device_eval_batch_size,
                            desc=f"{metric_key_prefix}: scoring {len(dataset)} prompts")
        model.train(was_training)
        metrics = ranking_metrics(scores, dataset["ranks"])
        flat = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if k != "accuracy_by_k"}
        flat.update({f"{metric_key_prefix}_accuracy_k{k}": v for k, v in metrics["accuracy_by_k"].items()})
        self.log(flat)
        return flat
