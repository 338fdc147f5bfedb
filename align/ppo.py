"""PPO against a reward model: the InstructGPT RL step, on transformers + peft (TRL no longer ships one).

    align ppo --config configs/ppo.yaml        # SFT adapter + reward model + Self-Instruct prompts
    align ppo --config configs/tiny/ppo.yaml   # the tiny model, seconds

This module holds the loop (`PPOTrainer`) and the stage around it (`main`); the arithmetic is in
`align.ppo_math`.

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

import dataclasses
import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from align import ppo_math
from align.common import (
    StageError,
    StageOutput,
    append_jsonl,
    base_manifest,
    load_stage_dataset,
    now_iso,
    parse_config,
    read_manifest,
    run_stage,
)
from align.hub import check_stage_push, push_after_stage, write_model_card
from align.models import DEFAULT_MODEL, adapter_dir, load_causal_lm, load_tokenizer, merge_adapter, resolve_model
from align.training import RunArguments, latest_checkpoint, run_identity, truncate_history

# (prompts as given: text or chat messages, response texts) -> [B] scores; larger is better.
RewardFunction = Callable[[list, list[str]], torch.Tensor]


@dataclass
class PPOSettings:
    """The algorithm's knobs (the stage's config fields of the same names)."""

    max_new_tokens: int = field(default=48, metadata={"help": "Longest sampled response in tokens."})
    temperature: float = field(default=1.0,
        metadata={"help": "Sampling temperature (> 0); log-probs are taken at the same temperature."})
    top_p: float = field(default=1.0,
        metadata={"help": "Nucleus sampling mass (0 < p <= 1); 1 samples from the policy itself."})
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    mini_batch_size: int = field(default=4, metadata={"help": "Responses per optimizer step within a pass."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the policy LoRA."})
    value_learning_rate: float = field(default=1e-4,
        metadata={"help": "Learning rate of the value model (LoRA and head)."})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    clip_range: float = field(default=0.2, metadata={"help": "PPO clip range of the probability ratio."})
    clip_range_value: float = field(default=0.2, metadata={"help": "Clip range of value updates."})
    vf_coef: float = field(default=0.5, metadata={"help": "Weight of the value loss."})
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    init_kl_coef: float = field(default=0.05, metadata={"help": "KL coefficient beta (its start value when adaptive)."})
    target_kl: float | None = field(default=None,
        metadata={"help": "Adaptive beta (Ziegler et al. 2019): target KL in nats per response."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive beta: horizon in responses."})
    missing_eos_penalty: float | None = field(default=None,
        metadata={"help": "Added to the score of a response cut off at max_new_tokens."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Normalise advantages to mean 0, std 1 per batch."})
    ptx_coef: float = field(default=0.0,
        metadata={"help": "PPO-ptx (InstructGPT): weight of the language-modelling loss on --ptx_dataset."})
    ptx_batch_size: int = field(default=4, metadata={"help": "PPO-ptx: sequences per optimizer step."})
    seed: int = field(default=42, metadata={"help": "Seed for adapters, sampling and prompt order."})


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

    def __init__(self, policy, value_model: ValueModel, tokenizer, reward_fn: RewardFunction, settings: PPOSettings,
                 ptx_data: Sequence[list[int]] | None = None, accelerator=None):
        """`accelerator` (an `accelerate.Accelerator`) spreads the work over processes: each rank samples its
        share of every batch, gradients are averaged across ranks (DDP), statistics and the KL coefficient
        are the mean over ranks. Without one, everything runs in this process."""
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
        self.accelerator = accelerator
        # Training forwards go through the (possibly DDP-wrapped) modules; sampling, the reference pass and
        # saving use the plain ones.
        self.policy_train, self.value_train = policy, value_model
        if accelerator is not None:
            self.policy_train, self.value_train, self.optimizer = accelerator.prepare(policy, value_model,
                                                                                      self.optimizer)
        self.generator = torch.Generator().manual_seed(settings.seed)  # minibatch order
        eos = policy.generation_config.eos_token_id
        self.eos_ids = sorted({*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None})
        self.step_count = 0
        # PPO-ptx: token-id lists of pretraining/SFT text, read in order, `ptx_batch_size` per minibatch update.
        self.ptx_data = list(ptx_data or [])
        self.ptx_position = 0
        if settings.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ptx_coef > 0 needs ptx data")

    @property
    def device(self) -> torch.device:
        return next(self.policy.parameters()).device

    # --- forward passes

    def _response_logits(self, model, sequences, attention_mask, prompt_length):
        """Logits at the positions that predict response tokens, at the sampling temperature: [B, R, V]."""
        logits = model(input_ids=sequences, attention_mask=attention_mask).logits
        return logits[:, prompt_length - 1:-1] / self.settings.temperature

    def _values(self, sequences, attention_mask, prompt_length, model=None):
        model = model or self.value_model
        return model(sequences, attention_mask)[:, prompt_length - 1:-1]  # [B, R]

    # --- rollout

    def render(self, prompt: str | list[dict]) -> str:
        """A chat prompt through the chat template (ready for the reply); a text prompt as it is."""
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str | list[dict]]) -> Rollout:
        """Sample one response per prompt and compute log-probs, values, scores, rewards and advantages."""
        s, tokenizer = self.settings, self.tokenizer
        tokenizer.padding_side = "left"
        batch = tokenizer([self.render(p) for p in prompts], return_tensors="pt", padding=True,
                          add_special_tokens=False)
        batch = batch.to(self.device)
        self.policy.eval()
        self.value_model.eval()
        sequences = self.sample(batch)  # [B, P + R]
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
        scores = torch.as_tensor(self.reward_fn(list(prompts), texts), dtype=torch.float32,
                                 device=self.device).reshape(-1)
        if s.missing_eos_penalty is not None:
            scores = scores + s.missing_eos_penalty * truncated.float()
        rewards, kl = ppo_math.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, self.kl_controller.beta)
        advantages, returns = ppo_math.gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask)
        return Rollout(sequences, attention_mask, prompt_length, mask, logprobs, ref_logprobs, values, scores,
                       rewards, kl, advantages, returns, texts, truncated)

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str | list[dict]], batch_size: int) -> list[float]:
        """Reward-model scores of the policy's greedy responses to `prompts`, as the policy is now (before the
        first update: the SFT model, since a new LoRA is the identity)."""
        from align.generation import GenerationSettings, generate

        greedy = GenerationSettings(temperature=0, max_new_tokens=self.settings.max_new_tokens)
        self.policy.eval()
        scores: list[float] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            texts = [g[0].text for g in generate(self.policy, self.tokenizer, [self.render(p) for p in chunk], greedy)]
            scores += torch.as_tensor(self.reward_fn(chunk, texts), dtype=torch.float32).reshape(-1).tolist()
        return scores

    def sample(self, batch) -> torch.Tensor:
        """The one generation call (Hugging Face `generate`; a faster backend can replace this method)."""
        s = self.settings
        return self.policy.generate(
            **batch, do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0,  # no hidden top-k cut
            max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
        )

    # --- optimisation

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches of the rollout; returns averaged statistics."""
        s = self.settings
        self.policy_train.train()
        self.value_train.train()
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
        logits = self._response_logits(self.policy_train, sequences, attention_mask, rollout.prompt_length)
        logprobs = ppo_math.logprobs_of(logits, response)
        entropy = ppo_math.masked_mean(ppo_math.entropy_of(logits), mask)
        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask,
                                                 s.clip_range)
        values = self._values(sequences, attention_mask, rollout.prompt_length, self.value_train).float()
        vf_loss, vf_stats = ppo_math.value_loss(values, rollout.values[rows], rollout.returns[rows], mask,
                                                s.clip_range_value)
        loss = pg_loss + s.vf_coef * vf_loss - s.entropy_coef * entropy
        extra = {}
        if s.ptx_coef > 0:
            ptx_loss = self._ptx_loss()
            loss = loss + s.ptx_coef * ptx_loss
            extra["ptx_loss"] = ptx_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        if self.accelerator is not None:
            self.accelerator.backward(loss)
            grad_norm = self.accelerator.clip_grad_norm_(self.trainable, s.max_grad_norm)
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, s.max_grad_norm)
        self.optimizer.step()
        return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": entropy.item(),
                "clipfrac": pg_stats["clipfrac"].item(), "approx_kl": pg_stats["approx_kl"].item(),
                "value_clipfrac": vf_stats["clipfrac"].item(), "grad_norm": float(grad_norm), **extra}

    def _ptx_loss(self) -> torch.Tensor:
        """Mean next-token cross-entropy of the policy on the next `ptx_batch_size` ptx sequences (cycling)."""
        count = len(self.ptx_data)
        chunk = [self.ptx_data[(self.ptx_position + i) % count] for i in range(self.settings.ptx_batch_size)]
        self.ptx_position = (self.ptx_position + len(chunk)) % count
        width = max(map(len, chunk))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in chunk], device=self.device)
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in chunk], device=self.device)
        labels = input_ids.masked_fill(attention == 0, -100)
        return self.policy_train(input_ids=input_ids, attention_mask=attention, labels=labels).loss

    def step(self, prompts: Sequence[str | list[dict]]) -> tuple[dict[str, float], Rollout]:
        """One PPO iteration on a batch of prompts: rollout, update, KL-coefficient update. Returns statistics."""
        rollout = self.rollout(prompts)
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
        if self.accelerator is not None and self.accelerator.num_processes > 1:  # the mean over ranks
            values = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.accelerator.device)
            stats = dict(zip(stats, self.accelerator.reduce(values, reduction="mean").tolist(), strict=True))
        if not math.isfinite(stats["policy_loss"]) or not math.isfinite(stats["value_loss"]):
            raise FloatingPointError(f"non-finite loss at step {self.step_count}: {stats}")
        ranks = self.accelerator.num_processes if self.accelerator is not None else 1
        self.kl_controller.update(stats["kl"], len(prompts) * ranks)
        self.step_count += 1
        return stats, rollout


# ----------------------------------------------------------------------------- the stage: `align ppo`

STAGE = "ppo"
logger = logging.getLogger("align")


@dataclass
class PPOArguments(RunArguments):
    dataset_name: str = field(
        default="runs/self_instruct",
        metadata={"help": "Prompts: a dataset with a `prompt` column (text or chat) or `messages` chats (the turns "
                  "before the last reply), e.g. an `align self-instruct` output."},
    )
    dataset_split: str | None = field(default="train", metadata={"help": "Split of the prompts (None: all)."})
    model_name_or_path: str = field(
        default=DEFAULT_MODEL, metadata={"help": "Base model of the policy (the SFT stage's base)."}
    )
    sft_adapter: str | None = field(
        default=None, metadata={"help": "An `align sft` output: merged into the base to start the policy."}
    )
    reward_model: str = field(default="runs/reward", metadata={"help": "An `align reward` output directory."})
    output_dir: str = field(default="runs/ppo", metadata={"help": "Where the finished stage output goes."})
    total_steps: int = field(default=20, metadata={"help": "PPO iterations (one rollout batch each)."})
    rollout_batch_size: int = field(default=8, metadata={"help": "Prompts sampled per iteration."})
    reward_max_length: int | None = field(
        default=512, metadata={"help": "Longest prompt + response the reward model reads (the prompt is cut first)."}
    )
    max_kl: float = field(
        default=50.0, metadata={"help": "Stop (keeping the last good checkpoint) when the mean KL per response "
                                "exceeds this many nats."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the policy and value adapters."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules that get LoRA ('all-linear' or names)."}
    )
    ptx_dataset: str | None = field(
        default=None, metadata={"help": "PPO-ptx: chats (`messages`) or `text` whose language-modelling loss is "
                                "mixed in with weight --ptx_coef, e.g. the SFT data."}
    )
    ptx_max_length: int = field(default=256, metadata={"help": "PPO-ptx: longest sequence in tokens (cut at the end)."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype ('auto', 'float32', 'bfloat16')."})
    save_steps: int = field(default=10, metadata={"help": "Checkpoint every N iterations (and at the end)."})
    eval_prompts: int = field(
        default=0, metadata={"help": "Hold out N prompts (seeded) from training and score the policy's greedy "
                             "responses to them with the reward model before the first and after the last "
                             "iteration (0: off)."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "When the stage has finished, push its adapter, model card and manifest to "
                                 "--hub_model_id (token and hub checked before training)."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "With --push_to_hub: 'namespace/name'."})
    hub_private_repo: bool = field(
        default=True, metadata={"help": "Create the hub repository private (the default); false: public."}
    )
    sample_steps: int = field(default=5, metadata={"help": "Log prompt/response/score samples every N iterations."})


CONFIG_CLASSES = (PPOArguments, PPOSettings)


class RewardModelScorer:
    """A reward-stage model as a `RewardFunction`: scores normalised with the training rewards' mean and std."""

    def __init__(self, model, tokenizer, mean: float, std: float, max_length: int | None, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.mean, self.std = mean, std if std > 0 else 1.0
        self.max_length, self.batch_size = max_length, batch_size

    @torch.no_grad()
    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        from align.reward import encode_response, sequence_rewards

        ids = [encode_response(self.tokenizer, p, r, self.max_length)[0] for p, r in zip(prompts, responses,
                                                                                          strict=True)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            width = max(map(len, chunk))
            pad = self.tokenizer.pad_token_id
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
            attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
            scores.append(sequence_rewards(self.model, input_ids, attention).float().cpu())
        return (torch.cat(scores) - self.mean) / self.std


def prompt_order(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Prompt indices of iteration `step`: consecutive slices of seeded per-epoch permutations (resumable)."""
    indices = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, count)
        permutation = torch.randperm(count, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = permutation[offset:offset + batch_size - len(indices)]
        indices += take
        position += len(take)
    return indices


def hold_out_prompts(prompts: list, count: int, seed: int) -> tuple[list, list]:
    """(training prompts, `count` held-out prompts): a seeded choice, the training prompts in their order."""
    if count <= 0:
        return prompts, []
    if count >= len(prompts):
        raise StageError(STAGE, f"--eval_prompts {count} leaves no training prompts out of {len(prompts)} — "
                         "hold out fewer")
    chosen = set(torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))[:count].tolist())
    return ([p for i, p in enumerate(prompts) if i not in chosen], [p for i, p in enumerate(prompts) if i in chosen])


def held_out_reward(trainer: PPOTrainer, prompts: list, cache: Path | None, batch_size: int = 8) -> float | None:
    """Mean reward of the policy's greedy responses to the held-out prompts. With `cache`, measured once per run
    and kept in the working directory, so a resumed run reports the reward of the policy it started from."""
    if not prompts:
        return None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())["reward"]
    scores = trainer.evaluate(prompts, batch_size)
    reward = sum(scores) / len(scores)
    if cache is not None:
        cache.write_text(json.dumps({"reward": reward, "scores": scores}))
    return reward


def check_arguments(args: PPOArguments, settings: PPOSettings) -> None:
    problems = []
    for name in ("total_steps", "rollout_batch_size", "save_steps", "sample_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if args.eval_prompts < 0:
        problems.append("--eval_prompts must be >= 0")
    for name in ("ppo_epochs", "mini_batch_size", "max_new_tokens"):
        if getattr(settings, name) < 1:
            problems.append(f"--{name} must be >= 1")
    if settings.temperature <= 0 or not 0 < settings.top_p <= 1:
        problems.append("--temperature must be > 0 and --top_p in (0, 1]")
    if not 0 <= settings.gamma <= 1 or not 0 <= settings.lam <= 1:
        problems.append("--gamma and --lam must be in [0, 1]")
    if settings.init_kl_coef < 0 or (settings.target_kl is not None and settings.target_kl <= 0):
        problems.append("--init_kl_coef must be >= 0 and --target_kl > 0")
    if settings.ptx_coef < 0 or (settings.ptx_coef > 0 and not args.ptx_dataset):
        problems.append("--ptx_coef must be >= 0, and > 0 needs --ptx_dataset")
    if problems:
        raise StageError(STAGE, "; ".join(problems) + " — see `align ppo --help`")
    reward_manifest = Path(args.reward_model) / "manifest.json"
    if not reward_manifest.exists() or read_manifest(args.reward_model).get("stage") != "reward":
        raise StageError(STAGE, f"no reward model at {args.reward_model} — pass an `align reward` output directory")
    if args.sft_adapter and not (adapter_dir(args.sft_adapter) / "adapter_config.json").exists():
        raise StageError(STAGE, f"no adapter at {args.sft_adapter} — pass an `align sft` output directory")


def _rank(trainer: PPOTrainer) -> tuple[int, bool]:
    accelerator = trainer.accelerator
    return (accelerator.process_index, accelerator.is_main_process) if accelerator is not None else (0, True)


def _barrier(trainer: PPOTrainer) -> None:
    if trainer.accelerator is not None:
        trainer.accelerator.wait_for_everyone()


def save_checkpoint(directory: Path, trainer: PPOTrainer) -> Path:
    """checkpoint-N/: trainable weights of policy and value, optimizer, KL controller, every rank's RNG states;
    the trainer_state.json written last marks it complete. Called on every rank."""
    rank, is_main = _rank(trainer)
    path = directory / f"checkpoint-{trainer.step_count}"
    if is_main:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    _barrier(trainer)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, path / f"rng-{rank}.pt")
    _barrier(trainer)
    if is_main:
        weights = {f"policy.{n}": p.detach().cpu() for n, p in trainer.policy.named_parameters() if p.requires_grad}
        weights |= {f"value.{n}": p.detach().cpu() for n, p in trainer.value_model.named_parameters()
                    if p.requires_grad}
        torch.save(weights, path / "weights.pt")
        torch.save({"optimizer": trainer.optimizer.state_dict(), "kl_controller": trainer.kl_controller.state_dict(),
                    "minibatch_rng": trainer.generator.get_state(), "ptx_position": trainer.ptx_position},
                   path / "state.pt")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": trainer.step_count}))
    _barrier(trainer)
    return path


def load_checkpoint(path: Path, trainer: PPOTrainer) -> None:
    """Restore what `save_checkpoint` wrote (on every rank; a rank without its own RNG file takes rank 0's)."""
    rank, _ = _rank(trainer)
    weights = torch.load(path / "weights.pt", weights_only=True)
    policy = {n.removeprefix("policy."): w for n, w in weights.items() if n.startswith("policy.")}
    value = {n.removeprefix("value."): w for n, w in weights.items() if n.startswith("value.")}
    for module, state in ((trainer.policy, policy), (trainer.value_model, value)):
        missing = set(state) - {n for n, _ in module.named_parameters()}
        if missing:
            raise StageError(STAGE, f"{path} does not match this model ({sorted(missing)[:2]} ...) — pass "
                             "--restart true to start over")
        module.load_state_dict(state, strict=False)
    state = torch.load(path / "state.pt", weights_only=False)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    trainer.generator.set_state(state["minibatch_rng"])
    trainer.ptx_position = state["ptx_position"]
    rng_file = path / f"rng-{rank}.pt"
    rng = torch.load(rng_file if rng_file.exists() else path / "rng-0.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    trainer.step_count = json.loads((path / "trainer_state.json").read_text())["global_step"]


def ptx_sequences(args: PPOArguments, tokenizer) -> list[list[int]]:
    """Token ids of the PPO-ptx data: chats through the chat template, or a `text` column."""
    from align.common import validate_columns

    data = load_stage_dataset(args.ptx_dataset, STAGE)
    split = "train" if "train" in data else next(iter(data))
    columns = data[split].column_names
    if "messages" in columns:
        validate_columns(data, STAGE, {"messages": "messages"}, splits=[split])
        texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in data[split]["messages"]]
    elif "text" in columns:
        validate_columns(data, STAGE, {"text": "text"}, splits=[split])
        texts = list(data[split]["text"])
    else:
        raise StageError(STAGE, f"--ptx_dataset {args.ptx_dataset} has no `messages` or `text` column (found: "
                         f"{', '.join(columns)}) — pass SFT chats or plain text")
    sequences = [ids[:args.ptx_max_length] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [ids for ids in sequences if len(ids) > 1]


def build_trainer(args: PPOArguments, settings: PPOSettings, accelerator=None) -> tuple[PPOTrainer, str]:
    """Policy (base + merged SFT adapter + new LoRA), value model (reward model + new LoRA), scorer."""
    from peft import LoraConfig, get_peft_model

    from align.reward import load_reward_model

    model_path = resolve_model(args.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    device = accelerator.device if accelerator is not None else "cuda" if torch.cuda.is_available() else "cpu"
    base = load_causal_lm(model_path, dtype=args.dtype, stage=STAGE)
    if args.sft_adapter:
        base = merge_adapter(base, args.sft_adapter, stage=STAGE)
    targets = args.lora_target_modules[0] if args.lora_target_modules == ["all-linear"] else args.lora_target_modules
    policy = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules=targets, task_type="CAUSAL_LM")).to(device)
    reward, reward_tokenizer, reward_manifest = load_reward_model(args.reward_model)
    metrics = reward_manifest.get("metrics", {})
    scorer = RewardModelScorer(reward.to(device), reward_tokenizer, float(metrics.get("reward_mean", 0.0)),
                               float(metrics.get("reward_std", 1.0)), args.reward_max_length)
    value_base, _, _ = load_reward_model(args.reward_model)
    value = value_model_from(value_base.merge_and_unload(), args.lora_r, args.lora_alpha, args.lora_dropout,
                             targets).to(device)
    ptx = ptx_sequences(args, tokenizer) if args.ptx_dataset and settings.ptx_coef > 0 else None
    return PPOTrainer(policy, value, tokenizer, scorer, settings, ptx, accelerator), model_path


def run_config(args: PPOArguments, settings: PPOSettings) -> dict:
    """What the manifest records and a resumed run must match: every option except what to do with existing
    directories and where to publish the adapter."""
    return run_identity({"data": dataclasses.asdict(args), "ppo": dataclasses.asdict(settings)})


def main(argv: list[str] | None = None) -> Path:
    from transformers import set_seed

    from align import importers

    args, settings = parse_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()
    check_arguments(args, settings)
    config = run_config(args, settings)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()
    check_stage_push(STAGE, args.push_to_hub, args.hub_model_id, args.hub_endpoint)
    records = importers.prompt_records(load_stage_dataset(args.dataset_name, STAGE), args.dataset_split, "output",
                                       need_reference=False, stage=STAGE)
    prompts, held_out = hold_out_prompts([record["prompt"] for record in records], args.eval_prompts, settings.seed)
    if len(prompts) < args.rollout_batch_size:
        logger.warning("%d prompts for a rollout batch of %d: prompts repeat within a batch", len(prompts),
                       args.rollout_batch_size)

    from accelerate import Accelerator

    # One process, or several under `accelerate launch` / `torchrun` (DDP; gloo on CPUs).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    world, is_main = accelerator.num_processes, accelerator.is_main_process
    if args.rollout_batch_size % world:
        raise StageError(STAGE, f"--rollout_batch_size {args.rollout_batch_size} must be a multiple of the "
                         f"{world} processes (each samples an equal share)")
    set_seed(settings.seed)  # the same initial adapters on every rank
    trainer, model_path = build_trainer(args, settings, accelerator)
    set_seed(settings.seed + accelerator.process_index)  # but different samples
    partial = output.open(is_main_process=is_main)
    accelerator.wait_for_everyone()
    checkpoints = partial / "checkpoints"
    resume_from = latest_checkpoint(checkpoints, remove_incomplete=is_main)
    metrics_path, samples_path = partial / "logs" / "metrics.jsonl", partial / "logs" / "samples.jsonl"
    if resume_from is not None:
        load_checkpoint(resume_from, trainer)
        logger.info("resuming from %s (step %d)", resume_from.name, trainer.step_count)
        if is_main:
            for path in (metrics_path, samples_path):
                truncate_history(path, trainer.step_count)
    else:
        logger.info("PPO on %d prompts -> %s", len(prompts), output.output_dir)
    before = (held_out_reward(trainer, held_out, partial / "logs" / "eval_before.json", args.rollout_batch_size)
              if is_main else None)
    sampled = run_loop(trainer, args, prompts, checkpoints, metrics_path, samples_path, resume_from)
    logger.info("rank %d/%d sampled %d prompts in this run", accelerator.process_index, world, sampled)
    accelerator.wait_for_everyone()
    if not is_main:
        return output.output_dir
    after = held_out_reward(trainer, held_out, None, args.rollout_batch_size)

    adapter = partial / "adapter"
    trainer.policy.save_pretrained(str(adapter))
    trainer.tokenizer.save_pretrained(str(adapter))
    inputs = {"dataset": args.dataset_name, "reward_model": args.reward_model,
              **({"sft_adapter": args.sft_adapter} if args.sft_adapter else {})}
    manifest = base_manifest(STAGE, config, inputs, {"name_or_path": args.model_name_or_path, "resolved": model_path},
                             started)
    manifest["outputs"] = {"adapter": "adapter", "logs": "logs"}
    manifest["depends_on"] = {"reward_model": args.reward_model,
                              **({"sft_adapter": args.sft_adapter} if args.sft_adapter else {})}
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    manifest["metrics"] = summarize(history)
    if held_out:
        manifest["metrics"].update(eval_prompts=len(held_out), eval_reward_before=before, eval_reward_after=after)
        logger.info("reward of greedy responses to %d held-out prompts: %.3f (SFT policy) -> %.3f (after PPO)",
                    len(held_out), before, after)
    manifest["resumed_from"] = resume_from.name if resume_from else None
    manifest["world_size"] = world
    manifest["finished"] = now_iso()
    write_model_card(adapter, manifest)
    if not args.keep_checkpoints:
        shutil.rmtree(checkpoints, ignore_errors=True)
    final = output.publish(manifest, keep=["adapter"])
    if args.push_to_hub:
        push_after_stage(STAGE, final, args.hub_model_id, args.hub_endpoint, private=args.hub_private_repo)
    return final


def run_loop(trainer: PPOTrainer, args: PPOArguments, prompts: list, checkpoints: Path, metrics_path: Path,
             samples_path: Path, last_good: Path | None = None) -> int:
    """Iterations from the trainer's current step to total_steps: log, sample, checkpoint, guard.
    Returns how many prompts this rank sampled."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    rank, is_main = _rank(trainer)
    world = trainer.accelerator.num_processes if trainer.accelerator is not None else 1
    writer = SummaryWriter(str(metrics_path.parent / "tensorboard")) if is_main else None
    sampled = 0
    with tqdm(total=args.total_steps, initial=trainer.step_count, desc="ppo", unit="step",
              disable=not is_main) as progress:
        while trainer.step_count < args.total_steps:
            indices = prompt_order(trainer.step_count, args.rollout_batch_size, len(prompts), trainer.settings.seed)
            batch = [prompts[i] for i in indices[rank::world]]  # this rank's share
            try:
                stats, rollout = trainer.step(batch)
                sampled += len(batch)
            except FloatingPointError as exc:
                raise StageError(STAGE, f"{exc} — stopped; last good checkpoint: {last_good or 'none'}; lower "
                                 "--learning_rate or raise --init_kl_coef") from None
            step = trainer.step_count
            if stats["kl"] > args.max_kl:
                raise StageError(STAGE, f"mean KL {stats['kl']:.1f} nats exceeded --max_kl {args.max_kl} at step "
                                 f"{step}; last good checkpoint: {last_good or 'none'} — raise --init_kl_coef, set "
                                 "--target_kl, or lower --learning_rate")
            if is_main:
                append_jsonl(metrics_path, {"step": step, "prompts": indices, **stats})
                for key, value in stats.items():
                    writer.add_scalar(f"ppo/{key}", value, step)
            if is_main and (step % args.sample_steps == 0 or step == args.total_steps):
                for prompt, response, score in list(zip(batch, rollout.responses, rollout.scores.tolist(),
                                                        strict=True))[:2]:
                    append_jsonl(samples_path, {"step": step, "prompt": prompt, "response": response, "score": score})
            if step % args.save_steps == 0 or step == args.total_steps:
                last_good = save_checkpoint(checkpoints, trainer)
            progress.update(1)
            progress.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}")
    if writer is not None:
        writer.close()
    return sampled


def summarize(history: list[dict]) -> dict:
    """Manifest metrics: the reward curve's ends (first/last five iterations) and the final KL and beta."""
    if not history:
        return {}
    head, tail = history[:5], history[-5:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    return {"steps": history[-1]["step"], "score_first": mean(head, "score_mean"),
            "score_last": mean(tail, "score_mean"), "kl_last": mean(tail, "kl"), "beta_last": history[-1]["beta"],
            "response_length_last": mean(tail, "response_length")}


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
