"""The PPO loop on the tiny model with a scripted reward: learning happens, the KL stays bounded."""

from __future__ import annotations

import pytest
import torch

from align.ppo import PPOSettings, PPOTrainer, value_model_from

# The tiny model's tied output embedding is small, so its next-token distribution is nearly uniform and
# adapters on the attention/MLP layers alone barely move it (RMS norm caps the hidden state): the test
# adapts the output layer too.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def lowercase_share(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Scripted reward: the share of a response's characters that are ASCII lowercase letters (~10% by chance)."""
    return torch.tensor([sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trainer(tiny_model_path, reward_fn=lowercase_share, **overrides) -> PPOTrainer:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from align.models import load_causal_lm, load_tokenizer

    set_seed(0)
    tokenizer = load_tokenizer(tiny_model_path)
    policy = get_peft_model(load_causal_lm(tiny_model_path),
                            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                       task_type="CAUSAL_LM"))
    value = value_model_from(load_causal_lm(tiny_model_path), lora_r=8, lora_alpha=16)
    settings = PPOSettings(**{"max_new_tokens": 16, "ppo_epochs": 4, "mini_batch_size": 8, "learning_rate": 1e-2,
                              "value_learning_rate": 1e-2, "init_kl_coef": 0.02, "target_kl": 8.0, "kl_horizon": 200,
                              "seed": 0, **overrides})
    return PPOTrainer(policy, value, tokenizer, reward_fn, settings)


PROMPTS = [f"Question {i}: say something." for i in range(16)]


def test_reward_rises_while_kl_stays_bounded(tiny_model_path, one_thread):
    trainer = make_trainer(tiny_model_path)
    history = [trainer.step(PROMPTS)[0] for _ in range(30)]
    scores = [h["score_mean"] for h in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.15  # lowercase letters are ~10% of random bytes
    assert last > first + 0.15, f"mean score went {first:.3f} -> {last:.3f}"
    assert max(h["kl"] for h in history) < 20.0  # nats per 16-token response
    assert history[-1]["beta"] != pytest.approx(0.02)  # the adaptive controller acted
    assert all(0 <= h["clipfrac"] <= 1 and h["entropy"] > 0 for h in history)


def test_padding_after_eos_is_masked(tiny_model_path, one_thread):
    """A response that ends early: its mask stops at the end-of-sequence token, padding gets no reward or KL."""
    trainer = make_trainer(tiny_model_path, max_new_tokens=8)
    eos = trainer.tokenizer.eos_token_id
    real_generate = trainer.policy.generate

    def early_eos(**kwargs):
        sequences = real_generate(**kwargs)
        prompt_length = kwargs["input_ids"].shape[1]
        sequences[0, prompt_length + 2] = eos  # the first response ends at its third token
        sequences[0, prompt_length + 3:] = trainer.tokenizer.pad_token_id
        return sequences

    trainer.policy.generate = early_eos
    rollout = trainer.rollout(PROMPTS[:2])
    assert rollout.mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert not rollout.truncated[0] and rollout.truncated[1]
    assert rollout.rewards[0, 3:].abs().sum() == 0 and rollout.kl[0, 3:].abs().sum() == 0
    assert rollout.advantages[0, 3:].abs().sum() == 0
    # the score sits on the last real token (plus that token's KL penalty)
    beta = trainer.kl_controller.beta
    assert rollout.rewards[0, 2].item() == pytest.approx(rollout.scores[0].item() - beta * rollout.kl[0, 2].item(),
                                                         abs=1e-5)
