"""Benchmark: our K-wise reward trainer against TRL's RewardTrainer on the same OASST human rankings.

Both train a reward model on the OASST comparisons (`align comparisons --source oasst`, trees 1-64 for
training, 65-80 held out) with the same base model, the same LoRA (r=16, alpha=32, dropout 0, all
linear layers, SEQ_CLS task so the score head is trained too), the same learning rate, schedule,
epochs, seed, initial weights, max_length (prompts cut from the left), torch threads and hardware:

- ours: `align.reward.RankingRewardTrainer` — each prompt's K responses go through the model once and
  the loss covers all C(K,2) ordered pairs of the ranking; a batch holds 4 whole prompts.
- TRL: `trl.RewardTrainer` on the same rankings expanded to every ordered pair (ties skipped) as
  independent, shuffled, conversational chosen/rejected rows (prompt messages + [assistant response]);
  its per-device batch size is set so that a batch holds about as many sequences as ours does on
  average (2 sequences per pair). The rows are tokenized exactly like ours (`encode_response`, which
  cuts the prompt from the left, where TRL alone would drop a too-long pair); the script checks that
  this equals TRL's own chat-template tokenization for every pair that needs no cut.

Measured: the wall time of `trainer.train()` only (no model loading, no evaluation), the sequences
(and tokens) each trainer pushed through the model per epoch, and the held-out pairwise accuracy of
both trained models, computed the same way for both (`tokenize_comparisons` + `score_rows` +
`ranking_metrics` over all ordered pairs of the test rankings).

Run it from the repository root:

    .venv/bin/python scripts/bench_reward.py                        # SmolLM2-135M-Instruct, max_length 384
    .venv/bin/python scripts/bench_reward.py --max_length 256       # shorter sequences (faster on a CPU)
    .venv/bin/python scripts/bench_reward.py --model tiny-llama     # end-to-end check, under a minute

Expected runtime on 2 CPU cores (measured with other processes sharing the machine): 1-5 minutes
with --model tiny-llama; with the default model about 40 minutes at --max_length 256 (training: ours
~11 min, TRL ~23 min; ~20 s per optimizer step of 12 sequences for both) and roughly an hour at the
default 384. Timings on a shared machine are noisy: the JSON keeps each run's CPU time and the load
average around it. The last line printed is
`RESULT speedup=... acc_ours=... acc_trl=... seq_ours=... seq_trl=... pairs=... prompts=...`; the
numbers, settings and wall times also go to runs/bench/reward.json (`--out`).

Reading the accuracy: with batches of equal size in sequences, an epoch of ours is as many times fewer
optimizer steps as it encodes fewer sequences (32 vs 76 steps on the default data, about K-1 times
fewer), at the same learning rate and schedule: at equal epochs ours gets fewer updates, not only less
compute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

OASST_TREES = REPO.parent / "shared" / "data" / "oasst" / "en_trees_80.jsonl"
OURS_PROMPTS_PER_BATCH = 4
LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Base model (default: smollm2-135m-instruct; "
                        "'tiny-llama' for a quick check; or a local model directory).")
    parser.add_argument("--epochs", type=float, default=1.0, help="Passes over the training data (default 1).")
    parser.add_argument("--max_length", type=int, default=384, help="Max tokens of prompt + response (default 384).")
    parser.add_argument("--trees", type=int, default=80, help="OASST trees to use (default 80).")
    parser.add_argument("--test_trees", type=int, default=16, help="Of those, the last N are held out (default 16).")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="Both trainers' arithmetic (default auto: bf16 where the hardware has it).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the machine's cores).")
    parser.add_argument("--data_dir", default=str(REPO / "runs" / "bench"),
                        help="Where the comparisons dataset is built (once) and reused.")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "reward.json"), help="JSON results file.")
    return parser.parse_args(argv)


def machine_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- data


def comparisons_dir(args) -> Path:
    """The OASST comparisons dataset, built once by the comparisons stage into --data_dir."""
    output = Path(args.data_dir) / f"comparisons-oasst-{args.trees}-test{args.test_trees}"
    if (output / "manifest.json").exists():
        return output
    from align import comparisons

    comparisons.main(["--source", "oasst", "--input_path", str(OASST_TREES), "--source_limit", str(args.trees),
                      "--test_records", str(args.test_trees), "--output_dir", str(output), "--restart", "true"])
    return output


def expand_to_pairs(rows, tokenizer, max_length: int, seed: int):
    """Every ordered pair (better, worse) of every ranking as a conversational chosen/rejected row, with
    chosen_ids/rejected_ids tokenized exactly like ours; shuffled. Returns (dataset, tokenization check)."""
    from datasets import Dataset
    from trl.data_utils import _tokenize

    from align.rlhf.ranking_loss import ranking_pairs
    from align.rlhf.reward_model import encode_response

    records, same, compared = [], 0, 0
    for row in rows:
        prompt = list(row["prompt"])
        for i, j in ranking_pairs(row["ranks"]):
            chosen, rejected = row["responses"][i], row["responses"][j]
            record = {"prompt": prompt,
                      "chosen": [{"role": "assistant", "content": chosen}],
                      "rejected": [{"role": "assistant", "content": rejected}]}
            for key, text in (("chosen", chosen), ("rejected", rejected)):
                ids, truncated = encode_response(tokenizer, prompt, text, max_length)
                record[f"{key}_ids"] = ids
                if truncated is None:  # what TRL's own preprocessing would produce for this row
                    compared += 1
                    same += _tokenize(tokenizer, prompt + record[key], tools=None)["input_ids"] == ids
            records.append(record)
    pairs = Dataset.from_list(records).shuffle(seed=seed)
    return pairs, {"compared_sequences": compared, "identical_to_trl_tokenization": same}


# ----------------------------------------------------------------------------- measurement helpers


class Counter:
    """Counts what a collator hands the model: sequences, real tokens, padded tokens, batches."""

    def __init__(self):
        self.sequences = self.tokens = self.padded_tokens = self.batches = 0

    def add(self, batch: dict) -> dict:
        self.sequences += int(batch["input_ids"].shape[0])
        self.padded_tokens += int(batch["input_ids"].numel())
        self.tokens += int(batch["attention_mask"].sum())
        self.batches += 1
        return batch


def counting_ranking_collator(pad_token_id: int):
    from align.rlhf.ranking_trainer import RankingCollator

    class CountingRankingCollator(RankingCollator):
        def __init__(self, pad: int):
            super().__init__(pad)
            self.counter = Counter()

        def __call__(self, rows):
            return self.counter.add(super().__call__(rows))

    return CountingRankingCollator(pad_token_id)


class CountingCollator:
    def __init__(self, inner):
        self.inner = inner
        self.counter = Counter()

    def __call__(self, rows):
        return self.counter.add(self.inner(rows))


def common_training_args(args, bf16: bool, output_dir: str) -> dict:
    """TrainingArguments both trainers share (only the batch size differs)."""
    import torch

    return {
        "output_dir": output_dir,
        "num_train_epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "gradient_accumulation_steps": 1,
        "seed": args.seed,
        "max_length": args.max_length,
        "gradient_checkpointing": False,  # TRL's RewardConfig defaults to True; ours to False
        "bf16": bf16,  # the same --precision for both (TRL's RewardConfig alone would pick bf16 everywhere)
        "use_cpu": not torch.cuda.is_available(),  # transformers runs bf16 autocast on a CPU only when told
        "fp16": False,
        "disable_dropout": True,
        "center_rewards_coefficient": None,
        "logging_steps": 5,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "per_device_eval_batch_size": 8,
    }


def fresh_model(model_path: str, tokenizer, seed: int):
    """The same initial reward model (base + randomly initialised score head) for both trainers."""
    from transformers import set_seed

    from align.rlhf.reward_model import build_reward_model

    set_seed(seed)
    return build_reward_model(model_path, tokenizer, None)


def lora():
    from align.lm.models import lora_config
    from align.reward import RewardModelConfig

    return lora_config(RewardModelConfig(**LORA))


def evaluate(model, test_rows, pad_token_id: int) -> dict:
    from align.rlhf.ranking_loss import ranking_metrics
    from align.rlhf.ranking_trainer import RankingCollator, score_rows

    scores = score_rows(model, test_rows, RankingCollator(pad_token_id), batch_size=8)
    return ranking_metrics(scores, test_rows["ranks"])


def trainable_summary(model) -> dict:
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    return {"trainable_params": sum(n for _, n in trainable),
            "score_head_trained": any(".score." in f".{n}" or n.startswith("score") for n, _ in trainable)}


def train_timed(trainer) -> tuple[float, object, dict]:
    """Wall time of trainer.train() alone, plus this process's CPU time and the machine's load average
    around it (other processes on the machine slow a CPU run down; the load average shows it)."""
    load_before, cpu_start, start = os.getloadavg()[0], time.process_time(), time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    machine = {"cpu_seconds": time.process_time() - cpu_start, "load_1min_before": load_before,
               "load_1min_after": os.getloadavg()[0]}
    return seconds, result, machine


def mean_loss(trainer) -> float | None:
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return sum(losses) / len(losses) if losses else None


# ----------------------------------------------------------------------------- the benchmark


def main(argv: list[str] | None = None) -> dict:
    script_start = time.perf_counter()
    args = parse_args(argv)
    threads = args.threads or machine_cores()

    import torch

    torch.set_num_threads(threads)

    from align.core.command import configure_logging
    from align.core.inputs import load_stage_dataset
    from align.lm.models import DEFAULT_MODEL, load_tokenizer, resolve_model
    from align.lm.precision import choose_precision
    from align.reward import RewardDataArguments, RewardStageConfig, to_comparisons
    from align.rlhf.ranking_loss import ranking_pairs
    from align.rlhf.ranking_trainer import RankingRewardTrainer, tokenize_comparisons

    configure_logging()
    from peft import get_peft_model
    from transformers import set_seed
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference
    from trl.trainer.utils import disable_dropout_in_model

    model_name = args.model or DEFAULT_MODEL
    data_path = comparisons_dir(args)
    data = to_comparisons(load_stage_dataset(str(data_path), "reward"),
                          RewardDataArguments(dataset_name=str(data_path)), args.seed)
    train, test = data["train"], data["eval"]
    model_path = resolve_model(model_name, "reward")
    tokenizer = load_tokenizer(model_path, "reward")
    pad = tokenizer.pad_token_id

    train_tok, train_trunc = tokenize_comparisons(train, tokenizer, args.max_length)
    test_tok, test_trunc = tokenize_comparisons(test, tokenizer, args.max_length)
    prompts = len(train)
    responses = sum(len(r) for r in train["ranks"])
    pairs = sum(len(ranking_pairs(r)) for r in train["ranks"])
    test_pairs = sum(len(ranking_pairs(r)) for r in test["ranks"])
    seqs_per_ours_batch = OURS_PROMPTS_PER_BATCH * responses / prompts
    trl_batch = max(1, round(seqs_per_ours_batch / 2))
    pair_rows, tokenization_check = expand_to_pairs(train, tokenizer, args.max_length, args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = choose_precision(args.precision, device).is_bf16
    print(f"model {model_name} ({model_path}); torch threads {torch.get_num_threads()}; device {device}; "
          f"train {prompts} prompts / {responses} responses / {pairs} pairs; test {len(test)} prompts / "
          f"{test_pairs} pairs; ours {OURS_PROMPTS_PER_BATCH} prompts (~{seqs_per_ours_batch:.1f} sequences) per "
          f"batch, TRL {trl_batch} pairs ({2 * trl_batch} sequences) per batch", flush=True)

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_reward_") as scratch:
        # (a) ours: K-wise, whole prompts per batch
        model = fresh_model(model_path, tokenizer, args.seed)
        disable_dropout_in_model(model)  # as align.reward.main does (TRL's trainer does it itself)
        set_seed(args.seed)  # same LoRA initialisation as TRL, which re-seeds before get_peft_model
        model = get_peft_model(model, lora())
        acc_before = evaluate(model, test_tok, pad)
        collator = counting_ranking_collator(pad)
        ours_args = RewardStageConfig(**common_training_args(args, bf16, f"{scratch}/ours"),
                                      per_device_train_batch_size=OURS_PROMPTS_PER_BATCH,
                                      remove_unused_columns=False)
        trainer = RankingRewardTrainer(model=model, args=ours_args, train_dataset=train_tok,
                                       processing_class=tokenizer, rank_collator=collator)
        print(f"training ours (K-wise): {prompts} prompts, {OURS_PROMPTS_PER_BATCH} per batch", flush=True)
        seconds, result, machine = train_timed(trainer)
        trained = trainer.accelerator.unwrap_model(trainer.model)
        results["ours"] = {
            "train_seconds": seconds,
            **machine,
            "trainer_train_runtime": result.metrics.get("train_runtime"),
            "steps": trainer.state.global_step,
            "batch": f"{OURS_PROMPTS_PER_BATCH} prompts (~{seqs_per_ours_batch:.2f} sequences)",
            "train_rows": prompts,
            "sequences_per_epoch": collator.counter.sequences / args.epochs,
            "tokens_per_epoch": collator.counter.tokens / args.epochs,
            "padded_tokens_per_epoch": collator.counter.padded_tokens / args.epochs,
            "train_loss": result.training_loss,
            "mean_logged_loss": mean_loss(trainer),
            **trainable_summary(trained),
            "eval": evaluate(trained, test_tok, pad),
        }
        del trainer, trained, model

        # (b) TRL: every ordered pair as an independent chosen/rejected row
        model = fresh_model(model_path, tokenizer, args.seed)
        trl_collator = CountingCollator(DataCollatorForPreference(pad_token_id=pad))
        trl_args = RewardConfig(**common_training_args(args, bf16, f"{scratch}/trl"),
                                per_device_train_batch_size=trl_batch)
        trainer = RewardTrainer(model=model, args=trl_args, train_dataset=pair_rows, processing_class=tokenizer,
                                data_collator=trl_collator, peft_config=lora())
        print(f"training TRL RewardTrainer: {len(trainer.train_dataset)} pairs, {trl_batch} per batch", flush=True)
        seconds, result, machine = train_timed(trainer)
        trained = trainer.accelerator.unwrap_model(trainer.model)
        results["trl"] = {
            "train_seconds": seconds,
            **machine,
            "trainer_train_runtime": result.metrics.get("train_runtime"),
            "steps": trainer.state.global_step,
            "batch": f"{trl_batch} pairs ({2 * trl_batch} sequences)",
            "train_rows": len(trainer.train_dataset),
            "sequences_per_epoch": trl_collator.counter.sequences / args.epochs,
            "tokens_per_epoch": trl_collator.counter.tokens / args.epochs,
            "padded_tokens_per_epoch": trl_collator.counter.padded_tokens / args.epochs,
            "train_loss": result.training_loss,
            "mean_logged_loss": mean_loss(trainer),
            **trainable_summary(trained),
            "eval": evaluate(trained, test_tok, pad),
        }
        del trainer, trained, model

    ours, trl = results["ours"], results["trl"]
    speedup = trl["train_seconds"] / ours["train_seconds"]
    seq_ours, seq_trl = round(ours["sequences_per_epoch"]), round(trl["sequences_per_epoch"])
    report = {
        "benchmark": "reward",
        "model": model_name,
        "model_path": model_path,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "machine": {"cores": machine_cores(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "settings": {
            "epochs": args.epochs, "learning_rate": args.learning_rate, "lr_scheduler": "linear, no warmup",
            "max_length": args.max_length, "seed": args.seed, "bf16": bf16, "gradient_checkpointing": False,
            "lora": {**LORA, "target_modules": "all-linear", "task_type": "SEQ_CLS (score head trained)"},
            "batch_ours_prompts": OURS_PROMPTS_PER_BATCH, "batch_ours_mean_sequences": seqs_per_ours_batch,
            "batch_trl_pairs": trl_batch, "batch_trl_sequences": 2 * trl_batch,
        },
        "data": {
            "comparisons": str(data_path), "trees": args.trees, "test_trees": args.test_trees,
            "train_prompts": prompts, "train_responses": responses, "train_pairs": pairs,
            "test_prompts": len(test), "test_pairs": test_pairs,
            "truncation_train": train_trunc, "truncation_test": test_trunc,
            "trl_tokenization_check": tokenization_check,
        },
        "accuracy_before_training": acc_before["accuracy"],
        "ours": ours,
        "trl": trl,
        "speedup": speedup,
        "script_wall_seconds": time.perf_counter() - script_start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    def row(label, a, b):
        print(f"{label:<30} {a:>24} {b:>24}")

    print()
    print(f"reward model: {model_name}, max_length {args.max_length}, {args.epochs:g} epoch(s), lr "
          f"{args.learning_rate:g}, LoRA r16/a32, {torch.get_num_threads()} torch threads on {device}")
    row("", "ours (K-wise)", "TRL RewardTrainer")
    row("train rows", f"{prompts} prompts", f"{trl['train_rows']} pairs")
    row("batch", f"{OURS_PROMPTS_PER_BATCH} prompts (~{seqs_per_ours_batch:.1f} seq)",
        f"{trl_batch} pairs ({2 * trl_batch} seq)")
    row("optimizer steps", ours["steps"], trl["steps"])
    row("sequences / epoch", seq_ours, seq_trl)
    row("real tokens / epoch", round(ours["tokens_per_epoch"]), round(trl["tokens_per_epoch"]))
    row("padded tokens / epoch", round(ours["padded_tokens_per_epoch"]), round(trl["padded_tokens_per_epoch"]))
    row("train wall time (s)", f"{ours['train_seconds']:.1f}", f"{trl['train_seconds']:.1f}")
    row("seconds / step", f"{ours['train_seconds'] / ours['steps']:.2f}", f"{trl['train_seconds'] / trl['steps']:.2f}")
    row("CPU s / wall s (training)", f"{ours['cpu_seconds'] / ours['train_seconds']:.2f}",
        f"{trl['cpu_seconds'] / trl['train_seconds']:.2f}")
    row("load avg before / after", f"{ours['load_1min_before']:.1f} / {ours['load_1min_after']:.1f}",
        f"{trl['load_1min_before']:.1f} / {trl['load_1min_after']:.1f}")
    row("train loss (mean)", f"{ours['train_loss']:.4f}", f"{trl['train_loss']:.4f}")
    row(f"held-out pair accuracy ({test_pairs})", f"{ours['eval']['accuracy']:.3f}", f"{trl['eval']['accuracy']:.3f}")
    row("held-out mean margin", f"{ours['eval']['mean_margin']:.3f}", f"{trl['eval']['mean_margin']:.3f}")
    check = tokenization_check
    print(f"TRL rows tokenized like ours; TRL's own chat-template tokenization agrees on "
          f"{check['identical_to_trl_tokenization']}/{check['compared_sequences']} uncut sequences")
    print(f"untrained accuracy {acc_before['accuracy']:.3f}; speedup (TRL time / ours) {speedup:.2f}x; "
          f"script wall time {report['script_wall_seconds']:.0f} s; results in {out}")
    print(f"RESULT speedup={speedup:.2f} acc_ours={ours['eval']['accuracy']:.3f} acc_trl={trl['eval']['accuracy']:.3f} "
          f"seq_ours={seq_ours} seq_trl={seq_trl} pairs={pairs} prompts={prompts}", flush=True)
    return report


if __name__ == "__main__":
    main()
