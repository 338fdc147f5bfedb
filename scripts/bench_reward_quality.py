"""Benchmark: how well do our judges rank human rankings they never saw, and what does training one cost?

Every judge is trained and scored by `align reward --cv_folds F` itself, on the OASST K-wise rankings
(`align comparisons --config configs/comparisons.yaml`: all 80 trees, 168 rankings, 581 ordered pairs),
cross-validated in folds grouped by conversation (no tree on both sides of a fold; the same folds for
every judge: same data, same seed). Side by side in one run:

- `today`: the LM reward model with the settings `configs/reward.yaml` had before cross-validation was
  run on them (max_length 384, 2 epochs, the whole batch in one pass), cross-validation only.
- `short`: a cheaper candidate (max_length 256, 1 epoch), cross-validation only.
- `embedding`: `configs/reward_embedding.yaml`, the independent judge (frozen all-MiniLM-L6-v2 + a head).
- `longer`: no model — "the longer response wins", the baseline every judge has to beat.
- memory: `configs/reward.yaml` as shipped, trained for `--memory_steps` steps on 4 x that many prompts,
  once with its two-pass steps (`sequences_per_pass 8`) and once in one pass (`0`): peak resident memory
  and seconds per optimizer step of each.

Measured per judge: pooled pairwise accuracy with a 95% interval (bootstrap over conversations), by length
gap, the within-prompt correlation of score and log length, training seconds per fold, peak resident memory
of the process (`os.wait4`), and wall time; and the share of pairs the default LM judge and the embedding
judge order alike (their held-out scores come from the same folds).

    .venv/bin/python scripts/bench_reward_quality.py                  # about 75 minutes on 2 CPU cores
    .venv/bin/python scripts/bench_reward_quality.py --reuse          # read finished judges in --work again
    .venv/bin/python scripts/bench_reward_quality.py --model tiny-llama --folds 2   # plumbing check, minutes

The last line printed is
`RESULT cv_acc=... cv_lo=... cv_acc_before=... embed_cv_acc=... agreement=... peak_rss_gb=... minutes=...`
(cv_acc/cv_lo: the LM settings with the best cross-validated accuracy; cv_acc_before: `today`; peak_rss_gb: the
shipped config's training; minutes: the whole benchmark, or with --reuse the sum of the reused runs' wall times
and this one's); everything also goes to runs/bench/reward_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

OASST_TREES = REPO.parent / "shared" / "data" / "oasst" / "en_trees_80.jsonl"
CANDIDATES = {
    "today": "--max_length 384 --num_train_epochs 2 --warmup_steps 5 --sequences_per_pass 0 --cv_only true",
    "short": "--max_length 256 --num_train_epochs 1 --warmup_steps 3 --sequences_per_pass 8 --cv_only true",
}


def run(args: list[str], log: Path, program: tuple[str, ...] = ("-m", "align.cli")) -> dict:
    """Run `align *args` (or `python *program *args`) in a child process; its wall time and peak resident memory."""
    started = time.perf_counter()
    with open(log, "w") as stderr:
        child = subprocess.Popen([sys.executable, *program, *args], cwd=REPO, stdout=stderr, stderr=stderr,
                                 env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"align {' '.join(args[:3])} ... failed ({code}); see {log}")
    return {"wall_s": round(time.perf_counter() - started, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2)}


def held_out_scores(output: Path, rows: int) -> list[list[float]]:
    """Each row's cross-validated scores, from the stage's fold journal."""
    scores: list = [None] * rows
    for line in (output / "cv" / "folds.jsonl").read_text().splitlines():
        record = json.loads(line)
        for row, row_scores in zip(record["rows"], record["scores"], strict=True):
            scores[row] = row_scores
    return scores


def memory_runs(comparisons: Path, work: Path, model: list[str], steps: int) -> dict:
    """The shipped config trained for `steps` steps (4 prompts each), in two passes and in one; no evaluation."""
    out = {}
    for per_pass in ("8", "0"):
        output = work / f"memory-{per_pass}"
        print(f"== memory: configs/reward.yaml, {steps} steps, --sequences_per_pass {per_pass}", flush=True)
        measured = run(["reward", "--config", "configs/reward.yaml", *model, "--dataset_name", str(comparisons),
                        "--output_dir", str(output), "--max_train_samples", str(4 * steps), "--max_steps",
                        str(steps), "--dataset_test_split", "none", "--eval_fraction", "0", "--save_steps",
                        str(10 * steps), "--sequences_per_pass", per_pass, "--report_to", "none",
                        "--overwrite_output_dir", "true"], work / f"memory-{per_pass}.log")
        runtime = json.loads((output / "manifest.json").read_text())["metrics"]["train_runtime_s"]
        out[per_pass] = {**measured, "train_runtime_s": runtime, "seconds_per_step": round(runtime / steps, 1)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int, default=3, help="Cross-validation folds (grouped by conversation).")
    parser.add_argument("--model", default=None, help="Override the LM judges' base model (e.g. tiny-llama).")
    parser.add_argument("--skip", nargs="*", default=[], choices=[*CANDIDATES, "embedding", "memory"])
    parser.add_argument("--reuse", action="store_true",
                        help="Read the judges already finished in --work instead of training them again (their wall "
                        "time and peak memory from <name>.measured.json); keep --folds and the configs unchanged.")
    parser.add_argument("--memory_steps", type=int, default=6, help="Optimizer steps of each memory run.")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench" / "reward_quality"))
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "reward_quality.json"))
    args = parser.parse_args()
    if not OASST_TREES.exists():
        raise SystemExit(f"the OASST trees are not at {OASST_TREES} (../shared/data)")

    from datasets import concatenate_datasets, load_from_disk

    from align.preferences.cross_validation import (
        agreement,
        conversation_key,
        grouped_folds,
        pair_records,
        ranking_report,
        within_prompt_length_correlation,
    )

    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    comparisons = work / "comparisons"
    if not (comparisons / "manifest.json").exists():
        run(["comparisons", "--config", "configs/comparisons.yaml", "--input_path", str(OASST_TREES),
             "--output_dir", str(comparisons)], work / "comparisons.log")
    data = load_from_disk(str(comparisons / "dataset"))
    rows = concatenate_datasets([data["train"], data["test"]])
    model = ["--model_name_or_path", args.model] if args.model else []
    variants = {name: ["--config", "configs/reward.yaml", *shlex.split(flags), *model]
                for name, flags in CANDIDATES.items()}
    variants["embedding"] = ["--config", "configs/reward_embedding.yaml"]
    results: dict = {"folds": args.folds, "pairs": None, "variants": {}}
    for name, flags in variants.items():
        if name in args.skip:
            continue
        output = work / name
        stage_args = ["reward", *flags, "--dataset_name", str(comparisons), "--output_dir", str(output),
                      "--cv_folds", str(args.folds), "--report_to", "none", "--overwrite_output_dir", "true"]
        record = work / f"{name}.measured.json"  # wall time and peak memory of the run that trained it
        if args.reuse and record.exists() and (output / "manifest.json").exists():
            print(f"== {name}: reusing {output}", flush=True)
            measured = json.loads(record.read_text())
        else:
            print(f"== {name}: align reward {' '.join(flags)} --cv_folds {args.folds}", flush=True)
            measured = run(stage_args, work / f"{name}.log")
            record.write_text(json.dumps(measured) + "\n")
        manifest = json.loads((output / "manifest.json").read_text())
        cv = manifest["metrics"]["cv"]
        results["variants"][name] = {"flags": " ".join(flags), **measured, "cv": cv,
                                     "eval_accuracy": manifest["metrics"].get("eval_accuracy"),
                                     "train_runtime_s": manifest["metrics"].get("train_runtime_s")}
        print(f"   cv accuracy {cv['accuracy']:.3f} [{cv['accuracy_low']:.3f}, {cv['accuracy_high']:.3f}], "
              f"by length gap {cv['accuracy_by_length_gap']}, length correlation {cv['length_correlation']}, "
              f"fold seconds {cv['fold_seconds']}, peak {measured['peak_rss_gb']} GB, {measured['wall_s']} s",
              flush=True)

    keys = [conversation_key(p) for p in rows["prompt"]]
    folds = grouped_folds(keys, args.folds, 42)
    lengths = [[float(len(r.split())) for r in row] for row in rows["responses"]]
    longer = ranking_report(pair_records(lengths, rows["ranks"], rows["responses"], keys, folds))
    results["pairs"] = longer["pairs"]
    results["variants"]["longer"] = {"cv": {**longer, "length_correlation":
                                            within_prompt_length_correlation(lengths, rows["responses"])}}
    measured = results["variants"]
    lm = [name for name in CANDIDATES if name in measured]
    chosen = max(lm, key=lambda name: measured[name]["cv"]["accuracy"]) if lm else None
    results["chosen"] = chosen
    if chosen and "embedding" in measured:
        results["agreement"] = agreement(held_out_scores(work / chosen, len(rows)),
                                         held_out_scores(work / "embedding", len(rows)), rows["ranks"])
    if "memory" not in args.skip:
        results["memory"] = memory_runs(comparisons, work, model, args.memory_steps)
    reused = sum(measured[name]["wall_s"] for name in measured if args.reuse and "wall_s" in measured[name])
    results["minutes"] = round((time.perf_counter() - started + reused) / 60, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{'judge':<10} {'cv acc':>7} {'95% interval':>15} {'<10%':>6} {'10-30%':>7} {'30-60%':>7} {'>=60%':>6} "
          f"{'len corr':>8} {'peak GB':>8} {'wall s':>7}")
    for name, entry in measured.items():
        cv = entry["cv"]
        gap = cv["accuracy_by_length_gap"]
        shown = [f"{gap[k]:.3f}" if gap[k] is not None else "n/a" for k in ("<10%", "10-30%", "30-60%", ">=60%")]
        corr = cv.get("length_correlation")
        print(f"{name:<10} {cv['accuracy']:>7.3f} [{cv['accuracy_low']:.3f}, {cv['accuracy_high']:.3f}] "
              f"{shown[0]:>6} {shown[1]:>7} {shown[2]:>7} {shown[3]:>6} {'n/a' if corr is None else f'{corr:.2f}':>8} "
              f"{entry.get('peak_rss_gb', '-'):>8} {entry.get('wall_s', '-'):>7}")

    def figure(name: str, key: str) -> str:
        value = measured.get(name, {}).get("cv", {}).get(key)
        return "n/a" if value is None else f"{value:.3f}"

    alike = results.get("agreement")
    memory = results.get("memory", {})
    for name, entry in memory.items():
        print(f"memory, sequences_per_pass {name}: peak {entry['peak_rss_gb']} GB, {entry['seconds_per_step']} s/step")
    print(f"RESULT cv_acc={figure(chosen, 'accuracy')} cv_lo={figure(chosen, 'accuracy_low')} chosen={chosen} "
          f"cv_acc_before={figure('today', 'accuracy')} embed_cv_acc={figure('embedding', 'accuracy')} "
          f"agreement={'n/a' if alike is None else f'{alike:.3f}'} "
          f"peak_rss_gb={memory.get('8', {}).get('peak_rss_gb', 'n/a')} "
          f"peak_rss_gb_one_pass={memory.get('0', {}).get('peak_rss_gb', 'n/a')} minutes={results['minutes']}")


if __name__ == "__main__":
    main()
