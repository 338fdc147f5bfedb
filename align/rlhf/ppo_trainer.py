"""The PPO loop (`PPOTrainer`): policy, reference, value model and a reward function; its checkpoints.

- **Policy**: a causal LM (the SFT model: base with the SFT adapter merged) with a new trainable LoRA.
- **Reference**: the same weights with the LoRA disabled (`disable_adapter()`), so no second copy.
- **Reward**: any `RewardFunction` (prompts, responses) -> scores, e.g. `align.rlhf.reward_model.RewardModelScorer`.
- **Value model**, one of two kinds:
  `ValueModel`, a backbone with its own trainable LoRA and a linear head giving a value per token, initialised
  from the reward model's backbone and score head when there is one (as InstructGPT did); or `PolicyValueHead`,
  a linear head on the policy's own last hidden states (the arrangement of TRL's former PPO trainer): one
  forward and backward pass gives log-probs and values, no second backbone in memory, and the reward function
  can be anything (an embedding judge too). The policy's LoRA then also learns from the value loss.

One `PPOTrainer.step(prompts)`: sample responses, score them, compute policy / reference log-probs and
values in one forward pass each, turn the score and the per-token KL into rewards, estimate advantages
with GAE (whitened), then `ppo_epochs` passes over minibatches with the clipped policy and value losses,
an optional entropy bonus and gradient clipping. The arithmetic is in `align.rlhf.ppo_math`; the stage
around the loop (data, checkpoint cadence, guards, outputs) is `align.ppo`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from align.core.command import StageError
from align.lm.generation import GenerationSettings, eos_ids, generate, render_prompt
from align.lm.precision import Precision, autocast_off, compute_in_fp32
from align.rlhf import ppo_math

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
    merged_sampling: bool = field(default=True,
        metadata={"help": "Sample from a copy of the policy with its LoRA merged in and, under bf16, its layers in "
                  "bf16 (the output layer stays fp32), refreshed before every rollout: decoding without the adapter's "
                  "extra products and per-call weight casts (1.5x faster generation on the default model on 2 CPU "
                  "cores), for one more copy of the model in memory. Log-probs still come from the trained policy."})
    gradient_checkpointing: bool = field(default=True,
        metadata={"help": "Recompute the policy's and value model's activations in the backward pass instead of "
                  "keeping them: peak memory no longer grows with every token of the longest minibatch, for one "
                  "more forward pass per update (TRL's online trainers do the same by default)."})


class ValueModel(nn.Module):
    """A transformer backbone and a linear head: a value for every position (the value of the state after it)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with autocast_off(hidden.device.type):  # values in fp32 also under bf16 autocast
            return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)  # [B, T]


class PolicyValueHead(nn.Module):
    """A value head on the policy's trunk: values from the same hidden states the policy's logits come from."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.zeros_(self.head.weight)  # every value 0 at the start; the returns teach it


class PolicyAndValue(nn.Module):
    """The policy and its `PolicyValueHead` as one module (one forward pass, one DDP wrapper): returns the logits
    of the last `logits_to_keep` positions and a value for every position."""

    def __init__(self, policy: nn.Module, value_head: PolicyValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
        model = self.policy.get_base_model()  # the LoRA layers sit inside it: calling its parts applies them
        hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids,
                                                           attention_mask=attention_mask).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, -logits_to_keep:])
        with autocast_off(hidden.device.type):
            values = self.value_head.head(hidden.to(self.value_head.head.weight.dtype)).squeeze(-1)
        return logits, values


def value_model_from(model: nn.Module, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                     target_modules: str | list[str] = "all-linear") -> ValueModel:
    """A value model on `model`'s backbone with a new trainable LoRA and a trainable linear head.

    `model` is a causal LM (the head starts at zero: every value 0) or a sequence-classification reward
    model with its adapter merged (its score head is the starting point: values start as reward estimates).
    """
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


def merged_copy(policy, precision: Precision) -> nn.Module:
    """A plain copy of a LoRA policy for sampling: the adapter merged into its layers; under bf16 every linear
    layer but the output layer cast to bf16 (bf16 autocast computes them in bf16 anyway, from fp32 weights it
    casts at every call), the output layer fp32 as in the policy. Frozen, in eval mode."""
    import copy

    sampler = copy.deepcopy(policy)
    output = sampler.get_base_model().get_output_embeddings()
    layer = output.get_base_layer() if hasattr(output, "get_base_layer") else output
    if layer is not output:  # an adapted output layer tied to the input embeddings: merge into the output side only
        layer.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    sampler = sampler.merge_and_unload().eval()
    sampler.requires_grad_(False)
    if precision.is_bf16:
        output = sampler.get_output_embeddings()
        for module in sampler.modules():
            if isinstance(module, nn.Linear) and module is not output and module.weight is not output.weight:
                module.to(precision.dtype)
    # What the copy holds unchanged (embeddings, norms, layers without an adapter: frozen, same name and dtype in the
    # policy) it shares with the policy instead of keeping a second copy.
    frozen = {name.removeprefix("base_model.model."): param
              for name, param in policy.named_parameters(remove_duplicate=False)
              if not param.requires_grad}
    for name, param in list(sampler.named_parameters(remove_duplicate=False)):
        same = frozen.get(name)
        if same is not None and same.dtype == param.dtype and same.shape == param.shape:
            owner, _, leaf = name.rpartition(".")
            setattr(sampler.get_submodule(owner), leaf, same)
    return sampler


@torch.no_grad()
def refresh_merged_copy(sampler: nn.Module, policy) -> None:
    """Write the policy's current weights, adapter merged, into `merged_copy`'s layers (in their dtype)."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."  # a PeftModel's names of the wrapped model's modules
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer) and not module.disable_adapters:
            target = sampler.get_submodule(name.removeprefix(prefix))
            weight = module.get_base_layer().weight
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter)
            target.weight.copy_(weight)


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

    def __init__(self, policy, value_model: ValueModel | PolicyValueHead, tokenizer, reward_fn: RewardFunction,
                 settings: PPOSettings, ptx_data: Sequence[list[int]] | None = None, accelerator=None,
                 precision: Precision | None = None):
        """`accelerator` (an `accelerate.Accelerator`) spreads the work over processes: each rank samples its
        share of every batch, gradients are averaged across ranks (DDP), statistics and the KL coefficient
        are the mean over ranks. Without one, everything runs in this process.

        `precision` bf16: every forward pass (sampling, scoring, training) runs under bf16 autocast while the
        weights and optimizer states stay fp32; the policy's output layer and the value head stay fp32, and
        log-probs, KL, advantages and losses are computed in fp32."""
        self.precision = precision or Precision("fp32", "default")
        if self.precision.is_bf16:
            # bf16 logits (an 8-bit mantissa: steps of 0.06-0.125 at typical logit sizes) would put that much noise
            # into every probability ratio PPO takes between two forward passes; the output layer stays fp32.
            compute_in_fp32(policy.get_base_model().get_output_embeddings())
        # A head on the policy's trunk (`PolicyValueHead`) or a model of its own (`ValueModel`).
        self.shared_value = isinstance(value_model, PolicyValueHead)
        if settings.gradient_checkpointing:  # only in training mode: sampling and scoring are untouched
            for model in (policy,) if self.shared_value else (policy, value_model.backbone):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy, self.value_model, self.tokenizer = policy, value_model, tokenizer
        self.sampler = merged_copy(policy, self.precision) if settings.merged_sampling else None
        self.joint = PolicyAndValue(policy, value_model) if self.shared_value else None
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
        self.policy_train, self.value_train, self.joint_train = policy, value_model, self.joint
        if accelerator is not None and self.shared_value:
            self.joint_train, self.optimizer = accelerator.prepare(self.joint, self.optimizer)
        elif accelerator is not None:
            self.policy_train, self.value_train, self.optimizer = accelerator.prepare(policy, value_model,
                                                                                      self.optimizer)
        self.generator = torch.Generator().manual_seed(settings.seed)  # minibatch order
        self.eos_ids = sorted(eos_ids(policy, tokenizer))
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

    def autocast(self):
        """The forward passes' precision context (bf16 autocast, or nothing under fp32)."""
        return self.precision.autocast(self.device.type)

    def _response_logits(self, model, sequences, attention_mask, prompt_length):
        """Logits at the positions that predict response tokens, at the sampling temperature: [B, R, V]. The
        output layer runs only there (`logits_to_keep`), never over the prompt."""
        response_length = sequences.shape[1] - prompt_length
        with self.autocast():
            logits = model(input_ids=sequences, attention_mask=attention_mask,
                           logits_to_keep=response_length + 1).logits[:, :-1]  # [B, R, V]
        if logits.shape[1] != response_length:
            raise ValueError(f"{type(model).__name__} ignored logits_to_keep: {logits.shape[1]} positions returned "
                             f"for {response_length} response tokens")
        return logits / self.settings.temperature if self.settings.temperature != 1.0 else logits

    def _logits_and_values(self, model, sequences, attention_mask, prompt_length):
        """(response logits [B, R, V] at the sampling temperature, values [B, R] in fp32): from one pass through
        the policy and its value head when they share a trunk, else from the policy and the value model."""
        if not self.shared_value:
            value_model = self.value_train if model is self.policy_train else self.value_model
            return (self._response_logits(model, sequences, attention_mask, prompt_length),
                    self._values(sequences, attention_mask, prompt_length, value_model).float())
        response_length = sequences.shape[1] - prompt_length
        with self.autocast():
            logits, values = model(sequences, attention_mask, response_length + 1)
        logits = logits[:, :-1]
        if self.settings.temperature != 1.0:
            logits = logits / self.settings.temperature
        return logits, values[:, prompt_length - 1:-1].float()

    def _values(self, sequences, attention_mask, prompt_length, model=None):
        model = model or self.value_model
        with self.autocast():
            return model(sequences, attention_mask)[:, prompt_length - 1:-1]  # [B, R]

    def _score(self, prompts: list, texts: list[str]) -> torch.Tensor:
        with self.autocast():
            return torch.as_tensor(self.reward_fn(prompts, texts), dtype=torch.float32).reshape(-1)

    # --- rollout

    def render(self, prompt: str | list[dict]) -> str:
        """A chat prompt through the chat template (ready for the reply); a text prompt as it is."""
        return render_prompt(self.tokenizer, prompt)

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

        logits, values = self._logits_and_values(self.joint or self.policy, sequences, attention_mask,
                                                 prompt_length)
        logprobs = ppo_math.logprobs_of(logits, response)
        del logits  # [B, R, V]: not kept beside the reference's
        with self.policy.disable_adapter():
            ref_logits = self._response_logits(self.policy, sequences, attention_mask, prompt_length)
        ref_logprobs = ppo_math.logprobs_of(ref_logits, response)

        texts = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True).strip()
                 for ids, m in zip(response, mask, strict=True)]
        scores = self._score(list(prompts), texts).to(self.device)
        if s.missing_eos_penalty is not None:
            scores = scores + s.missing_eos_penalty * truncated.float()
        rewards, kl = ppo_math.kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, self.kl_controller.beta)
        advantages, returns = ppo_math.gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = ppo_math.masked_whiten(advantages, mask)
        return Rollout(sequences, attention_mask, prompt_length, mask, logprobs, ref_logprobs, values, scores,
                       rewards, kl, advantages, returns, texts, truncated)

    @torch.no_grad()
    def greedy_responses(self, prompts: Sequence[str | list[dict]], batch_size: int) -> list[str]:
        """The policy's greedy responses to `prompts`, as it is now (before the first update: the SFT model, since a
        new LoRA is the identity)."""
        greedy = GenerationSettings(temperature=0, max_new_tokens=self.settings.max_new_tokens)
        self.policy.eval()
        model = self.sampling_model()
        texts: list[str] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            with self.autocast():
                texts += [g[0].text for g in generate(model, self.tokenizer, [self.render(p) for p in chunk],
                                                      greedy)]
        return texts

    def evaluate(self, prompts: Sequence[str | list[dict]], batch_size: int,
                 responses: Sequence[str] | None = None) -> list[float]:
        """Reward-model scores of the policy's greedy responses to `prompts` (or of `responses` to them)."""
        responses = list(responses) if responses is not None else self.greedy_responses(prompts, batch_size)
        scores: list[float] = []
        for start in range(0, len(prompts), batch_size):
            scores += self._score(list(prompts[start:start + batch_size]),
                                  responses[start:start + batch_size]).tolist()
        return scores

    def sampling_model(self):
        """The model that samples: the merged copy, brought up to date with the policy (or the policy itself)."""
        if self.sampler is None:
            return self.policy
        refresh_merged_copy(self.sampler, self.policy)
        return self.sampler

    def sample(self, batch) -> torch.Tensor:
        """The one generation call (Hugging Face `generate`; a faster backend can replace this method)."""
        s = self.settings
        with self.autocast():
            return self.sampling_model().generate(
                **batch, do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0,  # no hidden top-k cut
                max_new_tokens=s.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            )

    # --- optimisation

    def update(self, rollout: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes over shuffled minibatches of the rollout; returns averaged statistics."""
        s = self.settings
        for model in (self.joint_train,) if self.shared_value else (self.policy_train, self.value_train):
            model.train()
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
        logits, values = self._logits_and_values(self.joint_train if self.shared_value else self.policy_train,
                                                 sequences, attention_mask, rollout.prompt_length)
        logprobs = ppo_math.logprobs_of(logits, response)
        with torch.set_grad_enabled(s.entropy_coef > 0 and torch.is_grad_enabled()):  # else a statistic only
            entropy = ppo_math.masked_mean(ppo_math.entropy_of(logits), mask)
        pg_loss, pg_stats = ppo_math.policy_loss(logprobs, rollout.logprobs[rows], rollout.advantages[rows], mask,
                                                 s.clip_range)
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
        with self.autocast():
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


def process_rank(trainer: PPOTrainer) -> tuple[int, bool]:
    accelerator = trainer.accelerator
    return (accelerator.process_index, accelerator.is_main_process) if accelerator is not None else (0, True)


def wait_for_ranks(trainer: PPOTrainer) -> None:
    if trainer.accelerator is not None:
        trainer.accelerator.wait_for_everyone()


def save_checkpoint(directory: Path, trainer: PPOTrainer) -> Path:
    """checkpoint-N/: trainable weights of policy and value, optimizer, KL controller, every rank's RNG states;
    the trainer_state.json written last marks it complete. Called on every rank."""
    rank, is_main = process_rank(trainer)
    path = directory / f"checkpoint-{trainer.step_count}"
    if is_main:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    wait_for_ranks(trainer)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, path / f"rng-{rank}.pt")
    wait_for_ranks(trainer)
    if is_main:
        weights = {f"policy.{n}": p.detach().cpu() for n, p in trainer.policy.named_parameters() if p.requires_grad}
        weights |= {f"value.{n}": p.detach().cpu() for n, p in trainer.value_model.named_parameters()
                    if p.requires_grad}
        torch.save(weights, path / "weights.pt")
        torch.save({"optimizer": trainer.optimizer.state_dict(), "kl_controller": trainer.kl_controller.state_dict(),
                    "minibatch_rng": trainer.generator.get_state(), "ptx_position": trainer.ptx_position},
                   path / "state.pt")
        (path / "trainer_state.json").write_text(json.dumps({"global_step": trainer.step_count}))
    wait_for_ranks(trainer)
    return path


def load_checkpoint(path: Path, trainer: PPOTrainer, stage: str = "ppo") -> None:
    """Restore what `save_checkpoint` wrote (on every rank; a rank without its own RNG file takes rank 0's)."""
    rank, _ = process_rank(trainer)
    weights = torch.load(path / "weights.pt", weights_only=True)
    policy = {n.removeprefix("policy."): w for n, w in weights.items() if n.startswith("policy.")}
    value = {n.removeprefix("value."): w for n, w in weights.items() if n.startswith("value.")}
    for module, state in ((trainer.policy, policy), (trainer.value_model, value)):
        missing = set(state) - {n for n, _ in module.named_parameters()}
        if missing:
            raise StageError(stage, f"{path} does not match this model ({sorted(missing)[:2]} ...) — pass "
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
