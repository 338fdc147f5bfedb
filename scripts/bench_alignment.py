"""Benchmark: does the pipeline make SmolLM2-135M-Instruct better, by a judge PPO never optimised?

One run, every stage through the `align` command as a user runs it:

1. Human rankings: `align comparisons --config configs/comparisons.yaml` (the 80 OASST trees in
   ../shared/data), split by conversation into two halves (no tree in both, `grouped_folds`).
2. SFT on the team's demonstrations (`configs/sft.yaml`).
3. The proxy: an LM reward model (`configs/reward.yaml`, from the SFT model, 256 tokens) on half A.
4. The gold judge: the embedding judge (`configs/reward_embedding.yaml`, another family) on half B — rankings
   the proxy never saw — cross-validated on B to say how much it knows.
5. PPO from the SFT policy against the proxy (`configs/ppo.yaml`) on the Self-Instruct paper's 175 seed
   instructions (../shared/data/self_instruct; no judge trained on them), minus `--eval_prompts` held out
   for the report, logging both judges every `--eval_steps` (the over-optimisation curve); then the same run
   with `--value_model policy` (the value head on the policy instead of a value model from the reward model).
6. The anchor: TRL's `RLOOTrainer` from the same SFT policy against the same proxy, on the prompts PPO trained on,
   with the same budget (completions sampled, optimizer steps of 4 completions, passes per batch, learning rate,
   KL coefficient, LoRA shape, response length); 2 samples of 4 prompts per batch where PPO takes 8 prompts once.
7. `align evaluate` on the held-out instructions: base, SFT, PPO at each evaluation step, PPO with the value
   head on the policy, RLOO, judged by both;
   SFT is the baseline and the reference (KL, best-of-n).

    .venv/bin/python scripts/bench_alignment.py              # about an hour on 2 CPU cores
    .venv/bin/python scripts/bench_alignment.py --reuse      # keep the finished stages in --work
    .venv/bin/python scripts/bench_alignment.py --intermediate 0   # report only the final PPO policies
    .venv/bin/python scripts/bench_alignment.py --model tiny-llama --ppo_steps 4 --eval_prompts 8   # plumbing

The last line printed is
`RESULT proxy_gain_std=... kl=... gold_winrate=... gold_winrate_lo=... lc_winrate=... rloo_gold_winrate=...
rloo_proxy_gain_std=... rloo_kl=... head_gold_winrate=... head_proxy_gain_std=... head_kl=... minutes=...`
(proxy_gain_std: PPO's minus SFT's mean proxy score of greedy responses, in proxy reward standard deviations;
kl: PPO's KL to SFT in nats per response; the win rates: PPO over SFT by the gold judge, plain with its lower
95% bound, and length-controlled; the rloo_ and head_ figures the same for TRL's RLOO policy and for PPO with
`--value_model policy`); everything also goes to
runs/bench/alignment.json.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_reward_quality import OASST_TREES, run  # noqa: E402 - the same child-process runner

SEED_TASKS = REPO.parent / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"


def instruction_prompts(path: Path, held_out: int, seed: int, work: Path) -> Path:
    """The seed instructions as prompts (instruction, then the first instance's input when it has one), split
    into train (PPO) and test (the report), saved as a dataset."""
    from datasets import Dataset, DatasetDict

    prompts = []
    for line in path.read_text().splitlines():
        task = json.loads(line)
        given = (task.get("instances") or [{}])[0].get("input", "").strip()
        prompts.append(task["instruction"].strip() + (f"\n\n{given}" if given else ""))
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    test = sorted(order[:held_out])
    train = sorted(order[held_out:])
    out = work / "prompts"
    DatasetDict(train=Dataset.from_dict({"prompt": [prompts[i] for i in train]}),
                test=Dataset.from_dict({"prompt": [prompts[i] for i in test]})).save_to_disk(str(out))
    return out


def split_rankings(comparisons: Path, work: Path, seed: int) -> tuple[Path, Path]:
    """Half A (proxy) and half B (gold) of every ranking, by conversation."""
    from datasets import DatasetDict, concatenate_datasets, load_from_disk

    from align.preferences.cross_validation import conversation_key, grouped_folds

    data = load_from_disk(str(comparisons / "dataset"))
    rows = concatenate_datasets([data[s] for s in data])
    folds = grouped_folds([conversation_key(p) for p in rows["prompt"]], 2, seed)
    paths = []
    for half in (0, 1):
        path = work / f"rankings_{'ab'[half]}"
        DatasetDict(train=rows.select([i for i, f in enumerate(folds) if f == half])).save_to_disk(str(path))
        paths.append(path)
    return paths[0], paths[1]


def train_rloo(work: Path, model: str, ppo_steps: int, max_new_tokens: int) -> None:
    """(In a child process.) TRL's RLOOTrainer with PPO's settings (read from its manifest) on the prompts PPO
    trained on; writes `rloo/adapter` (a LoRA over the SFT-merged model) and `rloo/log_history.json`."""
    import torch
    from datasets import Dataset, load_from_disk
    from peft import LoraConfig
    from transformers import set_seed
    from trl import RLOOConfig, RLOOTrainer

    from align.lm.models import load_causal_lm, load_tokenizer, merge_adapter, resolve_model
    from align.lm.precision import choose_precision
    from align.preferences.format import as_messages
    from align.rlhf.reward_model import RewardModelScorer, load_reward_model, prepare_for_scoring

    ppo = work / "ppo"
    config = json.loads((ppo / "manifest.json").read_text())["config"]
    data, settings = config["data"], config["ppo"]
    held_out = {json.dumps(json.loads(line)["prompt"])
                for line in (ppo / "eval_prompts.jsonl").read_text().splitlines()}
    prompts = [p for p in load_from_disk(str(work / "prompts"))["train"]["prompt"] if json.dumps(p) not in held_out]
    set_seed(settings["seed"])
    model_path = resolve_model(model)
    tokenizer = load_tokenizer(model_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = choose_precision(data["precision"], device)
    reward, reward_tokenizer, manifest = load_reward_model(str(work / "proxy"), dtype=torch.float32)
    metrics = manifest.get("metrics", {})
    scorer = RewardModelScorer(prepare_for_scoring(reward, precision, device), reward_tokenizer,  # as align.ppo does
                               float(metrics.get("reward_mean", 0.0)), float(metrics.get("reward_std", 1.0)),
                               data["reward_max_length"])

    def proxy(prompts, completions, **kwargs):
        return scorer(prompts, [c[-1]["content"] if isinstance(c, list) else c for c in completions]).tolist()

    per_step, passes = settings["mini_batch_size"], settings["ppo_epochs"]
    per_batch = data["rollout_batch_size"]  # completions per batch, as PPO samples them
    out = work / "rloo"
    trainer = RLOOTrainer(
        model=merge_adapter(load_causal_lm(model_path), str(work / "sft")), reward_funcs=proxy,
        args=RLOOConfig(
            output_dir=str(out / "trainer"), per_device_train_batch_size=per_step,
            steps_per_generation=per_batch // per_step, num_generations=2, num_iterations=passes,
            max_steps=ppo_steps * passes * (per_batch // per_step), max_completion_length=max_new_tokens,
            temperature=settings["temperature"], top_p=settings["top_p"], top_k=0, beta=settings["init_kl_coef"],
            epsilon=settings["clip_range"], learning_rate=settings["learning_rate"],
            max_grad_norm=settings["max_grad_norm"],
            lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
            seed=settings["seed"], bf16=precision.is_bf16, use_cpu=device == "cpu"),
        train_dataset=Dataset.from_dict({"prompt": [as_messages(p) for p in prompts]}), processing_class=tokenizer,
        peft_config=LoraConfig(r=data["lora_r"], lora_alpha=data["lora_alpha"], lora_dropout=data["lora_dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.model.save_pretrained(str(out / "adapter"))
    tokenizer.save_pretrained(str(out / "adapter"))
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))


def stage(args: list[str], output: Path, log: Path, timings: dict, name: str) -> None:
    """Run a stage unless its finished output is already there (then reuse it)."""
    if (output / "manifest.json").exists():
        timings[name] = "reused"
        return
    timings[name] = run(args, log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Override the base model (e.g. tiny-llama for plumbing).")
    parser.add_argument("--ppo_steps", type=int, default=30, help="PPO iterations (8 prompts each).")
    parser.add_argument("--eval_steps", type=int, default=10, help="PPO evaluates with both judges every N steps.")
    parser.add_argument("--eval_prompts", type=int, default=48, help="Instructions held out for the report.")
    parser.add_argument("--num_samples", type=int, default=4, help="Sampled responses per prompt and policy.")
    parser.add_argument("--best_of_n", type=int, default=16, help="SFT samples per prompt for best-of-n.")
    parser.add_argument("--max_new_tokens", type=int, default=48, help="Response length (PPO's and the report's).")
    parser.add_argument("--intermediate", type=int, choices=(0, 1), default=1,
                        help="1: also evaluate PPO's policies at its evaluation steps (0: only the final ones).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="Keep finished stage outputs in --work.")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "alignment"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "alignment.json"))
    parser.add_argument("--rloo_child", action="store_true", help=argparse.SUPPRESS)  # step 6, in a child process
    args = parser.parse_args()
    if args.rloo_child:
        return train_rloo(Path(args.work), args.model or "smollm2-135m-instruct", args.ppo_steps, args.max_new_tokens)
    for path in (OASST_TREES, SEED_TASKS):
        if not path.exists():
            raise SystemExit(f"{path} is missing (../shared/data)")

    started = time.perf_counter()
    work = Path(args.work)
    if work.exists() and not args.reuse:
        raise SystemExit(f"{work} exists — pass --reuse to keep its finished stages, or remove it")
    work.mkdir(parents=True, exist_ok=True)
    model = ["--model_name_or_path", args.model] if args.model else []
    timings: dict = {}
    comparisons = work / "comparisons"
    stage(["comparisons", "--config", "configs/comparisons.yaml", "--input_path", str(OASST_TREES), "--output_dir",
           str(comparisons)], comparisons, work / "comparisons.log", timings, "comparisons")
    half_a, half_b = split_rankings(comparisons, work, args.seed)
    prompts = instruction_prompts(SEED_TASKS, args.eval_prompts, args.seed, work)
    sft, proxy, gold, ppo, report = (work / n for n in ("sft", "proxy", "gold", "ppo", "evaluate"))
    stage(["sft", "--config", "configs/sft.yaml", *model, "--output_dir", str(sft), "--report_to", "none"], sft,
          work / "sft.log", timings, "sft")
    stage(["reward", "--config", "configs/reward.yaml", *model, "--dataset_name", str(half_a), "--sft_adapter",
           str(sft), "--max_length", "256", "--eval_fraction", "0.15", "--output_dir", str(proxy), "--report_to",
           "none"], proxy, work / "proxy.log", timings, "proxy")
    stage(["reward", "--config", "configs/reward_embedding.yaml", "--dataset_name", str(half_b), "--cv_folds", "5",
           "--eval_fraction", "0", "--output_dir", str(gold)], gold, work / "gold.log", timings, "gold")
    stage(["ppo", "--config", "configs/ppo.yaml", *model, "--dataset_name", str(prompts), "--dataset_split", "train",
           "--sft_adapter", str(sft), "--reward_model", str(proxy), "--total_steps", str(args.ppo_steps),
           "--max_new_tokens", str(args.max_new_tokens), "--eval_prompts", "8", "--eval_steps", str(args.eval_steps),
           "--eval_judges", f"gold={gold}", "--save_steps", str(args.eval_steps), "--output_dir", str(ppo)],
          ppo, work / "ppo.log", timings, "ppo")
    ppo_head = work / "ppo_head"
    stage(["ppo", "--config", "configs/ppo.yaml", *model, "--dataset_name", str(prompts), "--dataset_split", "train",
           "--sft_adapter", str(sft), "--reward_model", str(proxy), "--value_model", "policy", "--total_steps",
           str(args.ppo_steps), "--max_new_tokens", str(args.max_new_tokens), "--eval_prompts", "8", "--eval_steps",
           str(args.eval_steps), "--eval_judges", f"gold={gold}", "--save_steps", str(args.eval_steps),
           "--output_dir", str(ppo_head)], ppo_head, work / "ppo_head.log", timings, "ppo_head")
    rloo = work / "rloo"
    if (rloo / "log_history.json").exists():
        timings["rloo"] = "reused"
    else:
        child = ["--rloo_child", "--work", str(work), "--ppo_steps", str(args.ppo_steps), "--max_new_tokens",
                 str(args.max_new_tokens), *(["--model", args.model] if args.model else [])]
        timings["rloo"] = run(child, work / "rloo.log", program=(__file__,))
    base = args.model or "smollm2-135m-instruct"
    steps = sorted(int(p.name.split("-")[1]) for p in (ppo / "eval_adapters").iterdir())
    policies = [f"base={base}", f"sft={base}+{sft}",
                *[f"ppo{s}={base}+{ppo}/eval_adapters/step-{s}" for s in steps if s != args.ppo_steps
                  and args.intermediate],
                f"ppo={base}+{ppo}", f"ppo_head={base}+{ppo_head}", f"rloo={base}+{sft}+{rloo / 'adapter'}"]
    stage(["evaluate", "--dataset_name", str(prompts), "--dataset_split", "test", "--max_prompts",
           str(args.eval_prompts), "--policies", *policies, "--baseline", "sft", "--judges", f"proxy={proxy}",
           f"gold={gold}", "--num_samples", str(args.num_samples), "--best_of_n", str(args.best_of_n),
           "--max_new_tokens", str(args.max_new_tokens), "--output_dir", str(report)], report,
          work / "evaluate.log", timings, "evaluate")

    summary = json.loads((report / "summary.json").read_text())
    judges = summary["judges"]
    gold_ppo, gold_rloo = judges["gold"]["policies"]["ppo"], judges["gold"]["policies"]["rloo"]
    proxy_scores = judges["proxy"]["policies"]
    proxy_gain = proxy_scores["ppo"]["score"]["mean"] - proxy_scores["sft"]["score"]["mean"]
    rloo_gain = proxy_scores["rloo"]["score"]["mean"] - proxy_scores["sft"]["score"]["mean"]
    head_gain = proxy_scores["ppo_head"]["score"]["mean"] - proxy_scores["sft"]["score"]["mean"]
    gold_head = judges["gold"]["policies"]["ppo_head"]

    def kl_of(name):
        kl = summary["policies"][name]["kl"]
        return round(kl["mean"], 3) if kl else None

    gold_manifest = json.loads((gold / "manifest.json").read_text())
    proxy_manifest = json.loads((proxy / "manifest.json").read_text())
    def curve(run):
        return [json.loads(line) for line in (run / "logs" / "eval.jsonl").read_text().splitlines()]

    minutes = (time.perf_counter() - started) / 60
    result = {
        "settings": vars(args), "timings": timings, "minutes": round(minutes, 1),
        "proxy": {"held_out_accuracy": proxy_manifest["metrics"].get("eval_accuracy"),
                  "rows": proxy_manifest["metrics"].get("train_prompts")},
        "gold": {"cv": (gold_manifest.get("cv") or gold_manifest["metrics"].get("cv"))},
        "ppo_eval_curve": curve(ppo), "ppo_head_eval_curve": curve(ppo_head), "report": summary,
        "rloo_log": json.loads((rloo / "log_history.json").read_text()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(summary["headline"]))
    print(f"RESULT proxy_gain_std={proxy_gain:.3f} kl={kl_of('ppo')} "
          f"gold_winrate={gold_ppo['win_rate']['win_rate']:.3f} "
          f"gold_winrate_lo={(gold_ppo['win_rate']['interval'] or [float('nan')])[0]:.3f} "
          f"lc_winrate={gold_ppo['length_controlled']['lc_win_rate']:.3f} "
          f"rloo_gold_winrate={gold_rloo['win_rate']['win_rate']:.3f} rloo_proxy_gain_std={rloo_gain:.3f} "
          f"rloo_kl={kl_of('rloo')} head_gold_winrate={gold_head['win_rate']['win_rate']:.3f} "
          f"head_proxy_gain_std={head_gain:.3f} head_kl={kl_of('ppo_head')} minutes={minutes:.1f}")


if __name__ == "__main__":
    main()
