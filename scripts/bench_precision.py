"""Benchmark: bf16 against fp32 on this machine, for training (SFT, reward) and for prefill, side by side.

- **Training**: `align sft` (the team's demonstrations, `configs/sft.yaml`) and `align reward` (OASST human
  rankings, trees 1-64 for training, 65-80 held out) run the same number of optimizer steps on the same batches
  under `--precision fp32` and `--precision bf16` (mixed precision: fp32 weights and optimizer states, autocast
  forward). Reported: training tokens per second (tokens of the batches seen / `train_runtime`), the held-out
  SFT loss and the reward model's held-out pairwise ranking accuracy of both, so a speed-up that changes what
  is learned would show.
- **Prefill**: one forward pass over `--prefill_batch` x `--prefill_tokens` tokens of the default model with
  fp32 weights (what every stage ran before) and with bf16 weights (what frozen generators load under
  `--precision bf16`), best of 3.

    .venv/bin/python scripts/bench_precision.py                  # ~15 min on 2 CPU cores
    .venv/bin/python scripts/bench_precision.py --sft_steps 4 --reward_steps 2   # quick look

Last line: `RESULT train_speedup=<min of sft, reward> sft_speedup=... reward_speedup=... prefill_speedup=...
loss_fp32=... loss_bf16=... acc_fp32=... acc_bf16=...`; the numbers also go to runs/bench/precision.json.
The reward part needs ../shared/data/oasst (skipped, with a note, without it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OASST = REPO.parent / "shared" / "data" / "oasst" / "en_trees_80.jsonl"
sys.path.insert(0, str(REPO))


def align(*args: str) -> None:
    """Run one `align` command in its own process (so each run has the machine to itself), failing loudly."""
    command = [sys.executable, "-m", "align.cli", *args]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-3000:]}")


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def training_tokens(stage_dir: Path) -> int:
    """Tokens in the batches the trainer saw (padding included): transformers' `num_input_tokens_seen`."""
    records = [json.loads(line) for line in (stage_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    counted = [r["num_input_tokens_seen"] for r in records if "num_input_tokens_seen" in r]
    return int(max(counted)) if counted else 0


def train_both(stage: str, base_args: list[str], scratch: Path) -> dict:
    """The same run under fp32 and bf16: runtime, tokens/s and the held-out figures from each manifest."""
    results = {}
    for precision in ("fp32", "bf16"):
        out = scratch / f"{stage}-{precision}"
        start = time.perf_counter()
        align(stage, *base_args, "--precision", precision, "--output_dir", str(out), "--report_to", "none",
              "--include_num_input_tokens_seen", "true")
        wall = time.perf_counter() - start
        metrics = manifest(out)["metrics"]
        tokens = training_tokens(out)
        runtime = metrics["train_runtime_s"]
        results[precision] = {"train_runtime_s": runtime, "wall_s": wall, "tokens": tokens,
                              "tokens_per_s": tokens / runtime if runtime and tokens else None,
                              **{k: metrics.get(k) for k in ("eval_loss", "eval_loss_before", "eval_accuracy",
                                                              "eval_accuracy_before", "global_step")}}
        print(f"  {stage} {precision}: {runtime:.1f} s training ({metrics.get('global_step')} steps, {tokens} tokens, "
              f"{results[precision]['tokens_per_s'] or 0:.0f} tokens/s), held-out "
              + (f"loss {metrics.get('eval_loss_before'):.4f} -> {metrics.get('eval_loss'):.4f}" if stage == "sft" else
                 f"accuracy {metrics.get('eval_accuracy_before')} -> {metrics.get('eval_accuracy')}"), flush=True)
    results["speedup"] = results["fp32"]["train_runtime_s"] / results["bf16"]["train_runtime_s"]
    return results


def prefill(batch: int, tokens: int) -> dict:
    import torch

    from align.lm.models import DEFAULT_MODEL, load_causal_lm, resolve_model

    path = resolve_model(DEFAULT_MODEL)
    ids = torch.randint(100, 40000, (batch, tokens), generator=torch.Generator().manual_seed(0))
    results = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = load_causal_lm(path, dtype=dtype).eval()
        times = []
        with torch.inference_mode():
            model(input_ids=ids[:, :64], logits_to_keep=1)  # warm-up
            for _ in range(3):
                start = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                times.append(time.perf_counter() - start)
        results[name] = {"seconds": min(times), "tokens_per_s": batch * tokens / min(times)}
        print(f"  prefill {name} weights: {min(times):.2f} s for {batch}x{tokens} tokens "
              f"({batch * tokens / min(times):.0f} tokens/s)", flush=True)
        del model
    results["speedup"] = results["fp32"]["seconds"] / results["bf16"]["seconds"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft_steps", type=int, default=12, help="Optimizer steps of each SFT run (batch 8).")
    parser.add_argument("--reward_steps", type=int, default=8, help="Optimizer steps of each reward run (4 prompts).")
    parser.add_argument("--prefill_batch", type=int, default=4)
    parser.add_argument("--prefill_tokens", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "precision.json"))
    args = parser.parse_args()

    import torch

    from align.lm.precision import choose_precision, cpu_bf16_flag

    if not choose_precision("auto", "cpu").is_bf16:
        sys.exit("this CPU has no native bf16: nothing to compare (bf16 would be emulated)")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, bf16 flag "
          f"{cpu_bf16_flag()}, torch {torch.__version__}", flush=True)
    report: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    print("prefill", flush=True)
    report["prefill"] = prefill(args.prefill_batch, args.prefill_tokens)
    with tempfile.TemporaryDirectory(prefix="bench_precision_") as scratch_dir:
        scratch = Path(scratch_dir)
        print(f"sft: {args.sft_steps} steps of configs/sft.yaml", flush=True)
        report["sft"] = train_both("sft", ["--config", "configs/sft.yaml", "--max_steps", str(args.sft_steps),
                                           "--eval_strategy", "no", "--save_steps", "1000"], scratch)
        if OASST.exists():
            comparisons = scratch / "oasst"
            align("comparisons", "--config", "configs/comparisons.yaml", "--output_dir", str(comparisons))
            print(f"reward: {args.reward_steps} steps of configs/reward.yaml on OASST trees 1-64, held out 65-80",
                  flush=True)
            report["reward"] = train_both("reward", ["--config", "configs/reward.yaml", "--dataset_name",
                                                     str(comparisons), "--max_steps", str(args.reward_steps),
                                                     "--eval_strategy", "no", "--save_steps", "1000"], scratch)
        else:
            print(f"reward: skipped ({OASST} not found)")
    speedups = [report[k]["speedup"] for k in ("sft", "reward") if k in report]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    sft, reward = report["sft"], report.get("reward")
    fields = {
        "train_speedup": f"{min(speedups):.2f}",
        "sft_speedup": f"{sft['speedup']:.2f}",
        "reward_speedup": f"{reward['speedup']:.2f}" if reward else "null",
        "prefill_speedup": f"{report['prefill']['speedup']:.2f}",
        "loss_fp32": f"{sft['fp32']['eval_loss']:.4f}",
        "loss_bf16": f"{sft['bf16']['eval_loss']:.4f}",
        "acc_fp32": f"{reward['fp32']['eval_accuracy']:.3f}" if reward else "null",
        "acc_bf16": f"{reward['bf16']['eval_accuracy']:.3f}" if reward else "null",
    }
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
