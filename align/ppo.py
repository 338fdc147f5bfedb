"""PPO against a reward model: the InstructGPT RL step, on transformers + peft (TRL no longer ships one).

This module holds the training loop; the arithmetic is in `align.ppo_math`.

- **Policy**: a causal LM (the SFT model: base with the SFT adapter merged) with a new trainable LoRA.
- **Reference**: the same weights with the LoRA disabled (`disable_adapter()`), so no second copy.
- **Reward**: any `RewardFunction` (prompts, responses) -> scores; the reward model stage provides one.
- **Value model**: a backbone with its own trainable LoRA and a linear head giving a value per token,
  initialised from the reward model's backbone and score head when there is one (as InstructGPT did).

One `PPOTrainer.step(prompts)`: sample responses (`align.generation`-style batched sampling), score them,
compute policy / reference log-probs and values in one forward pass each, turn the score and the per-token
KL into rewards, estimate advantages with GAE (whitened), then `ppo_epochs` passes over minibatches with
the clipped policy and value losses, an optional entropy bonus and gradient clipping.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from align import ppo_math

# (prompt texts, response texts) -> [B] scores; larger is better.
RewardFunction = Callable[[list[str], list[str]], torch.Tensor]


@dataclass
class PPOSettings:
    """The algorithm's knobs (the stage's config fields of the same names)."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    ppo_epochs: int = 4
    mini_batch_size: int = 4
    learning_rate: float = 1e-4
    value_learning_rate: float = 1e-4
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    max_grad_norm: float = 1.0
    init_kl_coef: float = 0.05
    target_kl: float | None = None  # adaptive KL coefficient when set (Ziegler et al. 2019)
    kl_horizon: int = 10000
    missing_eos_penalty: float | None = None  # added to the score of a response cut off at max_new_tokens
    whiten_advantages: bool = True
    seed: int = 42


class ValueModel(nn.Module):
    """A transformer backbone and a linear head: a value for every position (the value of the state after it)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # [B, T]


def value_model_from(model: nn.Module, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                     target_modules: str | list[str] = "all-linear") -> ValueModel:
    """A value model on `model`'s backbone with a new trainable LoRA and a trainable linear head.

    `model` is a causal LM (the head starts at zero: every value 0) or a sequence-classification reward
    model with its adapter merged (its score head is the starting point: values start as reward estimates).
    """
    from peft import LoraConfig, get_peft_model

    backbone = getattr(model, model.base_model_prefix)
    head = nn.Linear(model.config.hidden_size, 1, bias=False)
    score = getattr(model, "score", None)
    with torch.no_grad():
        if isinstance(score, nn.Linear) and score.out_features == 1:
            head.weight.copy_(score.weight.float())
        else:
            head.weight.zero_()
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
    return ValueModel(get_peft_model(backbone, lora), head.to(next(backbone.parameters()).dtype))


@dataclass
class Rollout:
    """One batch of sampled responses and everything PPO needs about them (tensors [B, T] unless noted)."""

    sequences: torch.Tensor  # [B, P + R] prompt (left-padded) + response tokens
    attention_mask: torch.Tensor  # [B, P + R]
    prompt_length: int  # P
    mask: torch.Tensor  # [B, R] response tokens up to and including the end-of-sequence token
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # [B]
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    responses: list[str]
    truncated: torch.Tensor  # [B] bool: no end-of-sequence token within max_new_tokens


class PPOTrainer:
    """Policy (with LoRA), value model and reward function, and the PPO step that improves the policy."""

    def __init__(self, policy, value_model: ValueModel, tokenizer, reward_fn: RewardFunction, settings: PPOSettings):
        self.policy, self.value_model, self.tokenizer = policy, value_model, tokenizer
        self.reward_fn, self.settings = reward_fn, settings
        self.kl_controller = ppo_math.KLController(settings.init_kl_coef, settings.target_kl, settings.kl_horizon)
        policy_params = [p for p in policy.parameters() if p.requires_grad]
        value_params = [p for p in value_model.parameters() if p.requires_grad]
        if not policy_params:
            raise ValueError("the policy has no trainable parameters: wrap it with a LoRA adapter first")
        self.optimizer = torch.optim.AdamW([
            {"params": policy_params, "lr": settings.learning_rate},
            {"params": value_params, "lr": settings.value_learning_rate},
        ])
        self.trainable = policy_params + value_params
        self.generator = torch.Generator().manual_seed(settings.seed)  # minibatch order
        eos = policy.generation_config.eos_token_id
        self.eos_ids = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
        self.step_count = 0

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # --- forward passes

    def _response_logits(self, model, sequences, attention_mask, prompt_length):
        """Logits at the positions that predict response tokens: [B, R, V]."""
        logits = model(input_ids=sequences, attention_mask=attention_mask).logits
        return logits[:, prompt_length - 1:-1]

    def _values(self, sequences, attention_mask, prompt_length):
        return self.value_model(sequences, attention_mask)[:, prompt_length - 1:-1]  # [B, R]

    # --- rollout

    @torch.no_grad()
    def rollout(self, prompt_texts: Sequence[str]) -> Rollout:
        """Sample one response per prompt and compute log-probs, values, scores, rewards and advantages."""
        s, tokenizer = self.settings, self.tokenizer
        tokenizer.padding_side = "left"
        batch = tokenizer(list(prompt_texts), return_tensors="pt", padding=True, add_special_tokens=False)
        batch = batch.to(self.device)
        self.policy.eval()
        self.value_model.eval()
        sequences = self.policy.generate(
            **batch, do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=None,
            max_new_tokens=s.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        )  # [B, P + R]
        prompt_length = batch["input_ids"].shape[1]
        response = sequences[:, prompt_length:]
        is_eos = torch.isin(response, torch.tensor(self.eos_ids, device=response.device))
        # Response tokens up to and including the first end-of-sequence token; generate pads after it.
        ended_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        mask = (ended_before == 0).float()
        truncated = ~is_eos.any(dim=1)
        attention_mask = torch.cat([batch["attention_mask"], mask.long()], dim=1)

        logits = self._response_logits(self.policy, sequences, attention_mask, prompt_length)
        logprobs = ppo_math.logprobs_of(logits, response)
        with self.policy.disable_adapter():
            ref_logits = self._response_logits(self.policy, sequences, attention_mask, prompt_length)
        ref_logprobs = ppo_math.logprobs_of(ref_logits, response)
        values = self._values(sequences, attention_mask, prompt_length).float()

        texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
                 for ids, m in zip(response, mask, strict=True)]
        scores = torch.as_tensor(self.reward_fn(list(prompt_texts), texts), dtype=torch.float32,
                                 device=self.device).reshape(-1)
        if s.missing_eos_penalty is not None:
            scores = scores + s.missing_eos_penalty * truncated.float()
        rewards, kl = ppo_math.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, self.kl_controller.beta)
        advantages, returns = ppo_math.gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask)
        return Rollout(sequences, attention_mask, prompt_length, mask, logprobs, ref_logprobs, values, scores,
                       rewards, kl, advantages, returns, texts, truncated)

    # --- optimisation

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches of the rollout; returns averaged statistics."""
        s = self.settings
        self.policy.train()
        self.value_model.train()
        size = rollout.sequences.shape[0]
        totals: dict[str, float] = {}
        updates = 0
        for _ in range(s.ppo_epochs):
            order = torch.randperm(size, generator=self.generator).tolist()
            for start in range(0, size, s.mini_batch_size):
                rows = torch.tensor(order[start:start + s.mini_batch_size], device=self.device)
                stats = self._minibatch_step(rollout, rows)
                for key, value in stats.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1
        return {key: value / updates for key, value in totals.items()}

    def _minibatch_step(self, rollout: Rollout, rows: torch.Tensor) -> dict[str, float]:
        s = self.settings
        sequences, attention_mask = rollout.sequences[rows], rollout.attention_mask[rows]
        mask, response = rollout.mask[rows], rollout.sequences[rows, rollout.prompt_length:]
        logits = self._response_logits(self.policy, sequences, attention_mask, rollout.prompt_length)
        logprobs = ppo_math.logprobs_of(logits, response)
        entropy = ppo_math.masked_mean(ppo_math.entropy_of(logits), mask)
        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask,
                                                 s.clip_range)
        values = self._values(sequences, attention_mask, rollout.prompt_length).float()
        vf_loss, vf_stats = ppo_math.value_loss(values, rollout.values[rows], rollout.returns[rows], mask,
                                                s.clip_range_value)
        loss = pg_loss + s.vf_coef * vf_loss - s.entropy_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, s.max_grad_norm)
        self.optimizer.step()
        return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": entropy.item(),
                "clipfrac": pg_stats["clipfrac"].item(), "approx_kl": pg_stats["approx_kl"].item(),
                "value_clipfrac": vf_stats["clipfrac"].item(), "grad_norm": float(grad_norm)}

    def step(self, prompt_texts: Sequence[str]) -> tuple[dict[str, float], Rollout]:
        """One PPO iteration on a batch of prompts: rollout, update, KL-coefficient update. Returns statistics."""
        rollout = self.rollout(prompt_texts)
        kl_per_response = ppo_math.masked_sum(rollout.kl, rollout.mask, dim=1)  # [B]
        lengths = rollout.mask.sum(1)
        stats = {
            "score_mean": rollout.scores.mean().item(), "score_std": rollout.scores.std(unbiased=False).item(),
            "kl": kl_per_response.mean().item(), "beta": self.kl_controller.beta,
            "response_length": lengths.mean().item(), "truncated": rollout.truncated.float().mean().item(),
            "explained_variance": ppo_math.explained_variance(rollout.values, rollout.returns, rollout.mask).item(),
            "reward_mean": ppo_math.masked_sum(rollout.rewards, rollout.mask, dim=1).mean().item(),
        }
        if not all(math.isfinite(stats[key]) for key in ("score_mean", "kl")):
            raise FloatingPointError(f"non-finite rollout statistics at step {self.step_count}: {stats}")
        stats.update(self.update(rollout))
        if not math.isfinite(stats["policy_loss"]) or not math.isfinite(stats["value_loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.step_count}: {stats}")
        self.kl_controller.update(stats["kl"], len(prompt_texts))
        self.step_count += 1
        return stats, rollout
