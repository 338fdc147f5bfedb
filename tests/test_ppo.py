"""The PPO loop on the tiny model with a scripted reward: learning happens, the KL stays bounded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.core.outputs import read_manifest
from align.lm.precision import choose_precision
from align.rlhf.ppo_trainer import PolicyValueHead, PPOSettings, PPOTrainer, value_model_from
from tests.conftest import DEMONSTRATIONS, NEEDS_BF16, ROOT, kill_after_journal_line, run_align

# The tiny model's tied output embedding is small, so its next-token distribution is nearly uniform and
# adapters on the attention/MLP layers alone barely move it (RMS norm caps the hidden state): the test
# adapts the output layer too.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def lowercase_share(prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Scripted reward: the share of a response's characters that are ASCII lowercase letters (~10% by chance)."""
    return torch.tensor([sum("a" <= c <= "z" for c in r) / max(len(r), 1) for r in responses])


def make_trainer(tiny_model_path, reward_fn=lowercase_share, ptx_data=None, precision="fp32",
                 value_on_policy: bool = False, **overrides) -> PPOTrainer:
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from align.lm.models import load_causal_lm, load_tokenizer

    set_seed(0)
    tokenizer = load_tokenizer(tiny_model_path)
    policy = get_peft_model(load_causal_lm(tiny_model_path),
                            LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                       task_type="CAUSAL_LM"))
    value = (PolicyValueHead(policy.config.hidden_size) if value_on_policy
             else value_model_from(load_causal_lm(tiny_model_path), lora_r=8, lora_alpha=16))
    settings = PPOSettings(**{"max_new_tokens": 16, "ppo_epochs": 4, "mini_batch_size": 8, "learning_rate": 1e-2,
                              "value_learning_rate": 1e-2, "init_kl_coef": 0.02, "target_kl": 8.0, "kl_horizon": 200,
                              "seed": 0, **overrides})
    return PPOTrainer(policy, value, tokenizer, reward_fn, settings, ptx_data, precision=choose_precision(precision))


PROMPTS = [f"Question {i}: say something." for i in range(16)]


@pytest.mark.parametrize("precision,value_on_policy", [("fp32", False), pytest.param("bf16", False, marks=NEEDS_BF16),
                                                      ("fp32", True)])
def test_reward_rises_while_kl_stays_bounded(tiny_model_path, one_thread, precision, value_on_policy):
    """Sampled scores rise over 30 iterations, and so does the score of greedy responses to prompts never trained on;
    under bf16 autocast as under fp32, and with the value head on the policy's trunk as with a value model."""
    trainer = make_trainer(tiny_model_path, precision=precision, value_on_policy=value_on_policy)
    held_out = [f"Request {i}: write one line." for i in range(8)]
    before = trainer.evaluate(held_out, batch_size=4)
    history = [trainer.step(PROMPTS)[0] for _ in range(30)]
    after = trainer.evaluate(held_out, batch_size=4)
    assert sum(after) / 8 > sum(before) / 8 + 0.15, (before, after)
    scores = [h["score_mean"] for h in history]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert first < 0.15  # lowercase letters are ~10% of random bytes
    assert last > first + 0.15, f"mean score went {first:.3f} -> {last:.3f}"
    assert max(h["kl"] for h in history) < 25.0  # nats per 16-token response (fp32 peaks near 19, bf16 near 22)
    assert history[-1]["beta"] != pytest.approx(0.02)  # the adaptive controller acted
    assert all(0 <= h["clipfrac"] <= 1 and h["entropy"] > 0 for h in history)


@NEEDS_BF16
def test_bf16_computes_in_bf16_but_keeps_weights_and_log_probs_in_fp32(tiny_model_path, one_thread):
    """Under bf16 the rollout's forward passes run under autocast, while the trainable weights, the output layer's
    logits, log-probs, values and scores stay fp32 (the same rollout under fp32 differs only by bf16 rounding)."""
    trainer = make_trainer(tiny_model_path, precision="bf16")
    fp32_names = [n for n, p in make_trainer(tiny_model_path).policy.named_parameters() if p.requires_grad]
    # Checkpoints and the saved adapter name weights alike under both precisions (the output layer's LoRA too).
    assert [n for n, p in trainer.policy.named_parameters() if p.requires_grad] == fp32_names
    assert any("lm_head" in n for n in fp32_names)
    seen = []
    layer = trainer.policy.get_base_model().model.layers[0].mlp.down_proj
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    rollout = trainer.rollout(PROMPTS[:4])
    handle.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    for tensor in (rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.scores, rollout.advantages):
        assert tensor.dtype == torch.float32
    assert torch.isfinite(rollout.logprobs).all() and (rollout.logprobs <= 0).all()
    # Old and new log-probs of the same tokens agree to fp32 noise: the first PPO ratio is 1.
    logits = trainer._response_logits(trainer.policy, rollout.sequences, rollout.attention_mask, rollout.prompt_length)
    again = logits.float().log_softmax(-1).gather(-1, rollout.sequences[:, rollout.prompt_length:, None]).squeeze(-1)
    assert torch.allclose(again * rollout.mask, rollout.logprobs * rollout.mask, atol=1e-4)


def test_gradient_checkpointing_changes_memory_not_the_update(tiny_model_path, one_thread):
    """The same rollout, one PPO update with activations recomputed and one with them kept: the same weights after."""
    recomputing = make_trainer(tiny_model_path, gradient_checkpointing=True, ppo_epochs=1)
    keeping = make_trainer(tiny_model_path, gradient_checkpointing=False, ppo_epochs=1)
    assert recomputing.policy.is_gradient_checkpointing and not keeping.policy.is_gradient_checkpointing
    rollout = recomputing.rollout(PROMPTS[:8])
    before = [p.detach().clone() for p in recomputing.trainable]
    recomputing.update(rollout)
    keeping.update(rollout)
    moved = max((a - b).abs().max().item() for a, b in zip(recomputing.trainable, before, strict=True))
    assert moved > 1e-4  # the update did something...
    for a, b in zip(recomputing.trainable, keeping.trainable, strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # ...and the same thing


def test_value_head_on_the_policy_shares_its_forward_pass(tiny_model_path, one_thread):
    """With the value head on the policy's trunk, the rollout's log-probs are the policy's own (one pass gives both),
    the values start at 0, and the value loss reaches the policy's LoRA as well as the head."""
    trainer = make_trainer(tiny_model_path, value_on_policy=True, ppo_epochs=1)
    assert trainer.shared_value and {n for n, _ in trainer.value_model.named_parameters()} == {"head.weight"}
    rollout = trainer.rollout(PROMPTS[:4])
    assert rollout.values.abs().max() == 0
    response = rollout.sequences[:, rollout.prompt_length:]
    with torch.no_grad():
        logits = trainer.policy(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits
    own = logits[:, rollout.prompt_length - 1:-1].float().log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
    assert torch.allclose(own * rollout.mask, rollout.logprobs * rollout.mask, atol=1e-5)
    trainer = make_trainer(tiny_model_path, value_on_policy=True, vf_coef=1.0)
    rollout.advantages.zero_()  # no policy-gradient signal: only the value loss moves anything
    before = [p.detach().clone() for p in trainer.trainable]
    trainer.update(rollout)
    moved = [(a - b).abs().max().item() for a, b in zip(trainer.trainable, before, strict=True)]
    assert moved[-1] > 0 and max(moved[:-1]) > 0  # the head (last) and the policy's LoRA


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=NEEDS_BF16)])
def test_sampling_copy_is_the_policy_as_trained(tiny_model_path, one_thread, precision):
    """The merged copy that samples gives the trained policy's next-token distribution after updates (the same
    logits under fp32; within bf16 rounding under bf16), its tied input embeddings untouched by the output
    layer's adapter, and sampling is seeded: the same rollout twice from the same state."""
    trainer = make_trainer(tiny_model_path, precision=precision, ppo_epochs=1)
    for _ in range(2):
        trainer.step(PROMPTS[:8])
    sampler = trainer.sampling_model()
    batch = trainer.tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad(), trainer.autocast():
        ours = trainer.policy(**batch).logits.float().log_softmax(-1)
        theirs = sampler(**batch).logits.float().log_softmax(-1)
    mask = batch["attention_mask"].bool()
    gap = (ours - theirs).abs()[mask].max().item()
    assert gap < (1e-4 if precision == "fp32" else 0.1), gap
    assert (ours.exp() - theirs.exp()).abs()[mask].max() < (1e-5 if precision == "fp32" else 0.01)
    base = trainer.policy.get_base_model()
    assert torch.equal(sampler.get_input_embeddings().weight.float(), base.get_input_embeddings().weight.float())
    state = torch.get_rng_state()
    first = trainer.sample(batch)
    torch.set_rng_state(state)
    assert torch.equal(trainer.sample(batch), first)


def test_ptx_loss_is_mixed_in_and_learned(tiny_model_path, one_thread):
    """PPO-ptx with a flat reward: the language-modelling loss on the ptx text falls."""
    trainer = make_trainer(tiny_model_path)
    ids = trainer.tokenizer("the cat sat on the mat. " * 4, add_special_tokens=False)["input_ids"]
    trainer = make_trainer(tiny_model_path, reward_fn=lambda prompts, responses: torch.zeros(len(responses)),
                           ptx_data=[ids], ptx_coef=1.0, ptx_batch_size=2, ppo_epochs=2)
    losses = [trainer.step(PROMPTS[:8])[0]["ptx_loss"] for _ in range(8)]
    assert losses[-1] < losses[0] - 0.5, losses
    with pytest.raises(ValueError, match="ptx data"):
        make_trainer(tiny_model_path, ptx_coef=0.5)


def test_padding_after_eos_is_masked(tiny_model_path, one_thread):
    """A response that ends early: its mask stops at the end-of-sequence token, padding gets no reward or KL."""
    trainer = make_trainer(tiny_model_path, max_new_tokens=8)
    eos = trainer.tokenizer.eos_token_id
    real_sample = trainer.sample

    def early_eos(batch):
        sequences = real_sample(batch)
        prompt_length = batch["input_ids"].shape[1]
        sequences[0, prompt_length + 2] = eos  # the first response ends at its third token
        sequences[0, prompt_length + 3:] = trainer.tokenizer.pad_token_id
        return sequences

    trainer.sample = early_eos
    rollout = trainer.rollout(PROMPTS[:2])
    assert rollout.mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert not rollout.truncated[0] and rollout.truncated[1]
    assert rollout.rewards[0, 3:].abs().sum() == 0 and rollout.kl[0, 3:].abs().sum() == 0
    assert rollout.advantages[0, 3:].abs().sum() == 0
    # the score sits on the last real token (plus that token's KL penalty)
    beta = trainer.kl_controller.beta
    assert rollout.rewards[0, 2].item() == pytest.approx(rollout.scores[0].item() - beta * rollout.kl[0, 2].item(),
                                                         abs=1e-5)


# ----------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny reward model from the reward stage (a few steps: PPO only needs its plumbing here)."""
    from datasets import Dataset, DatasetDict

    from tests.test_reward import TINY, identifiable_comparisons

    tmp = tmp_path_factory.mktemp("ppo_reward")
    DatasetDict(train=Dataset.from_list(identifiable_comparisons(12, seed=1))).save_to_disk(str(tmp / "cmp"))
    result = run_align("reward", *TINY, "--dataset_name", tmp / "cmp", "--output_dir", tmp / "rm", "--max_steps", "2",
                       "--per_device_train_batch_size", "2", "--eval_fraction", "0", "--max_length", "128")
    assert result.returncode == 0, result.stderr[-2000:]
    return tmp / "rm"


def ppo_args(reward_dir, out) -> list[str]:
    return ["ppo", "--model_name_or_path", "tiny-llama", "--reward_model", str(reward_dir), "--dataset_name",
            str(DEMONSTRATIONS), "--output_dir", str(out), "--total_steps", "6", "--rollout_batch_size", "4",
            "--mini_batch_size", "2", "--ppo_epochs", "1", "--max_new_tokens", "8", "--save_steps", "2",
            "--sample_steps", "2", "--lora_r", "4", "--lora_alpha", "8", "--seed", "0"]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_stage_writes_adapter_card_and_logs(reward_dir, tmp_path):
    from align.lm.models import load_causal_lm, resolve_model

    out = tmp_path / "ppo"
    result = run_align(*ppo_args(reward_dir, out), "--ptx_dataset", DEMONSTRATIONS, "--ptx_coef", "0.1",
                       "--eval_prompts", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = read_manifest(out)
    assert manifest["metrics"]["eval_prompts"] == 4
    assert all(math.isfinite(manifest["metrics"][k]) for k in ("eval_reward_before", "eval_reward_after"))
    assert "held-out prompts" in result.stderr
    assert manifest["metrics"]["steps"] == 6 and manifest["depends_on"]["reward_model"] == str(reward_dir)
    assert set(manifest["inputs"]) == {"dataset", "reward_model"}
    rows = history(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(len(r["prompts"]) == 4 for r in rows)
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["score_mean"]) and r["ptx_loss"] > 0 for r in rows)
    assert all(r["seconds"] > 0 and r["rss_gb"] > 0.1 for r in rows)  # time and memory of every iteration
    metrics = manifest["metrics"]
    assert metrics["seconds_per_step"] > 0 and metrics["peak_rss_gb"] >= metrics["rss_gb_last"] > 0.1
    samples = (out / "logs" / "samples.jsonl").read_text().splitlines()
    assert {json.loads(s)["step"] for s in samples} == {2, 4, 6}
    card = (out / "adapter" / "README.md").read_text()
    assert "reward_model" in card and str(reward_dir) in card
    assert not (out / "checkpoints").exists()
    model = load_causal_lm(resolve_model("tiny-llama"), adapter=str(out))
    assert model is not None


def test_killed_run_resumes_with_the_same_data_order(reward_dir, tmp_path):
    """SIGKILL after checkpoint-2; the re-run resumes there, and steps 3-6 see the same prompts as an
    uninterrupted run (and, with the RNG states restored, the same scores)."""
    reference = tmp_path / "ref"
    assert run_align(*ppo_args(reward_dir, reference)).returncode == 0
    out = tmp_path / "out"
    checkpoint = tmp_path / "out.partial" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    kill_after_journal_line(ppo_args(reward_dir, out), checkpoint, tmp_path / "first.log", env, lines=0)
    second = run_align(*ppo_args(reward_dir, out))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint-" in second.stderr
    resumed_at = int(read_manifest(out)["resumed_from"].split("-")[1])
    assert resumed_at >= 2
    rows, expected = history(out), history(reference)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["prompts"] for r in rows] == [r["prompts"] for r in expected]
    assert [r["score_mean"] for r in rows] == pytest.approx([r["score_mean"] for r in expected], abs=1e-4)


def test_missing_reward_model_is_one_line(tmp_path):
    result = run_align(*ppo_args(tmp_path / "nowhere", tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: ppo: no reward model at {tmp_path / 'nowhere'} — pass an `align reward` output directory"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_kl_guard_stops_with_the_last_good_checkpoint(reward_dir, tmp_path):
    """Step 1 has KL 0 (the new adapter starts at zero) and is checkpointed; a later step drifts past the bound
    and the run stops, naming the newest checkpoint, which is on disk and older than the failing step."""
    import re

    out = tmp_path / "out"
    result = run_align(*ppo_args(reward_dir, out), "--max_kl", "1e-9", "--save_steps", "1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ppo: mean KL") and "exceeded --max_kl" in lines[-1]
    found = re.search(r"at step (\d+); last good checkpoint: (\S+) —", lines[-1])
    assert found, lines[-1]
    failed_at, checkpoint = int(found.group(1)), Path(found.group(2))
    assert checkpoint.parent == tmp_path / "out.partial" / "checkpoints"
    assert (checkpoint / "trainer_state.json").exists() and int(checkpoint.name.split("-")[1]) == failed_at - 1
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.distributed
@pytest.mark.slow
def test_two_cpu_processes_share_each_batch(reward_dir, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank samples half of every batch, statistics are merged."""
    import shutil

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun not found next to the interpreter"
    out = tmp_path / "ddp"
    result = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "align.ppo", *ppo_args(reward_dir, out)[1:]],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_manifest(out)["world_size"] == 2
    assert "rank 0/2 sampled 12 prompts" in result.stderr and "rank 1/2 sampled 12 prompts" in result.stderr
    rows = history(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(math.isfinite(r["kl"]) for r in rows)
