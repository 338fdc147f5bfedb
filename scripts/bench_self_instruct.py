"""Benchmark: Self-Instruct prompt modes side by side — raw text continuation vs. the chat template.

Part 1, classification identification: the seed instructions of the team's file and (when present) the
paper's 175 in `../shared/data/self_instruct/seed_tasks.jsonl` carry human `is_classification` labels. For
each prompt mode it reports ROC-AUC of the model's Yes-No log-probability margin, and accuracy, balanced
accuracy and the share called classification for the plain argmax (margin > 0) and for the threshold the
stage calibrates on its prompt's own examples.

Part 2, generation: runs `align self-instruct` twice in this process with identical settings (model, seed
tasks, seed, number of prompts, token limits) except `--prompt_mode`, and reports for each: candidates
parsed, tasks accepted, acceptance rate, instances, the top discard reasons, and wall time (tasks accepted
per minute). Both runs do one round of `--prompts` prompts, so they cost the same number of instruction generations.

Run it from the repository root:

    .venv/bin/python scripts/bench_self_instruct.py                 # SmolLM2-135M-Instruct, 16 prompts: ~25 min
    .venv/bin/python scripts/bench_self_instruct.py --prompts 4     # quick look

The last line printed is `RESULT accepted_completion=<a> accepted_chat=<b> rate_completion=<x>
rate_chat=<y> per_min_completion=<p> per_min_chat=<q> auc_completion=<u> auc_chat=<v>
balanced_acc_calibrated=<c> balanced_acc_argmax=<d>` (the last two in completion mode); everything also
goes to runs/bench/self_instruct.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from align import self_instruct  # noqa: E402
from align.core.outputs import read_manifest  # noqa: E402
from align.instruct.loop import LocalModel, SelfInstruct, SelfInstructSettings  # noqa: E402
from align.instruct.prompts import Prompts  # noqa: E402
from align.instruct.tasks import load_seed_tasks  # noqa: E402

PAPER_SEEDS = REPO.parent / "shared" / "data" / "self_instruct" / "seed_tasks.jsonl"


def roc_auc(labels: list[bool], scores: list[float]) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    positives = [s for s, y in zip(scores, labels, strict=True) if y]
    negatives = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def decisions(labels: list[bool], called: list[bool]) -> dict:
    tp = sum(c and y for c, y in zip(called, labels, strict=True))
    tn = sum(not c and not y for c, y in zip(called, labels, strict=True))
    positives = sum(labels)
    return {"accuracy": round((tp + tn) / len(labels), 3),
            "balanced_accuracy": round((tp / positives + tn / (len(labels) - positives)) / 2, 3),
            "called_classification": round(sum(called) / len(labels), 3)}


def classification_quality(mode: str, model, tokenizer, tasks) -> dict:
    """Part 1 for one prompt mode: the stage's own margin and threshold on labelled instructions."""
    loop = SelfInstruct(SelfInstructSettings(), tasks, LocalModel(model, tokenizer, 8), Prompts(mode))
    started = time.perf_counter()
    threshold = loop.classification_threshold()
    margins = loop._yes_margins([task.instruction for task in tasks])
    labels = [task.is_classification for task in tasks]
    result = {"n": len(tasks), "positives": sum(labels), "auc": round(roc_auc(labels, margins), 3),
              "threshold": round(threshold, 3), "argmax": decisions(labels, [m > 0 for m in margins]),
              "calibrated": decisions(labels, [m > threshold for m in margins]),
              "seconds": round(time.perf_counter() - started, 1)}
    print(f"{mode:>10}: classification on {result['n']} labelled seeds ({result['positives']} positive): "
          f"AUC {result['auc']}, argmax {result['argmax']}, calibrated {result['calibrated']}", flush=True)
    return result


def run_mode(mode: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / mode
    argv = ["--seed_tasks", args.seed_tasks, "--model_name_or_path", args.model, "--prompt_mode", mode,
            "--output_dir", str(out), "--num_instructions", "100000", "--max_rounds", "1",
            "--prompts_per_round", str(args.prompts), "--batch_size", str(args.batch_size),
            "--max_new_tokens", str(args.max_new_tokens),
            "--instance_max_new_tokens", str(args.instance_max_new_tokens), "--seed", str(args.seed)]
    started = time.perf_counter()
    self_instruct.main(argv)
    seconds = time.perf_counter() - started
    metrics = read_manifest(out)["metrics"]
    reasons = sorted(metrics["discarded_instructions"].items(), key=lambda item: -item[1])
    print(f"{mode:>10}: {metrics['candidates']} candidates, {metrics['generated_tasks']} accepted "
          f"({metrics['acceptance_rate']:.0%}), {metrics['generated_instances']} instances, {seconds:.0f} s; "
          f"top discards: {', '.join(f'{k} {v}' for k, v in reasons[:4])}", flush=True)
    return {"seconds": round(seconds, 1), "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--seed_tasks", default=str(REPO / "data" / "seed" / "seed_tasks.jsonl"))
    parser.add_argument("--prompts", type=int, default=16, help="instruction prompts per mode (one round)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=160)
    parser.add_argument("--instance_max_new_tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "self_instruct.json"))
    args = parser.parse_args()

    from align.lm.models import load_causal_lm, load_tokenizer, resolve_model

    model_path = resolve_model(args.model)
    model, tokenizer = load_causal_lm(model_path).eval(), load_tokenizer(model_path)
    labelled = load_seed_tasks(args.seed_tasks)
    if PAPER_SEEDS.exists():
        labelled += load_seed_tasks(PAPER_SEEDS)
    quality = {mode: classification_quality(mode, model, tokenizer, labelled) for mode in ("completion", "chat")}
    del model

    work = Path(tempfile.mkdtemp(prefix="bench_self_instruct_"))
    try:
        results = {mode: run_mode(mode, args, work) for mode in ("completion", "chat")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {"settings": vars(args), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "classification": quality, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))

    def figures(mode: str) -> tuple[int, float, float]:
        result = results[mode]
        accepted = result["metrics"]["generated_tasks"]
        return accepted, result["metrics"]["acceptance_rate"], accepted / (result["seconds"] / 60)

    (a, x, p), (b, y, q) = figures("completion"), figures("chat")
    print(f"RESULT accepted_completion={a} accepted_chat={b} rate_completion={x:.3f} rate_chat={y:.3f} "
          f"per_min_completion={p:.2f} per_min_chat={q:.2f} auc_completion={quality['completion']['auc']} "
          f"auc_chat={quality['chat']['auc']} "
          f"balanced_acc_calibrated={quality['completion']['calibrated']['balanced_accuracy']} "
          f"balanced_acc_argmax={quality['completion']['argmax']['balanced_accuracy']}")


if __name__ == "__main__":
    main()
