"""What every training stage shares around a Hugging Face Trainer: CPU-safe defaults, the run's
working directory with resumable checkpoints, metrics.jsonl + TensorBoard logs, and per-rank step counts.

A training stage does:

    run = TrainingRun.start(STAGE, output, training_args)     # after validating its inputs
    trainer = SomeTrainer(..., args=run.training_args, callbacks=[run.metrics])
    run.attach(trainer)
    result = run.train(trainer)                                # resumes from the last complete checkpoint
    ...                                                        # save adapter/ into run.partial, build manifest
    run.publish(manifest, keep=["adapter"], keep_checkpoints=...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from datasets import DatasetDict
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from align.core.command import parse_config
from align.core.journal import replay
from align.core.outputs import StageOutput, append_jsonl, base_manifest, run_identity
from align.lm.models import device_defaults
from align.lm.precision import PRECISION_HELP, Precision, choose_precision

logger = logging.getLogger("align")


def run_config(data_args, training_args, model_args) -> dict:
    """What a training stage's manifest records and a resumed run must match."""
    return run_identity({
        "data": dataclasses.asdict(data_args),
        "model": dataclasses.asdict(model_args),
        "training": training_args.to_dict(),
    })


@dataclass
class TrainingDefaults:
    """Defaults shared by our TRL/transformers training configs (mixed in before the TRL class)."""

    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in backward to save memory (slower)."}
    )
    save_steps: float = field(default=50, metadata={"help": "Checkpoint every N optimizer steps (for resuming)."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    logging_steps: float = field(default=5, metadata={"help": "Log metrics every N optimizer steps."})
    disable_tqdm: bool | None = field(default=False, metadata={"help": "Hide the training progress bar."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP: look for unused parameters each step (not needed with LoRA)."}
    )
    push_to_hub: bool = field(
        default=False, metadata={"help": "When the stage has finished, push its adapter, model card and manifest to "
                                 "--hub_model_id (token and hub checked before training)."}
    )
    hub_private_repo: bool | None = field(
        default=True, metadata={"help": "Create the hub repository private (the default); false: public."}
    )
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Integrations to log to ('tensorboard', 'wandb', 'none', ...)."}
    )
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP + " Training keeps fp32 weights and "
                                                     "optimizer states and runs the forward pass under autocast."})

    def __post_init__(self):
        defaults = device_defaults()
        self.use_cpu = self.use_cpu or defaults["use_cpu"]
        self.precision_choice = self._choose_precision("cpu" if self.use_cpu else defaults["device_type"])
        self.bf16 = self.precision_choice.is_bf16
        if self.bf16 and defaults["device_type"] == "cpu":
            self.use_cpu = True  # transformers runs bf16 autocast on a CPU only when told it trains there
        super().__post_init__()
        # transformers starts from ACCELERATE_MIXED_PRECISION (what `accelerate launch` sets) and only overrides it
        # when bf16/fp16 is on: --precision fp32 must mean fp32 under any launcher too.
        self.mixed_precision = "bf16" if self.bf16 else ("fp16" if self.fp16 else "no")

    def _choose_precision(self, device_type: str) -> Precision:
        """`--precision`, with transformers' own `--bf16 true|false` honoured as the same choice."""
        if self.bf16 is not None and self.precision != "auto" and self.bf16 != (self.precision == "bf16"):
            raise ValueError(f"--bf16 {str(self.bf16).lower()} contradicts --precision {self.precision} — "
                             "give only --precision")
        requested = self.precision if self.bf16 is None else ("bf16" if self.bf16 else "fp32")
        return choose_precision(requested, device_type)


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, learning rate, eval metrics, ...) to logs/metrics.jsonl and counts the
    optimizer steps each rank runs, so a distributed run can show that every rank took part."""

    def __init__(self, path: Path):
        self.path = path
        self.steps_this_run = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps_this_run += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            append_jsonl(self.path, {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                                     **(logs or {})})

    def steps_per_rank(self) -> list[int]:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.steps_this_run)
            return [int(x) for x in gathered]
        return [self.steps_this_run]

    def history(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []


class NoCheckpointAtTheEnd(TrainerCallback):
    """Skip the checkpoint at the last step. The stage writes the adapter right after that step anyway, and a
    run killed between the two would resume from a checkpoint at the last step, from which transformers runs
    one step more than an uninterrupted run; from the checkpoint before it, the re-run ends exactly as one."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = False
        return control


def latest_checkpoint(checkpoint_dir: Path, remove_incomplete: bool) -> Path | None:
    """The newest checkpoint that finished writing (the trainer writes trainer_state.json last)."""
    if not checkpoint_dir.is_dir():
        return None
    candidates = sorted(
        (p for p in checkpoint_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    complete = [p for p in candidates if (p / "trainer_state.json").exists()]
    if remove_incomplete:
        for path in candidates:
            if path not in complete:
                logger.info("removing incomplete checkpoint %s", path.name)
                shutil.rmtree(path, ignore_errors=True)
    return complete[-1] if complete else None


@dataclass
class TrainingRun:
    """One training stage run inside ``<output_dir>.partial/``."""

    output: StageOutput
    training_args: object
    is_main: bool
    resume_from: Path | None
    metrics: MetricsCallback

    @property
    def partial(self) -> Path:
        return self.output.partial

    @classmethod
    def start(cls, output: StageOutput, training_args) -> TrainingRun:
        """Open the working directory and find the checkpoint to resume from (call after validation)."""
        is_main = training_args.process_index == 0
        if is_main:
            logger.info("%s; weights and optimizer states in fp32", training_args.precision_choice.describe())
        partial = output.open(is_main_process=is_main)
        checkpoints = partial / "checkpoints"
        resume_from = latest_checkpoint(checkpoints, remove_incomplete=is_main)
        metrics = MetricsCallback(partial / "logs" / "metrics.jsonl")
        if is_main and resume_from is not None:
            truncate_history(metrics.path, int(resume_from.name.split("-")[-1]))
        elif is_main:  # nothing to resume from: what an earlier attempt logged or measured is done again
            metrics.path.unlink(missing_ok=True)
            for measured in (partial / "logs").glob("evaluate-*.json"):
                measured.unlink()
        # The stage pushes the finished adapter itself (after publishing), never the Trainer's checkpoints.
        training_args = dataclasses.replace(training_args, output_dir=str(checkpoints), push_to_hub=False)
        return cls(output, training_args, is_main, resume_from, metrics)

    def attach(self, trainer) -> None:
        """Send TensorBoard events to logs/tensorboard instead of a run folder inside checkpoints/, and keep the
        last step out of the checkpoints (`NoCheckpointAtTheEnd`)."""
        trainer.add_callback(NoCheckpointAtTheEnd())
        for callback in list(trainer.callback_handler.callbacks):
            if isinstance(callback, TensorBoardCallback):
                trainer.remove_callback(callback)
                replacement = TensorBoardCallback()
                replacement.logging_dir = str(self.partial / "logs" / "tensorboard")
                trainer.add_callback(replacement)

    def train(self, trainer, description: str):
        if self.resume_from is not None:
            logger.info("resuming from %s (step %s)", self.resume_from.name, self.resume_from.name.split("-")[-1])
        else:
            logger.info("%s -> %s", description, self.output.output_dir)
        return trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)

    def evaluate_once(self, trainer, prefix: str) -> dict:
        """`trainer.evaluate` of the model before training (a fresh LoRA adapter is the identity), measured once
        per run and kept in logs/evaluate-<prefix>.json: a resumed run reports the same numbers and logs them once."""
        path = self.partial / "logs" / f"evaluate-{prefix}.json"
        measured = path.exists()
        trainer.accelerator.wait_for_everyone()  # every rank decides before rank 0 can write the file
        if measured:
            return json.loads(path.read_text())
        metrics = trainer.evaluate(metric_key_prefix=prefix)
        if self.is_main:
            path.write_text(json.dumps(metrics))
        return metrics

    def wait_for_ranks(self, trainer) -> dict:
        """Log this rank's step count, gather all ranks', and wait for everyone. Returns the manifest entry."""
        steps = self.metrics.steps_per_rank()
        args = self.training_args
        logger.info("rank %d/%d ran %d optimizer steps", args.process_index, args.world_size,
                    self.metrics.steps_this_run)
        trainer.accelerator.wait_for_everyone()
        return {"world_size": args.world_size, "steps_per_rank": steps}

    def gather_adapter_state(self, trainer) -> dict | None:
        """Under FSDP each rank holds a shard of the weights: gather the full state dict (every rank must call
        this; the main process gets it). None elsewhere: the model's own weights are whole."""
        if getattr(trainer, "is_fsdp_enabled", False):
            return trainer.accelerator.get_state_dict(trainer.model)
        return None

    def save_adapter(self, trainer, tokenizer, state_dict: dict | None = None) -> Path:
        """Write the trained PEFT adapter and the tokenizer to adapter/ (main process only)."""
        adapter = self.partial / "adapter"
        trainer.model.save_pretrained(str(adapter), state_dict=state_dict)
        tokenizer.save_pretrained(str(adapter))
        return adapter

    def manifest(self, stage: str, config: dict, dataset: str, model_name: str, model_path: str,
                 started: str) -> dict:
        """The manifest of a training stage before its metrics: one input dataset, a base model, adapter/ + logs/."""
        manifest = base_manifest(stage, config, {"dataset": dataset},
                                 {"name_or_path": model_name, "resolved": model_path}, started)
        manifest["outputs"] = {"adapter": "adapter", "logs": "logs"}
        return manifest

    def logged(self, key: str) -> list[float]:
        return [record[key] for record in self.metrics.history() if key in record]

    def publish(self, manifest: dict, keep: list[str], keep_checkpoints: bool) -> Path:
        manifest["resumed_from"] = self.resume_from.name if self.resume_from else None
        if not keep_checkpoints:
            shutil.rmtree(self.partial / "checkpoints", ignore_errors=True)
        return self.output.publish(manifest, keep=keep)


def can_evaluate_before_training(trainer) -> bool:
    """Whether the untrained model can be evaluated before `train()`: under FSDP2 accelerate must prepare the
    model together with its optimizer, which an evaluation before training would not do."""
    if getattr(trainer, "is_fsdp_enabled", False):
        logger.info("FSDP: the before-training evaluation is skipped (its metrics are recorded as null)")
        return False
    return True


def truncate_history(path: Path, step: int) -> None:
    """Drop log records written after the checkpoint we resume from (they will be logged again), and a line torn
    by a kill; the file is rewritten atomically."""
    replay(path, lambda record: record.get("step", 0) <= step)


def parse_training_config(stage: str, config_classes: tuple, argv: list[str] | None):
    """Parse (data args, training args, model args) and set up the stage's output (nothing written yet).

    Returns (data_args, training_args, model_args, config, output); `config` is what the manifest
    records and what a resumed run must match.
    """
    data_args, training_args, model_args = parse_config(stage, config_classes, argv)
    config = run_config(data_args, training_args, model_args)
    output = StageOutput(stage, Path(training_args.output_dir), config,
                         overwrite=data_args.overwrite_output_dir, restart=data_args.restart)
    return data_args, training_args, model_args, config, output


def hold_out(train, test, eval_fraction: float, max_train_samples: int | None, seed: int):
    """{train, eval?}: the given test split, else a seeded `eval_fraction` of train (when it has at least
    10 rows), else no evaluation; then cap the training rows."""
    if test is not None:
        result = DatasetDict(train=train, eval=test)
    elif eval_fraction > 0 and len(train) >= 10:
        held_out = train.train_test_split(test_size=eval_fraction, seed=seed)
        result = DatasetDict(train=held_out["train"], eval=held_out["test"])
    else:
        result = DatasetDict(train=train)
    if max_train_samples is not None:
        result["train"] = result["train"].select(range(min(max_train_samples, len(result["train"]))))
    return result
