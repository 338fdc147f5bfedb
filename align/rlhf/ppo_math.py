"""The arithmetic of PPO for language models, as pure functions on tensors (no models, no I/O).

Shapes: a batch of B responses padded to T tokens is a [B, T] tensor; `mask` [B, T] is 1.0 on response
tokens and 0.0 on padding after a response ends. Every reduction is masked, so padding never counts.

Sources for the formulas (our implementation):
- Schulman et al. 2017, "Proximal Policy Optimization Algorithms": clipped surrogate objective.
- Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation": GAE.
- Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences": per-token KL penalty against
  the reference model, the reward-model score on the last token, and the adaptive KL coefficient.
- Ouyang et al. 2022 (InstructGPT): the same recipe with a value model initialised from the reward model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (all of them, or along `dim`); 0 where nothing is unmasked."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the unmasked positions; the unbiased (n - 1) estimate by default."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / std over unmasked positions (mean kept when shift_mean is False); padding stays 0."""
    mean, variance = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, rows_per_chunk: int = 1) -> torch.Tensor:
    """log p(token) under `logits` [B, T, V] for `tokens` [B, T] -> [B, T], in float32.

    Computed as logit(token) - logsumexp(logits), `rows_per_chunk` rows at a time: no [B, T, V] float32
    log-softmax is ever materialised, only one chunk's [rows, T, V] at a time (the same numbers).
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()  # [B, T]
    normalisers = torch.cat([torch.logsumexp(chunk.float(), dim=-1)  # [rows, T]
                             for chunk in logits.split(rows_per_chunk, dim=0)])
    return picked - normalisers


def entropy_of(logits: torch.Tensor, rows_per_chunk: int = 1) -> torch.Tensor:
    """Entropy of each position's next-token distribution: [B, T, V] -> [B, T], in float32, chunk by chunk."""
    entropies = []
    for chunk in logits.split(rows_per_chunk, dim=0):
        log_probs = torch.log_softmax(chunk.float(), dim=-1)  # [rows, T, V]
        entropies.append(-(log_probs.exp() * log_probs).sum(-1))
    return torch.cat(entropies)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last unmasked position ([B]); 0 for an empty row."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).max(dim=1).values


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * (log pi - log pi_ref) on every response token, plus the score on the last.

    Args:
        scores: [B] reward-model scores of the whole responses (normalised, any penalty applied).
        logprobs: [B, T] log-probabilities of the sampled tokens under the policy at sampling time.
        ref_logprobs: [B, T] the same under the reference model.
        mask: [B, T] response tokens.
        beta: KL coefficient.

    Returns:
        (rewards [B, T], kl [B, T]): padding positions are 0 in both. kl is the per-token estimate
        log pi - log pi_ref, whose sum over a response estimates KL(pi || pi_ref) for that response.
    """
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimates and returns, computed backwards over each response.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero after the
    last response token (the episode ends there). Returns (advantages, returns = advantages + values), both
    [B, T] and 0 on padding. Advantages are not whitened here (see `masked_whiten`).
    """
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = advantage
        # A padded position passes nothing back, so the last real token bootstraps from 0.
        next_advantage = advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss, averaged over response tokens.

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = exp(log pi - log pi_old).

    Returns:
        (loss, stats): stats has `clipfrac` (share of tokens where the clipped term was taken) and `approx_kl`
        (mean of 0.5 * (log pi - log pi_old)^2, a low-variance estimate of KL(pi_old || pi)).
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approx_kl": masked_mean(0.5 * log_ratio ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)) over response tokens.

    Returns:
        (loss, stats): stats has `clipfrac` (share of tokens where the clipped error was the larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, {"clipfrac": masked_mean((clipped_error > unclipped_error).float(), mask)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over response tokens: 1 is a perfect critic, <= 0 a useless one."""
    variance = masked_var(returns, mask)
    if variance <= 0:
        return torch.tensor(float("nan"))
    return 1 - masked_var(returns - values, mask) / variance


@dataclass
class KLController:
    """The KL coefficient beta: fixed, or adaptive (Ziegler et al. 2019) when `target` is set.

    Adaptive: after each batch, error = clip(KL / target - 1, -0.2, 0.2) and beta *= 1 + error * n / horizon,
    where KL is the batch's mean per-response KL and n the number of responses in it: beta grows while the
    policy drifts further than the target and shrinks while it stays closer.
    """

    beta: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_responses: int) -> float:
        """Adjust beta after a batch (no-op when fixed); returns the new beta."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.beta *= 1.0 + error * n_responses / self.horizon
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.target, self.horizon = state["beta"], state["target"], state["horizon"]
