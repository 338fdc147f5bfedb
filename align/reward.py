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
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict
from transformers import Trainer, set_seed
from trl import ModelConfig, RewardConfig

from align.common import (
    StageError,
    load_stage_dataset,
    now_iso,
    run_stage,
    validate_columns,
)
from align.hub import check_stage_push, push_after_stage, write_model_card
from align.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer, lora_config, merge_adapter, resolve_model
from align.training import (
    RunArguments,
    TrainingDefaults,
    TrainingRun,
    can_evaluate_before_training,
    hold_out,
    parse_training_config,
)

STAGE = "reward"
logger = logging.getLogger("align")


# ----------------------------------------------------------------------------- the K-wise loss (pure)


def ranking_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All ordered pairs (better, worse) of a ranking; 0 is best, equal ranks are ties (no pair).

    >>> ranking_pairs([1, 0, 1])
    [(1, 0), (1, 2)]
    """
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def kwise_loss(
    rewards: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    pair_prompt: torch.Tensor,
    num_prompts: int,
    margins: torch.Tensor | None = None,
    weighting: str = "pair",
) -> torch.Tensor:
    """-log sigmoid(r_better - r_worse - margin), averaged over the batch's pairs.

    `weighting="pair"`: the mean over all ordered pairs of the batch, so a prompt counts as many times as
    it has pairs (the same weight TRL gives pairs). `weighting="prompt"`: the mean over each prompt's
    pairs, then over prompts (InstructGPT's 1/C(K,2) normalisation), so every prompt counts once.

    Args:
        rewards: [N] one scalar per response in the batch (all prompts' responses, flattened).
        better, worse: [P] indices into `rewards` of each pair's preferred and dispreferred response.
        pair_prompt: [P] which prompt (0..num_prompts-1) each pair belongs to.
        num_prompts: prompts in the batch that have at least one pair.
        margins: [P] optional margin each pair must be won by.
        weighting: "pair" or "prompt" (see above).

    Returns:
        A scalar tensor.
    """
    difference = rewards[better] - rewards[worse]  # [P]
    if margins is not None:
        difference = difference - margins
    pair_losses = -F.logsigmoid(difference)  # [P]
    if weighting == "pair":
        return pair_losses.mean()
    if weighting != "prompt":
        raise ValueError(f"weighting must be 'pair' or 'prompt', got {weighting!r}")
    pairs_per_prompt = torch.bincount(pair_prompt, minlength=num_prompts).clamp(min=1)  # [B]
    per_prompt = torch.zeros(num_prompts, dtype=pair_losses.dtype, device=pair_losses.device)
    per_prompt = per_prompt.index_add(0, pair_prompt, pair_losses) / pairs_per_prompt  # [B]
    return per_prompt.mean()


def centering_penalty(rewards: torch.Tensor, sequence_prompt: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """Mean over prompts of (2 * mean reward of the prompt's responses)^2; equals TRL's
    mean((r_chosen + r_rejected)^2) when K = 2, and keeps rewards centred on zero for any K.

    Args:
        rewards: [N]; sequence_prompt: [N] the prompt index of each response.
    """
    sums = torch.zeros(num_prompts, dtype=rewards.dtype, device=rewards.device).index_add(0, sequence_prompt, rewards)
    counts = torch.bincount(sequence_prompt, minlength=num_prompts).clamp(min=1)
    return ((2 * sums / counts) ** 2).mean()


class RankingCollator:
    """Flattens a batch of whole prompts into one padded batch of responses plus the pair indices.

    Rows carry `input_ids` (list of K token lists) and `ranks` (K ints); the collator never splits a
    prompt: its K sequences and all its pairs are in the same batch.
    """

    def __init__(self, pad_token_id: int, rank_margin: float = 0.0):
        self.pad_token_id = pad_token_id
        self.rank_margin = rank_margin

    def __call__(self, rows: list[dict]) -> dict:
        sequences, sequence_prompt, better, worse, pair_prompt, margins = [], [], [], [], [], []
        for prompt_index, row in enumerate(rows):
            offset = len(sequences)
            sequences.extend(row["input_ids"])
            sequence_prompt.extend([prompt_index] * len(row["input_ids"]))
            for i, j in ranking_pairs(row["ranks"]):
                better.append(offset + i)
                worse.append(offset + j)
                pair_prompt.append(prompt_index)
                margins.append(self.rank_margin * (row["ranks"][j] - row["ranks"][i]))
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)  # [N, L]
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [N, L]
        for index, sequence in enumerate(sequences):  # right padding: the reward is read at the last token
            input_ids[index, : len(sequence)] = torch.tensor(sequence)
            attention_mask[index, : len(sequence)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "sequence_prompt": torch.tensor(sequence_prompt),
            "better": torch.tensor(better, dtype=torch.long),
            "worse": torch.tensor(worse, dtype=torch.long),
            "pair_prompt": torch.tensor(pair_prompt, dtype=torch.long),
            "margins": torch.tensor(margins, dtype=torch.float),
            "num_prompts": len(rows),
        }


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[N] scalar rewards: transformers pools the score head at each sequence's rightmost non-pad token
    (with ChatML that is the newline after the reply's <|im_end|>, which sees the whole reply)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [N, 1], pooled by the head
    return logits.squeeze(-1)


# ----------------------------------------------------------------------------- tokenization


def encode_response(tokenizer, prompt, response: str, max_length: int | None) -> tuple[list[int], str | None]:
    """Token ids of prompt + response in the model's chat format, at most `max_length` long (None: no limit).

    Too long: the prompt loses tokens from its left and the response is kept whole. A response too long
    to fit beside the last quarter of the limit's worth of prompt keeps its beginning, so the model still
    sees the end of the question. Returns (ids, "prompt" | "response" | None), the second saying what was cut.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if tokenizer.chat_template:
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):  # a template that rewrites earlier turns: split by length
            prompt_text = full_text[: max(0, len(full_text) - len(response))]
        response_text = full_text[len(prompt_text):]
    else:
        prompt_text = "\n".join(m["content"] for m in messages) + "\n"
        response_text = response + (tokenizer.eos_token or "")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if max_length is None or len(prompt_ids) + len(response_ids) <= max_length:
        return prompt_ids + response_ids, None
    prompt_share = min(len(prompt_ids), max_length // 4)
    if len(response_ids) > max_length - prompt_share:
        kept_prompt = prompt_ids[len(prompt_ids) - prompt_share:] if prompt_share else []
        return kept_prompt + response_ids[: max_length - prompt_share], "response"
    room = max_length - len(response_ids)
    if len(prompt_ids) > room:
        return prompt_ids[len(prompt_ids) - room:] + response_ids, "prompt"
    return prompt_ids + response_ids, None


def tokenize_comparisons(data: Dataset, tokenizer, max_length: int) -> tuple[Dataset, dict]:
    """Add `input_ids` (K token lists per row); count truncations instead of dropping anything."""
    counts = {"prompt": 0, "response": 0}

    def encode(row):
        ids = []
        for response in row["responses"]:
            encoded, truncated = encode_response(tokenizer, row["prompt"], response, max_length)
            if truncated:
                counts[truncated] += 1
            ids.append(encoded)
        return {"input_ids": ids}

    encoded = data.map(encode, desc="tokenizing", load_from_cache_file=False)
    return encoded, {"truncated_prompts": counts["prompt"], "truncated_responses": counts["response"]}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def score_rows(model, rows: Dataset, collator: RankingCollator, batch_size: int = 8) -> list[list[float]]:
    """Rewards of every response of every row (tokenized), in order."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[list[float]] = []
    for start in range(0, len(rows), batch_size):
        batch_rows = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        batch = collator(batch_rows)
        rewards = sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        rewards = rewards.float().cpu().tolist()
        offset = 0
        for row in batch_rows:
            scores.append(rewards[offset: offset + len(row["input_ids"])])
            offset += len(row["input_ids"])
    return scores


def ranking_metrics(scores: list[list[float]], ranks: list[list[int]]) -> dict:
    """Pairwise accuracy (ties in the reward count as half), overall and by K, and the mean margin
    r_better - r_worse over all ordered pairs of the rankings."""
    correct, margins = 0.0, []
    by_k: dict[int, list[float]] = defaultdict(list)
    for row_scores, row_ranks in zip(scores, ranks, strict=True):
        for i, j in ranking_pairs(row_ranks):
            won = 1.0 if row_scores[i] > row_scores[j] else 0.5 if row_scores[i] == row_scores[j] else 0.0
            correct += won
            by_k[len(row_ranks)].append(won)
            margins.append(row_scores[i] - row_scores[j])
    pairs = len(margins)
    return {
        "accuracy": correct / pairs if pairs else float("nan"),
        "mean_margin": sum(margins) / pairs if pairs else float("nan"),
        "pairs": pairs,
        "accuracy_by_k": {str(k): sum(v) / len(v) for k, v in sorted(by_k.items())},
    }


class RankingRewardTrainer(Trainer):
    """transformers' Trainer with the K-wise loss and ranking evaluation."""

    def __init__(self, *args, rank_collator: RankingCollator, center_rewards_coefficient: float | None = None,
                 pair_weighting: str = "pair", **kwargs):
        super().__init__(*args, data_collator=rank_collator, **kwargs)
        self.rank_collator = rank_collator
        self.pair_weighting = pair_weighting
        self.center_rewards_coefficient = center_rewards_coefficient
        self.model_accepts_loss_kwargs = False  # our loss is already a mean; let Trainer scale for accumulation

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rewards = sequence_rewards(model, inputs["input_ids"], inputs["attention_mask"])  # [N]
        loss = kwise_loss(rewards, inputs["better"], inputs["worse"], inputs["pair_prompt"],
                          inputs["num_prompts"], inputs["margins"], self.pair_weighting)
        if self.center_rewards_coefficient:
            loss = loss + self.center_rewards_coefficient * centering_penalty(
                rewards, inputs["sequence_prompt"], inputs["num_prompts"])
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        scores = score_rows(model, dataset, self.rank_collator, self.args.per_device_eval_batch_size)
        model.train(was_training)
        metrics = ranking_metrics(scores, dataset["ranks"])
        flat = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items() if k != "accuracy_by_k"}
        flat.update({f"{metric_key_prefix}_accuracy_k{k}": v for k, v in metrics["accuracy_by_k"].items()})
        self.log(flat)
        return flat


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
    from align.comparisons import validate_comparisons

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
        validate_columns(data, STAGE, {"chosen": "str", "rejected": "str"}, splits=splits)
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


# ----------------------------------------------------------------------------- models


def build_reward_model(model_path: str, tokenizer, sft_adapter: str | None, dtype=None, stage: str = STAGE):
    """A one-output sequence-classification model on the base (with the SFT adapter merged in, if given)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=1, dtype=dtype or "auto", trust_remote_code=False, use_safetensors=True,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    if sft_adapter:
        merged = merge_adapter(load_causal_lm(model_path, dtype=dtype, stage=stage), sft_adapter, stage=stage)
        backbone = getattr(model, model.base_model_prefix)
        backbone.load_state_dict(getattr(merged, merged.base_model_prefix).state_dict())
    return model


def load_reward_model(output_dir: str | Path, dtype=None):
    """Load a finished reward stage output (base [+ SFT adapter] + reward adapter + score head), frozen.

    Returns (model, tokenizer, manifest); the manifest's metrics hold reward_mean/reward_std.
    """
    from peft import PeftModel

    from align.common import read_manifest

    output_dir = Path(output_dir)
    manifest = read_manifest(output_dir)
    if manifest.get("stage") != STAGE:
        raise StageError(STAGE, f"{output_dir} is a '{manifest.get('stage')}' output, not a reward model")
    model_config = manifest["config"]["model"]
    model_path = resolve_model(model_config["model_name_or_path"], STAGE)
    tokenizer = load_tokenizer(str(output_dir / "adapter"), STAGE)
    model = build_reward_model(model_path, tokenizer, model_config.get("sft_adapter"), dtype=dtype)
    model = PeftModel.from_pretrained(model, str(output_dir / "adapter")).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer, manifest


# ----------------------------------------------------------------------------- the stage


def main(argv: list[str] | None = None) -> Path:
    from trl.trainer.utils import disable_dropout_in_model

    data_args, training_args, model_args, config, output = parse_training_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()

    # Validate everything before writing anything.
    output.check()
    check_stage_push(STAGE, training_args.push_to_hub, training_args.hub_model_id, data_args.hub_endpoint)
    data = to_comparisons(load_stage_dataset(data_args.dataset_name, STAGE), data_args, training_args.seed)
    model_path = resolve_model(model_args.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    if model_args.sft_adapter and not (Path(model_args.sft_adapter).exists()):
        raise StageError(STAGE, f"sft_adapter not found: {model_args.sft_adapter} — pass an `align sft` output")
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
    from peft import get_peft_model

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
    before = (trainer.evaluate(metric_key_prefix="before")
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
