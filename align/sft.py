"""Supervised fine-tuning with LoRA: teach the base model to follow instructions from demonstrations.

Reads a dataset with a `messages` column (chats; the loss covers the assistant turns only) or
`prompt` + `completion` columns (the loss covers the completion only): a stage output directory,
a `save_to_disk` directory, a JSON/JSONL/Parquet file, or a hub name. Uses its `test` split for
evaluation, or holds out `eval_fraction` of the training rows.

Writes `<output_dir>/adapter/` (PEFT adapter, tokenizer, model card), `manifest.json` (train and
eval loss, config, input fingerprints) and `logs/` (metrics.jsonl, TensorBoard). Work happens in
`<output_dir>.partial/`; re-running the same command after a crash resumes from the last checkpoint.

    align sft --config configs/tiny/sft.yaml                      # seconds, tiny offline model
    align sft --config configs/sft.yaml                           # SmolLM2-135M-Instruct on CPU
    python -m align.sft --config configs/sft.yaml --learning_rate 1e-4
    accelerate launch --config_file configs/accelerate/ddp.yaml -m align.sft --config configs/sft.yaml
    torchrun --nproc_per_node 2 -m align.sft --config configs/tiny/sft.yaml      # CPU DDP (gloo)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetDict
from transformers import Trainer
from trl import ModelConfig, SFTConfig, SFTTrainer

from align.core.command import StageError, now_iso, run_stage
from align.core.hub import check_stage_push, push_after_stage
from align.core.inputs import load_stage_dataset, validate_columns
from align.core.model_card import write_model_card
from align.core.outputs import RunArguments
from align.lm.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, lora_config, resolve_model
from align.lm.training import (
    TrainingDefaults,
    TrainingRun,
    can_evaluate_before_training,
    hold_out,
    parse_training_config,
)

STAGE = "sft"
logger = logging.getLogger("align")


@dataclass
class SFTDataArguments(RunArguments):
    dataset_name: str = field(
        default="data/seed/demonstrations.jsonl",
        metadata={"help": "Training data: a stage output directory, a save_to_disk directory, a JSON/JSONL/Parquet "
                  "file, or a hub dataset name. Needs `messages`, or `prompt` and `completion`."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test", metadata={"help": "Split to evaluate on, when the dataset has it."}
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={"help": "Without a test split, hold out this fraction of the training rows (seeded) for "
                  "evaluation; 0 disables evaluation. Needs at least 10 rows."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on at most this many rows (after the eval hold-out)."}
    )


@dataclass
class SFTModelConfig(ModelConfig):
    """TRL's ModelConfig with the pipeline's defaults: the embedded model and LoRA on."""

    model_name_or_path: str | None = field(
        default=DEFAULT_MODEL,
        metadata={"help": f"Base model: '{DEFAULT_MODEL}' (embedded), 'tiny-llama' (tiny, offline, for smoke "
                  "runs), a local Hugging Face directory, or a hub id."},
    )
    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter (the pipeline expects one)."})
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules LoRA adapts ('all-linear' = every linear layer but the output head)."},
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on each LoRA module's input. 0 by default: on a CPU the random masks of 210 LoRA "
                  "modules took about a third of a SmolLM2-135M step, and 0.05 did not lower the held-out loss."},
    )


@dataclass
class SFTStageConfig(TrainingDefaults, SFTConfig):
    """TRL's SFTConfig with CPU-friendly defaults for a LoRA run."""

    output_dir: str | None = field(default="runs/sft", metadata={"help": "Where the finished stage output goes."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (LoRA likes ~1e-4..3e-4)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the training data."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Batch size per device."})
    max_length: int | None = field(default=512, metadata={"help": "Truncate tokenized examples to this length."})
    assistant_only_loss: bool = field(
        default=True,
        metadata={"help": "For `messages` data: compute the loss on assistant turns only. (For prompt/completion "
                  "data the loss is on completions, see completion_only_loss.)"},
    )


CONFIG_CLASSES = (SFTDataArguments, SFTStageConfig, SFTModelConfig)


class SFTStageTrainer(SFTTrainer):
    """TRL's SFTTrainer, with the model's own cross-entropy on a CPU. TRL computes the loss through a fused,
    chunked LM head; without Triton its torch fallback walks the vocabulary tile by tile over every position
    and took ~2 s of a ~5 s step of SmolLM2-135M here (its backward in fp32 whatever the precision). The
    model's loss is the same number — the summed log-likelihood of the label tokens over their count — and
    costs a fraction of that. (TRL's entropy / token-accuracy training metrics are not logged on a CPU.)"""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain_nll = (self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
                     and not self.aux_loss_enabled)
        if self.args.device.type != "cpu" or not plain_nll:  # other losses: TRL's own computation
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def prepare_data(data: DatasetDict, args: SFTDataArguments, seed: int,
                 assistant_only_loss: bool = False) -> tuple[DatasetDict, str]:
    """Pick the format, validate it, and return {train, eval?} with only the columns TRL needs. Under
    `assistant_only_loss` every chat must have an assistant reply to learn from."""
    train_split = args.dataset_train_split
    if train_split not in data:
        raise StageError(STAGE, f"split '{train_split}' not found in {args.dataset_name} (found: "
                         f"{', '.join(data) or 'none'}) — set --dataset_train_split")
    if len(data[train_split]) == 0:
        raise StageError(STAGE, f"split '{train_split}' of {args.dataset_name} is empty — give the stage some "
                         "training rows")
    columns = data[train_split].column_names
    if "messages" in columns:
        schema, kind = {"messages": "messages"}, "messages"
    elif "prompt" in columns and "completion" in columns:
        schema, kind = {"prompt": "str|messages", "completion": "str|messages"}, "prompt-completion"
    else:
        raise StageError(
            STAGE,
            f"{args.dataset_name} split '{train_split}' has no 'messages' column (and no 'prompt'+'completion' "
            f"pair); found: {', '.join(columns) or 'none'} — produce it with `align self-instruct` or convert "
            "your data to chat messages",
        )
    splits = [train_split] + ([args.dataset_test_split] if args.dataset_test_split in data else [])
    validate_columns(data, STAGE, schema, splits=splits)
    if kind == "messages" and assistant_only_loss:
        silent = [f"{args.dataset_name} split '{split}' row {index}" for split in splits
                  for index, chat in enumerate(data[split]["messages"])
                  if not any(turn["role"] == "assistant" and turn["content"].strip() for turn in chat)]
        if silent:
            more = f" (and {len(silent) - 3} more)" if len(silent) > 3 else ""
            raise StageError(STAGE, f"{', '.join(silent[:3])}{more}: no assistant reply, so nothing to learn under "
                             "--assistant_only_loss — drop those rows, or pass --assistant_only_loss false")
    keep = list(schema)
    test = data[args.dataset_test_split].select_columns(keep) if args.dataset_test_split in data else None
    prepared = hold_out(data[train_split].select_columns(keep), test, args.eval_fraction, args.max_train_samples,
                        seed)
    return prepared, kind


def main(argv: list[str] | None = None) -> Path:
    data_args, training_args, model_args, config, output = parse_training_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()

    # Validate everything before writing anything.
    output.check()
    check_stage_push(STAGE, training_args.push_to_hub, training_args.hub_model_id, data_args.hub_endpoint)
    data, data_kind = prepare_data(load_stage_dataset(data_args.dataset_name, STAGE), data_args, training_args.seed,
                                   training_args.assistant_only_loss)
    if data_kind == "prompt-completion":
        training_args.assistant_only_loss = False  # the completion mask plays that role
    model_path = resolve_model(model_args.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    if data_kind == "messages" and not tokenizer.chat_template:
        raise StageError(STAGE, f"{model_args.model_name_or_path} has no chat template, so `messages` data cannot "
                         "be formatted — use a chat model or prompt/completion data")

    run = TrainingRun.start(output, training_args)
    trainer = SFTStageTrainer(
        model=load_causal_lm(model_path, dtype=model_args.dtype, stage=STAGE),
        args=run.training_args,
        train_dataset=data["train"],
        eval_dataset=data.get("eval"),
        processing_class=tokenizer,
        peft_config=lora_config(model_args),
        callbacks=[run.metrics],
    )
    run.attach(trainer)
    baseline = (run.evaluate_once(trainer, "baseline")["baseline_loss"]
                if "eval" in data and can_evaluate_before_training(trainer) else None)
    result = run.train(trainer, f"training {model_args.model_name_or_path} on {len(data['train'])} examples "
                                f"({data_kind})")
    eval_metrics = trainer.evaluate() if "eval" in data else {}
    distributed = run.wait_for_ranks(trainer)
    state = run.gather_adapter_state(trainer)
    if not run.is_main:
        return output.output_dir

    adapter = run.save_adapter(trainer, tokenizer, state)
    losses = run.logged("loss")
    manifest = run.manifest(STAGE, config, data_args.dataset_name, model_args.model_name_or_path, model_path, started)
    manifest["metrics"] = {
        "train_loss": result.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "eval_loss_before": baseline,
        "eval_loss": eval_metrics.get("eval_loss"),
        "global_step": trainer.state.global_step,
        "train_examples": len(data["train"]),
        "eval_examples": len(data["eval"]) if "eval" in data else 0,
        "train_runtime_s": result.metrics.get("train_runtime"),
    }
    manifest["data_format"] = data_kind
    manifest["distributed"] = distributed
    manifest["finished"] = now_iso()
    write_model_card(adapter, manifest)
    final = run.publish(manifest, keep=["adapter"], keep_checkpoints=data_args.keep_checkpoints)
    if training_args.push_to_hub:
        push_after_stage(STAGE, final, training_args.hub_model_id, data_args.hub_endpoint,
                         private=training_args.hub_private_repo is not False)
    logger.info("train loss %.4f%s; adapter: %s", result.training_loss,
                f"; eval loss {'not measured' if baseline is None else f'{baseline:.4f}'} -> "
                f"{eval_metrics['eval_loss']:.4f}" if eval_metrics else "",
                final / "adapter")
    return final


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
