"""Reward model trained on K-wise rankings (InstructGPT) or on chosen/rejected pairs.

Reads comparisons — `prompt, responses (list[str]), ranks (list[int], 0 = best)`, e.g. the output of
`align comparisons` — or pairwise rows `prompt?, chosen, rejected` (converted to K = 2). Uses the
`test` split for evaluation, or holds out `eval_fraction` of the prompts.

Writes `<output_dir>/adapter/` (LoRA + the trained score head + tokenizer + model card) and
`manifest.json` with held-out pairwise accuracy (overall and by K), mean margin, and the mean/std of
rewards over the training responses (PPO normalises rewards with them). Resumes like every stage.

    align reward --config configs/tiny/reward.yaml          # seconds, tiny offline model
    align reward --config configs/reward.yaml               # SmolLM2-135M-Instruct on OASST rankings
    accelerate launch --config_file configs/accelerate/ddp.yaml -m align.reward --config configs/reward.yaml
    torchrun --nproc_per_node 2 -m align.reward --config configs/tiny/reward.yaml    # CPU DDP (gloo)

The K-wise loss: for each prompt, every response goes through the model once, and the loss is the
mean over all ordered pairs (i ranked above j; ties give no pair) of -log sigmoid(r_i - r_j - margin)
(`--pair_weighting prompt` averages per prompt first, InstructGPT's 1/C(K,2) normalisation). A batch
holds whole prompts: `per_device_train_batch_size` counts prompts, not sequences.

Why not TRL's RewardTrainer: it takes chosen/rejected pairs only, so K responses become C(K,2)
independent pairs and each response is encoded K-1 times (and the pairs of one prompt land in
different batches, which InstructGPT found to overfit). We subclass transformers' Trainer with our
collator and loss; TRL's RewardConfig supplies the options.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict
from peft import get_peft_model
from transformers import set_seed
from trl import ModelConfig, RewardConfig
from trl.trainer.utils import disable_dropout_in_model

from align.core.command import StageError, now_iso, run_stage
from align.core.hub import check_stage_push, push_after_stage
from align.core.inputs import load_stage_dataset, validate_columns
from align.core.model_card import write_model_card
from align.core.outputs import RunArguments
from align.lm.models import DEFAULT_MODEL, load_tokenizer, lora_config, require_adapter, resolve_model
from align.lm.precision import compute_in_fp32
from align.lm.training import (
    TrainingDefaults,
    TrainingRun,
    can_evaluate_before_training,
    hold_out,
    parse_training_config,
)
from align.preferences.format import validate_comparisons
from align.rlhf.ranking_loss import ranking_pairs
from align.rlhf.ranking_trainer import RankingCollator, RankingRewardTrainer, score_rows, tokenize_comparisons
from align.rlhf.reward_model import build_reward_model

STAGE = "reward"
logger = logging.getLogger("align")


# ----------------------------------------------------------------------------- config


@dataclass
class RewardDataArguments(RunArguments):
    dataset_name: str = field(
        default="runs/comparisons",
        metadata={"help": "Comparisons (`prompt, responses, ranks`, e.g. an `align comparisons` output) or pairs "
                  "(`prompt?, chosen, rejected`): a stage output directory, save_to_disk directory, data file, or "
                  "hub name."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, when present."})
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Without a test split, hold out this fraction of the prompts (seeded); 0 disables "
                  "evaluation. Needs at least 10 prompts."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on at most this many prompts."})


@dataclass
class RewardModelConfig(ModelConfig):
    """TRL's ModelConfig with the pipeline's defaults: the embedded model, LoRA on, a sequence-classification head."""

    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL,
        metadata={"help": f"Base model: '{DEFAULT_MODEL}' (embedded), 'tiny-llama', a local directory or a hub id."},
    )
    sft_adapter: str | None = field(
        default=None,
        metadata={"help": "An SFT stage output (or adapter directory) merged into the base first: InstructGPT "
                  "initialised its reward model from the SFT model."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter plus the score head."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "Modules LoRA adapts."}
    )
    lora_task_type: str = field(default="SEQ_CLS", metadata={"help": "PEFT task type (the score head is saved)."})


@dataclass
class RewardStageConfig(TrainingDefaults, RewardConfig):
    """TRL's RewardConfig with CPU-friendly defaults; batch sizes count prompts."""

    output_dir: str | None = field(default="runs/reward", metadata={"help": "Where the finished stage output goes."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training prompts."})
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Prompts per batch per device (each brings all K of its responses)."}
    )
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Prompts per evaluation batch."})
    max_length: int | None = field(
        default=512, metadata={"help": "Max tokens of prompt + response; prompts are cut from the left."}
    )
    rank_margin: float = field(
        default=0.0,
        metadata={"help": "Margin per rank of difference: pair (i, j) must be won by rank_margin * (rank_j - rank_i)."},
    )
    pair_weighting: str = field(
        default="pair",
        metadata={"help": "'pair': the loss is the mean over all ordered pairs in the batch (a prompt with more "
                  "pairs weighs more, as with pairwise training); 'prompt': mean per prompt, then over prompts "
                  "(InstructGPT's 1/C(K,2) normalisation).", "choices": ["pair", "prompt"]},
    )
    remove_unused_columns: bool | None = field(default=False, metadata={"help": "Keep our columns (must be false)."})


CONFIG_CLASSES = (RewardDataArguments, RewardStageConfig, RewardModelConfig)


# ----------------------------------------------------------------------------- data


def to_comparisons(data: DatasetDict, args: RewardDataArguments, seed: int) -> DatasetDict:
    """Validate either format and return {train, eval?} with `prompt, responses, ranks`."""
    train_split = args.dataset_train_split
    if train_split not in data:
        raise StageError(STAGE, f"split '{train_split}' not found in {args.dataset_name} (found: "
                         f"{', '.join(data) or 'none'}) — set --dataset_train_split")
    splits = [train_split] + ([args.dataset_test_split] if args.dataset_test_split in data else [])
    columns = data[train_split].column_names
    if {"responses", "ranks"} <= set(columns):
        validate_columns(data, STAGE, {"prompt": "str|messages", "responses": "list[str]", "ranks": "list[int]"},
                         splits=splits)
        validate_comparisons(DatasetDict({s: data[s] for s in splits}), STAGE)
        converted = {s: data[s].select_columns(["prompt", "responses", "ranks"]) for s in splits}
    elif {"chosen", "rejected"} <= set(columns):
        schema = {"chosen": "str", "rejected": "str", **({"prompt": "str|messages"} if "prompt" in columns else {})}
        validate_columns(data, STAGE, schema, splits=splits)
        converted = {s: _pairs_to_comparisons(data[s], s) for s in splits}
    else:
        raise StageError(
            STAGE, f"{args.dataset_name} split '{train_split}' has neither 'responses'+'ranks' nor "
            f"'chosen'+'rejected' columns (found: {', '.join(columns) or 'none'}) — produce comparisons with "
            "`align comparisons`",
        )
    result = hold_out(converted[train_split], converted.get(args.dataset_test_split), args.eval_fraction,
                      args.max_train_samples, seed)
    return result


def _pairs_to_comparisons(rows: Dataset, split: str) -> Dataset:
    prompts = rows["prompt"] if "prompt" in rows.column_names else [""] * len(rows)
    for index, (chosen, rejected) in enumerate(zip(rows["chosen"], rows["rejected"], strict=True)):
        if chosen == rejected:
            raise StageError(STAGE, f"split '{split}' row {index}: chosen and rejected are identical — drop the row")
    return Dataset.from_dict({
        "prompt": prompts,
        "responses": [[c, r] for c, r in zip(rows["chosen"], rows["rejected"], strict=True)],
        "ranks": [[0, 1]] * len(rows),
    })


# ----------------------------------------------------------------------------- the stage


def main(argv: list[str] | None = None) -> Path:
    data_args, training_args, model_args, config, output = parse_training_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()

    # Validate everything before writing anything.
    output.check()
    check_stage_push(STAGE, training_args.push_to_hub, training_args.hub_model_id, data_args.hub_endpoint)
    data = to_comparisons(load_stage_dataset(data_args.dataset_name, STAGE), data_args, training_args.seed)
    model_path = resolve_model(model_args.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    if model_args.sft_adapter:
        require_adapter(model_args.sft_adapter, STAGE)
    truncation = {"truncated_prompts": 0, "truncated_responses": 0}
    encoded = {}
    for split in data:
        encoded[split], counts = tokenize_comparisons(data[split], tokenizer, training_args.max_length)
        for key in truncation:
            truncation[key] += counts[key]
    if any(truncation.values()):
        logger.info("truncated %d prompts (from the left) and %d responses to max_length=%d",
                    truncation["truncated_prompts"], truncation["truncated_responses"], training_args.max_length)

    run = TrainingRun.start(output, training_args)
    set_seed(training_args.seed)  # the new score head and LoRA weights are initialised here, before the Trainer
    model = build_reward_model(model_path, tokenizer, model_args.sft_adapter, dtype=model_args.dtype)
    if training_args.disable_dropout:
        disable_dropout_in_model(model)
    compute_in_fp32(model.score)  # scores (and their normalisation statistics) are not rounded to bf16
    model = get_peft_model(model, lora_config(model_args))
    collator = RankingCollator(tokenizer.pad_token_id, training_args.rank_margin)
    trainer = RankingRewardTrainer(
        model=model,
        args=run.training_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=tokenizer,
        rank_collator=collator,
        center_rewards_coefficient=training_args.center_rewards_coefficient,
        pair_weighting=training_args.pair_weighting,
        callbacks=[run.metrics],
    )
    run.attach(trainer)
    before = (run.evaluate_once(trainer, "before")
              if "eval" in encoded and can_evaluate_before_training(trainer) else {})
    pairs = sum(len(ranking_pairs(r)) for r in encoded["train"]["ranks"])
    result = run.train(trainer, f"training a reward model on {len(encoded['train'])} prompts ({pairs} pairs, "
                                f"{sum(len(r) for r in encoded['train']['ranks'])} responses)")
    after = trainer.evaluate() if "eval" in encoded else {}
    train_scores = score_rows(trainer.accelerator.unwrap_model(trainer.model), encoded["train"], collator,
                              training_args.per_device_eval_batch_size)
    distributed = run.wait_for_ranks(trainer)
    state = run.gather_adapter_state(trainer)
    if not run.is_main:
        return output.output_dir

    adapter = run.save_adapter(trainer, tokenizer, state)
    all_rewards = [r for row in train_scores for r in row]
    mean = sum(all_rewards) / len(all_rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in all_rewards) / max(1, len(all_rewards) - 1))
    losses = run.logged("loss")
    manifest = run.manifest(STAGE, config, data_args.dataset_name, model_args.model_name_or_path, model_path, started)
    manifest["depends_on"] = {"sft_adapter": model_args.sft_adapter} if model_args.sft_adapter else {}
    manifest["metrics"] = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_accuracy_before": before.get("before_accuracy"),
        "eval_accuracy": after.get("eval_accuracy"),
        "eval_accuracy_by_k": {k.split("_k")[-1]: v for k, v in after.items() if k.startswith("eval_accuracy_k")},
        "eval_mean_margin": after.get("eval_mean_margin"),
        "eval_pairs": after.get("eval_pairs"),
        "eval_prompts": len(encoded["eval"]) if "eval" in encoded else 0,
        "train_prompts": len(encoded["train"]),
        "train_pairs": pairs,
        "reward_mean": mean,
        "reward_std": std,
        **truncation,
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
    }
    manifest["distributed"] = distributed
    manifest["finished"] = now_iso()
    write_model_card(adapter, manifest)
    final = run.publish(manifest, keep=["adapter"], keep_checkpoints=data_args.keep_checkpoints)
    if training_args.push_to_hub:
        push_after_stage(STAGE, final, training_args.hub_model_id, data_args.hub_endpoint,
                         private=training_args.hub_private_repo is not False)
    if after:
        logger.info("held-out pairwise accuracy %.3f (before training %s) on %d pairs; adapter: %s",
                    after["eval_accuracy"], _rounded(before.get("before_accuracy")), after["eval_pairs"],
                    final / "adapter")
    return final


def _rounded(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
