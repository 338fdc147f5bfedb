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
   for the report, logging both judges every `--eval_steps` (the over-optimisation curve).
6. `align evaluate` on the held-out instructions: base, SFT, PPO at each evaluation step, judged by both; SFT
   is the baseline and the reference (KL, best-of-n).

    .venv/bin/python scripts/bench_alignment.py              # about an hour on 2 CPU cores
    .venv/bin/python scripts/bench_alignment.py --reuse      # keep the finished stages in --work
    .venv/bin/python scripts/bench_alignment.py --model tiny-llama --ppo_steps 4 --eval_prompts 8   # plumbing

The last line printed is
`RESULT proxy_gain_std=... kl=... gold_winrate=... gold_winrate_lo=... lc_winrate=... minutes=...`
(proxy_gain_std: PPO's minus SFT's mean proxy score of greedy responses, in proxy reward standard deviations;
kl: PPO's KL to SFT in nats per response; the win rates: PPO over SFT by the gold judge, plain with its lower
95% bound, and length-controlled); everything also goes to runs/bench/alignment.json.
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="Keep finished stage outputs in --work.")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "alignment"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "alignment.json"))
    args = parser.parse_args()
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
    base = args.model or "smollm2-135m-instruct"
    steps = sorted(int(p.name.split("-")[1]) for p in (ppo / "eval_adapters").iterdir())
    policies = [f"base={base}", f"sft={base}+{sft}",
                *[f"ppo{s}={base}+{ppo}/eval_adapters/step-{s}" for s in steps if s != args.ppo_steps],
                f"ppo={base}+{ppo}"]
    stage(["evaluate", "--dataset_name", str(prompts), "--dataset_split", "test", "--max_prompts",
           str(args.eval_prompts), "--policies", *policies, "--baseline", "sft", "--judges", f"proxy={proxy}",
           f"gold={gold}", "--num_samples", str(args.num_samples), "--best_of_n", str(args.best_of_n),
           "--max_new_tokens", str(args.max_new_tokens), "--output_dir", str(report)], report,
          work / "evaluate.log", timings, "evaluate")

    summary = json.loads((report / "summary.json").read_text())
    judges = summary["judges"]
    gold_ppo = judges["gold"]["policies"]["ppo"]
    proxy_scores = judges["proxy"]["policies"]
    proxy_gain = proxy_scores["ppo"]["score"]["mean"] - proxy_scores["sft"]["score"]["mean"]
    kl = summary["policies"]["ppo"]["kl"]["mean"] if summary["policies"]["ppo"]["kl"] else None
    gold_manifest = json.loads((gold / "manifest.json").read_text())
    proxy_manifest = json.loads((proxy / "manifest.json").read_text())
    ppo_curve = [json.loads(line) for line in (ppo / "logs" / "eval.jsonl").read_text().splitlines()]
    minutes = (time.perf_counter() - started) / 60
    result = {
        "settings": vars(args), "timings": timings, "minutes": round(minutes, 1),
        "proxy": {"held_out_accuracy": proxy_manifest["metrics"].get("eval_accuracy"),
                  "rows": proxy_manifest["metrics"].get("train_prompts")},
        "gold": {"cv": (gold_manifest.get("cv") or gold_manifest["metrics"].get("cv"))},
        "ppo_eval_curve": ppo_curve, "report": summary,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join(summary["headline"]))
    print(f"RESULT proxy_gain_std={proxy_gain:.3f} kl={kl if kl is None else round(kl, 3)} "
          f"gold_winrate={gold_ppo['win_rate']['win_rate']:.3f} "
          f"gold_winrate_lo={(gold_ppo['win_rate']['interval'] or [float('nan')])[0]:.3f} "
          f"lc_winrate={gold_ppo['length_controlled']['lc_win_rate']:.3f} minutes={minutes:.1f}")


if __name__ == "__main__":
    main()
