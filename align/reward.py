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

How well a judge generalises: `--cv_folds K` first cross-validates the same settings on all the rankings
given (train and test splits together), grouped by conversation so that no conversation is on both sides
of a fold, and records pooled pairwise accuracy with a 95% interval (bootstrap over conversations), per
fold, by K and by length gap, beside the accuracy of "the longer response wins"; then it trains the final
model as usual. Folds are journaled: a killed run resumes with the next fold.

`--backbone embedding` trains a judge of another family instead (`align.rlhf.embedding_judge`): a small
head over frozen sentence embeddings (all-MiniLM-L6-v2) of prompt and response, through the same K-wise
loss, in seconds; it writes `judge/` in place of `adapter/`.

    align reward --config configs/reward.yaml --cv_folds 5
    align reward --config configs/reward_embedding.yaml --cv_folds 5     # the independent judge
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, concatenate_datasets
from peft import get_peft_model
from transformers import set_seed
from trl import ModelConfig, RewardConfig
from trl.trainer.utils import disable_dropout_in_model

from align.core.command import StageError, now_iso, run_stage
from align.core.hub import check_stage_push, push_after_stage
from align.core.inputs import load_stage_dataset, validate_columns
from align.core.model_card import write_model_card
from align.core.outputs import RunArguments, base_manifest
from align.lm.models import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_MODEL,
    load_tokenizer,
    lora_config,
    pick_device,
    require_adapter,
    resolve_embedding_model,
    resolve_model,
)
from align.lm.precision import compute_in_fp32
from align.lm.training import (
    TrainingDefaults,
    TrainingRun,
    can_evaluate_before_training,
    hold_out,
    parse_training_config,
)
from align.preferences.cross_validation import conversation_key, fold_problem, grouped_folds
from align.preferences.format import validate_comparisons
from align.rlhf.embedding_judge import JUDGE_DIR, Embedder, HeadSettings, head_scores, save_judge, train_head
from align.rlhf.ranking_loss import ranking_metrics, ranking_pairs, reward_statistics
from align.rlhf.ranking_trainer import RankingCollator, RankingRewardTrainer, score_rows, tokenize_comparisons
from align.rlhf.reward_cv import cross_validated_report, embedding_fold_scorer, lm_fold_scorer
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
    cv_folds: int = field(
        default=0,
        metadata={"help": "Before training the final model, cross-validate its settings in this many folds over all "
                  "the rankings given (train and test splits), grouped by conversation; 0 = off."},
    )
    cv_only: bool = field(
        default=False,
        metadata={"help": "With --cv_folds: stop after the cross-validation (no final model; its figures in "
                  "manifest.json) — to compare settings."},
    )


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
    backbone: str = field(
        default="lm",
        metadata={"help": "'lm': the language model with LoRA and a score head (InstructGPT's reward model); "
                  "'embedding': a small head over frozen sentence embeddings of prompt and response, a judge of "
                  "another family than the policy (seconds to train).", "choices": ["lm", "embedding"]},
    )
    embedding_model: str = field(
        default=DEFAULT_EMBEDDING_MODEL,
        metadata={"help": "--backbone embedding: the sentence-transformers model ('all-minilm-l6-v2' is embedded)."},
    )
    judge_hidden_size: int = field(default=16, metadata={"help": "--backbone embedding: hidden units (0 = linear)."})
    judge_epochs: int = field(default=300, metadata={"help": "--backbone embedding: full-batch passes."})
    judge_learning_rate: float = field(default=1e-3, metadata={"help": "--backbone embedding: AdamW learning rate."})
    judge_weight_decay: float = field(default=0.01, metadata={"help": "--backbone embedding: AdamW weight decay."})
    judge_dropout: float = field(default=0.2, metadata={"help": "--backbone embedding: dropout on the features."})


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
    sequences_per_pass: int | None = field(
        default=8,
        metadata={"help": "Run a batch's forward and backward passes at most this many sequences at a time (the "
                  "gradients are the full batch's; see align.rlhf.ranking_trainer): bounds memory. 0 = all at once."},
    )


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
    if data_args.cv_only and not data_args.cv_folds:
        raise StageError(STAGE, "--cv_only needs --cv_folds K (K >= 2): it stops after the cross-validation")
    everything = concatenate_datasets([data[s] for s in data]) if data_args.cv_folds else None
    folds = _folds(everything, data_args.cv_folds, training_args) if everything is not None else None
    if model_args.backbone == "embedding":
        return _embedding_judge(data, everything, folds, data_args, training_args, model_args, config, output,
                                started)
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
    collator = RankingCollator(tokenizer.pad_token_id, training_args.rank_margin)
    trainer_options = {"center_rewards_coefficient": training_args.center_rewards_coefficient,
                       "pair_weighting": training_args.pair_weighting,
                       "sequences_per_pass": training_args.sequences_per_pass or None}

    def make_model():
        set_seed(training_args.seed)  # the new score head and LoRA weights are initialised here, before the Trainer
        model = build_reward_model(model_path, tokenizer, model_args.sft_adapter, dtype=model_args.dtype)
        if training_args.disable_dropout:
            disable_dropout_in_model(model)
        compute_in_fp32(model.score)  # scores (and their normalisation statistics) are not rounded to bf16
        return get_peft_model(model, lora_config(model_args))

    cv = None
    if folds is not None:
        rows = concatenate_datasets([encoded[s] for s in encoded])
        scorer = lm_fold_scorer(rows, make_model, run.training_args, tokenizer, collator, run.partial / "cv",
                                **trainer_options)
        cv = cross_validated_report(everything, folds, scorer, run.partial / "cv" / "folds.jsonl", training_args.seed)
        if data_args.cv_only:
            return _publish_cv_only(run.output, config, data_args, model_args, model_path, started, cv)
    model = make_model()
    trainer = RankingRewardTrainer(
        model=model,
        args=run.training_args,
        train_dataset=encoded["train"],
        eval_dataset=encoded.get("eval"),
        processing_class=tokenizer,
        rank_collator=collator,
        callbacks=[run.metrics],
        **trainer_options,
    )
    run.attach(trainer)
    before = (run.evaluate_once(trainer, "before")
              if "eval" in encoded and can_evaluate_before_training(trainer) else {})
    pairs = sum(len(ranking_pairs(r)) for r in encoded["train"]["ranks"])
    result = run.train(trainer, f"training a reward model on {len(encoded['train'])} prompts ({pairs} pairs, "
                                f"{sum(len(r) for r in encoded['train']['ranks'])} responses)")
    after = trainer.evaluate() if "eval" in encoded else {}
    train_scores = score_rows(trainer.accelerator.unwrap_model(trainer.model), encoded["train"], collator,
                              training_args.per_device_eval_batch_size,
                              desc=f"scoring {len(encoded['train'])} training prompts (reward mean and std)")
    distributed = run.wait_for_ranks(trainer)
    state = run.gather_adapter_state(trainer)
    if not run.is_main:
        return output.output_dir

    adapter = run.save_adapter(trainer, tokenizer, state)
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
        **reward_statistics(train_scores),
        **truncation,
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        **({"cv": cv} if cv else {}),
    }
    manifest["distributed"] = distributed
    manifest["finished"] = now_iso()
    write_model_card(adapter, manifest)
    final = run.publish(manifest, keep=["adapter"], keep_checkpoints=data_args.keep_checkpoints)
    if training_args.push_to_hub:
        push_after_stage(STAGE, final, training_args.hub_model_id, data_args.hub_endpoint,
                         private=training_args.hub_private_repo is not False)
    _log_result(after, before.get("before_accuracy"), cv, final / "adapter")
    return final


# ----------------------------------------------------------------------------- cross-validation and the embedding judge


def _folds(rows: Dataset, count: int, training_args) -> list[int]:
    keys = [conversation_key(p) for p in rows["prompt"]]
    problem = fold_problem(count, len(set(keys)))
    if problem:
        raise StageError(STAGE, problem)
    if training_args.world_size > 1:
        raise StageError(STAGE, "--cv_folds runs in one process — start it without a distributed launcher")
    return grouped_folds(keys, count, training_args.seed)


def _embedding_judge(data, everything, folds, data_args, training_args, model_args, config, output, started) -> Path:
    """`--backbone embedding`: embed every response once, cross-validate the head, fit it, write judge/."""
    embedding_path = resolve_embedding_model(model_args.embedding_model, STAGE)
    settings = HeadSettings(model_args.judge_hidden_size, model_args.judge_epochs, model_args.judge_learning_rate,
                            model_args.judge_weight_decay, model_args.judge_dropout, training_args.seed)
    partial = output.open()
    embedder = Embedder(embedding_path, device=pick_device())
    embedded = {split: embedder.rows(data[split]["prompt"], data[split]["responses"], progress=True)
                for split in data}
    cv = None
    if folds is not None:
        prompt_emb = torch.cat([embedded[s][0] for s in data])
        response_emb = torch.cat([embedded[s][1] for s in data])
        scorer = embedding_fold_scorer(prompt_emb, response_emb, everything["ranks"], settings)
        cv = cross_validated_report(everything, folds, scorer, partial / "cv" / "folds.jsonl", training_args.seed)
        if data_args.cv_only:
            return _publish_cv_only(output, config, data_args, model_args, embedding_path, started, cv)
    ranks = data["train"]["ranks"]
    logger.info("training an embedding judge on %d prompts (%d pairs) -> %s", len(ranks),
                sum(len(ranking_pairs(r)) for r in ranks), output.output_dir)
    untrained, _ = train_head(*embedded["train"], ranks, dataclasses.replace(settings, epochs=0))
    head, losses = train_head(*embedded["train"], ranks, settings)
    evaluated = {}
    for name, model in (("before", untrained), ("after", head)):
        if "eval" in data:
            evaluated[name] = ranking_metrics(head_scores(model, *embedded["eval"], data["eval"]["ranks"]),
                                              data["eval"]["ranks"])
    after, before = evaluated.get("after", {}), evaluated.get("before", {})
    judge = save_judge(partial / JUDGE_DIR, head, model_args.embedding_model)
    manifest = base_manifest(STAGE, config, {"dataset": data_args.dataset_name},
                             {"name_or_path": model_args.embedding_model, "resolved": embedding_path}, started)
    manifest["outputs"] = {"judge": JUDGE_DIR}
    manifest["depends_on"] = {}
    manifest["metrics"] = {
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_accuracy_before": before.get("accuracy"),
        "eval_accuracy": after.get("accuracy"),
        "eval_accuracy_by_k": after.get("accuracy_by_k", {}),
        "eval_mean_margin": after.get("mean_margin"),
        "eval_pairs": after.get("pairs"),
        "eval_prompts": len(data["eval"]) if "eval" in data else 0,
        "train_prompts": len(ranks),
        "train_pairs": sum(len(ranking_pairs(r)) for r in ranks),
        **reward_statistics(head_scores(head, *embedded["train"], ranks)),
        **({"cv": cv} if cv else {}),
    }
    manifest["finished"] = now_iso()
    write_model_card(judge, manifest)
    final = output.publish(manifest, keep=[JUDGE_DIR])
    if training_args.push_to_hub:
        push_after_stage(STAGE, final, training_args.hub_model_id, data_args.hub_endpoint,
                         private=training_args.hub_private_repo is not False)
    _log_result({"eval_accuracy": after.get("accuracy"), "eval_pairs": after.get("pairs")} if after else {},
                before.get("accuracy"), cv, final / JUDGE_DIR)
    return final


def _publish_cv_only(output, config, data_args, model_args, resolved: str, started: str, cv: dict) -> Path:
    """`--cv_only`: the cross-validated figures without a final model (to compare settings before training one)."""
    name = model_args.embedding_model if model_args.backbone == "embedding" else model_args.model_name_or_path
    manifest = base_manifest(STAGE, config, {"dataset": data_args.dataset_name},
                             {"name_or_path": name, "resolved": resolved}, started)
    manifest["outputs"] = {"cv": "cv"}
    manifest["depends_on"] = {"sft_adapter": model_args.sft_adapter} if model_args.sft_adapter else {}
    manifest["metrics"] = {"cv": cv}
    manifest["finished"] = now_iso()
    shutil.rmtree(output.partial / "checkpoints", ignore_errors=True)
    return output.publish(manifest, keep=["cv"])


def _log_result(after: dict, before: float | None, cv: dict | None, where: Path) -> None:
    if after:
        logger.info("held-out pairwise accuracy %.3f (before training %s) on %d pairs; %s", after["eval_accuracy"],
                    _rounded(before), after["eval_pairs"], where)
    if cv:
        logger.info("cross-validated pairwise accuracy %s [%s, %s] (%d folds)", _rounded(cv["accuracy"]),
                    _rounded(cv["accuracy_low"]), _rounded(cv["accuracy_high"]), cv["folds"])


def _rounded(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.3f}"


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
