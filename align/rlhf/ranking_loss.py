"""The K-wise ranking loss of a reward model, and ranking accuracy (pure functions on tensors and lists).

For a prompt with K ranked responses every ordered pair (i ranked above j; ties give no pair) adds
-log sigmoid(r_i - r_j - margin); `kwise_loss` averages over pairs, or per prompt first (InstructGPT's
1/C(K,2) normalisation)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from align.preferences.format import ranking_pairs  # noqa: F401 - part of this module's interface


def kwise_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    pair_prompt: torch.Tensor,
    num_prompts: int,
    margins: torch.Tensor | None = None,
    weighting: str = "pair",
) -> torch.Tensor:
    """-log sigmoid(r_better - r_worse - margin), averaged over the batch's pairs.

    `weighting="pair"`: the mean over all ordered pairs of the batch, so a prompt counts as many times as
    it has pairs (the same weight TRL gives pairs). `weighting="prompt"`: the mean over each prompt's
    pairs, then over prompts (InstructGPT's 1/C(K,2) normalisation), so every prompt counts once.

    Args:
        rewards: [N] one scalar per response in the batch (all prompts' responses, flattened).
        better, worse: [P] indices into `rewards` of each pair's preferred and dispreferred response.
        pair_prompt: [P] which prompt (0..num_prompts-1) each pair belongs to.
        num_prompts: prompts in the batch that have at least one pair.
        margins: [P] optional margin each pair must be won by.
        weighting: "pair" or "prompt" (see above).

    Returns:
        A scalar tensor.
    """
    difference = rewards[better] - rewards[worse]  # [P]
    if margins is not None:
        difference = difference - margins
    pair_losses = -F.logsigmoid(difference)  # [P]
    if weighting == "pair":
        return pair_losses.mean()
    if weighting != "prompt":
        raise ValueError(f"weighting must be 'pair' or 'prompt', got {weighting!r}")
    pairs_per_prompt = torch.bincount(pair_prompt, minlength=num_prompts).clamp(min=1)  # [B]
    per_prompt = torch.zeros(num_prompts, dtype=pair_losses.dtype, device=pair_losses.device)
    per_prompt = per_prompt.index_add(0, pair_prompt, pair_losses) / pairs_per_prompt  # [B]
    return per_prompt.mean()


def centering_penalty(rewards: torch.Tensor, sequence_prompt: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Mean over prompts of (2 * mean reward of the prompt's responses)^2; equals TRL's
    mean((r_chosen + r_rejected)^2) when K = 2, and keeps rewards centred on zero for any K.

    Args:
        rewards: [N]; sequence_prompt: [N] the prompt index of each response.
    """
    sums = torch.zeros(num_prompts, dtype=rewards.dtype, device=rewards.device).index_add(0, sequence_prompt, rewards)
    counts = torch.bincount(sequence_prompt, minlength=num_prompts).clamp(min=1)
    return ((2 * sums / counts) ** 2).mean()


def ranking_metrics(scores: list[list[float]], ranks: list[list[int]]) -> dict:
    """Pairwise accuracy (ties in the reward count as half), overall and by K, and the mean margin
    r_better - r_worse over all ordered pairs of the rankings."""
    correct, margins = 0.0, []
    by_k: dict[int, list[float]] = defaultdict(list)
    for row_scores, row_ranks in zip(scores, ranks, strict=True):
        for i, j in ranking_pairs(row_ranks):
            won = 1.0 if row_scores[i] > row_scores[j] else 0.5 if row_scores[i] == row_scores[j] else 0.0
            correct += won
            by_k[len(row_ranks)].append(won)
            margins.append(row_scores[i] - row_scores[j])
    pairs = len(margins)
    return {
        "accuracy": correct / pairs if pairs else float("nan"),
        "mean_margin": sum(margins) / pairs if pairs else float("nan"),
        "pairs": pairs,
        "accuracy_by_k": {str(k): sum(v) / len(v) for k, v in sorted(by_k.items())},
    }


def reward_statistics(scores: list[list[float]]) -> dict:
    """The mean and (sample) std of the rewards of every response (PPO and the judges normalise with them)."""
    rewards = [r for row in scores for r in row]
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(1, len(rewards) - 1))
    return {"reward_mean": mean, "reward_std": std}
