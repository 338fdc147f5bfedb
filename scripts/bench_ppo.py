"""Benchmark: our PPO loop against TRL's maintained online RL trainer (`RLOOTrainer`), side by side.

Both sides get the same policy (SmolLM2-135M-Instruct + the same LoRA shape), the same prompts, the same
reward model (an `align reward` output, scored through the same `RewardModelScorer`), the same number of
completions per optimizer step and the same generation length and sampling:

- ours: `rollout_batch_size` prompts x 1 sample, one PPO epoch over one minibatch (so one optimizer step
  per rollout, like RLOO), plus what RLOO does not do: a value model (a second 135M backbone with its own
  LoRA) forward and backward pass, and a reference forward pass;
- ours-keep: the same without gradient checkpointing (activations kept for the backward pass), to show
  what recomputing them (our default, and TRL's) saves and costs;
- ours-head: `--value_model policy`, the value head on the policy's trunk: no second backbone, and log-probs
  and values from one forward and backward pass;
- TRL: `RLOOTrainer` with `num_generations=2` (its leave-one-out baseline needs two samples per prompt),
  so half as many prompts give the same number of completions; beta > 0 so it runs its reference pass too.

Each side runs in its own process (so peak memory is its own), does one warm-up step, then `--steps`
timed steps. Reported: completions per second and peak memory (resident set on CPU; allocated on a GPU).

    .venv/bin/python scripts/bench_ppo.py --reward_model runs/reward            # ~10 min on 2 CPU cores
    .venv/bin/python scripts/bench_ppo.py --reward_model runs/reward --steps 2  # quick look

Both sides compute at the same `--precision` (default auto: bf16 mixed precision where the hardware has it).

The last line printed is `RESULT samples_per_s_ours=<a> samples_per_s_trl=<b> ratio=<a/b>
peak_mb_ours=<x> peak_mb_trl=<y> mem_ratio=<x/y> samples_per_s_ours_keep=<c> peak_mb_ours_keep=<z>
ratio_head=<ours-head/b> mem_ratio_head=<..>`; the numbers
also go to runs/bench/ppo.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


# ours (activations recomputed in the backward pass, the default), ours keeping them, ours with the value head on
# the policy, TRL
SIDES = ("ours", "ours-keep", "ours-head", "trl")


def peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_prompts(args) -> list:
    from align.core.inputs import load_stage_dataset
    from align.preferences.prompts import prompt_records

    records = prompt_records(load_stage_dataset(args.dataset, "bench"), None, "output", False, "bench")
    return [record["prompt"] for record in records]


def run_ours(args, gradient_checkpointing: bool = True, value_model: str = "reward") -> dict:
    import torch
    from transformers import set_seed

    from align.ppo import PPOArguments, build_trainer
    from align.rlhf.ppo_trainer import PPOSettings, prompt_order

    settings = PPOSettings(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, ppo_epochs=1,
                           mini_batch_size=args.completions, learning_rate=1e-5, value_learning_rate=1e-5,
                           init_kl_coef=0.05, seed=0, gradient_checkpointing=gradient_checkpointing)
    stage_args = PPOArguments(model_name_or_path=args.model, reward_model=args.reward_model, lora_r=16,
                              lora_alpha=32, rollout_batch_size=args.completions, precision=args.precision,
                              value_model=value_model)
    set_seed(0)
    trainer, _ = build_trainer(stage_args, settings)
    prompts = load_prompts(args)
    times = []
    for step in range(args.steps + 1):
        batch = [prompts[i] for i in prompt_order(step, args.completions, len(prompts), 0)]
        started = time.perf_counter()
        trainer.step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    timed = sum(times[1:])
    return {"samples_per_s": args.completions * args.steps / timed, "step_seconds": times, "peak_mb": peak_mb()}


def run_trl(args) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback, set_seed
    from trl import RLOOConfig, RLOOTrainer

    from align.lm.models import load_causal_lm, load_tokenizer, resolve_model
    from align.lm.precision import choose_precision
    from align.rlhf.reward_model import RewardModelScorer, load_reward_model, prepare_for_scoring

    set_seed(0)
    model_path = resolve_model(args.model)
    tokenizer = load_tokenizer(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = choose_precision(args.precision, device)
    reward, reward_tokenizer, manifest = load_reward_model(args.reward_model, dtype=torch.float32)
    metrics = manifest.get("metrics", {})
    # Scored exactly as ours scores (align.ppo): the same cast, device and length limit.
    scorer = RewardModelScorer(prepare_for_scoring(reward, precision, device), reward_tokenizer,
                               float(metrics.get("reward_mean", 0.0)), float(metrics.get("reward_std", 1.0)), 512)

    def reward_model(prompts, completions, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return scorer(prompts, texts).tolist()

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.started)

    timer = Timer()
    config = RLOOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_rloo_"), per_device_train_batch_size=args.completions,
        num_generations=2, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.05, num_iterations=1, steps_per_generation=1, learning_rate=1e-5, max_steps=args.steps + 1,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
        bf16=precision.is_bf16,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = RLOOTrainer(
        model=load_causal_lm(model_path), reward_funcs=reward_model, args=config,
        train_dataset=Dataset.from_dict({"prompt": load_prompts(args)}), processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    timed = sum(timer.times[1:])
    return {"samples_per_s": args.completions * args.steps / timed, "step_seconds": timer.times, "peak_mb": peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--reward_model", default=str(REPO / "runs" / "reward"))
    parser.add_argument("--dataset", default=str(REPO / "data" / "seed" / "demonstrations.jsonl"))
    parser.add_argument("--completions", type=int, default=8, help="completions per optimizer step (both sides)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=4, help="timed steps after one warm-up step")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="both sides' arithmetic (default auto: bf16 where the hardware has it)")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # one side, in a child process
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "ppo.json"))
    args = parser.parse_args()
    if args.side:
        result = (run_trl(args) if args.side == "trl" else
                  run_ours(args, args.side != "ours-keep", "policy" if args.side == "ours-head" else "reward"))
        print("SIDE " + json.dumps(result), flush=True)
        return

    results = {}
    for side in SIDES:
        command = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        child = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        line = next((x for x in child.stdout.splitlines() if x.startswith("SIDE ")), None)
        if child.returncode != 0 or line is None:
            sys.exit(f"{side} failed:\n{child.stderr[-4000:]}")
        results[side] = json.loads(line[5:])
        result = results[side]
        print(f"{side:>10}: {result['samples_per_s']:.2f} completions/s, peak {result['peak_mb']:.0f} MB, "
              f"steps {[round(t, 1) for t in results[side]['step_seconds']]} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "results": results,
                                          "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}},
                                         indent=2))
    ours, keep, head, trl = results["ours"], results["ours-keep"], results["ours-head"], results["trl"]
    print(f"RESULT samples_per_s_ours={ours['samples_per_s']:.3f} samples_per_s_trl={trl['samples_per_s']:.3f} "
          f"ratio={ours['samples_per_s'] / trl['samples_per_s']:.2f} peak_mb_ours={ours['peak_mb']:.0f} "
          f"peak_mb_trl={trl['peak_mb']:.0f} mem_ratio={ours['peak_mb'] / trl['peak_mb']:.2f} "
          f"samples_per_s_ours_keep={keep['samples_per_s']:.3f} peak_mb_ours_keep={keep['peak_mb']:.0f} "
          f"ratio_head={head['samples_per_s'] / trl['samples_per_s']:.2f} "
          f"mem_ratio_head={head['peak_mb'] / trl['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
