"""Self-Instruct: bootstrap instruction data (tasks with input/output instances) from a few seed tasks.

The algorithm of Wang et al. 2022 ("Self-Instruct: Aligning Language Models with Self-Generated
Instructions"), run with any local causal LM:

1. **Instructions.** Each prompt shows 8 instructions — `seed_examples_per_prompt` (6) sampled from the
   human seed tasks and `generated_examples_per_prompt` (2) from the tasks accepted so far (seeds stand
   in while fewer exist) — and asks the model for up to `new_instructions_per_prompt` more. The reply is
   parsed leniently (numbered, "Task N:", bulleted; preamble and sign-off ignored); when the generation
   ran out of tokens its last item is dropped as `truncated`, the others are kept.
2. **Filters**, in order, each discard recording its `reason`: `too_short` / `too_long` (word count
   outside (min_words, max_words], default (3, 150]); `blocked_keyword` (image, picture, graph, file, map,
   draw, plot, go to: things a text model cannot act on); `starts_with_punctuation`;
   `starts_non_ascii`; `duplicate` (same text as a pool member, case and spacing aside); `similar_rouge`
   (ROUGE-L F1 > 0.7 against any instruction in the pool, seeds included — `align.instruct.dedup.RougeLFilter`,
   exact and fast); optionally `similar_embedding` (all-MiniLM-L6-v2 cosine, off by default).
   Instructions that pass join the pool, so later candidates are compared with them.
3. **Classification identification.** A few-shot prompt (ours) asks whether the task's answers come
   from a small set of labels; the answer is read from the log-probabilities of "Yes" and "No"
   (deterministic, never unparseable), against a threshold calibrated on the prompt's own examples
   (`SelfInstruct.classification_threshold`).
4. **Instances.** Ordinary tasks are input-first (an input, then its output); classification tasks are
   output-first (a class label, then an input with that label), which keeps labels balanced. Few-shot
   demonstrations come from seed tasks of the same kind; `instances_per_task` samples per task. Instance
   discards: `unparseable`, `truncated`, `empty_output`, `input_equals_output`, `duplicate_instance`,
   `conflicting_outputs` (same input, different outputs: all of them). A task left with no instance is
   discarded as `no_valid_instances`.
5. **Rounds** of `prompts_per_round` prompts run until `num_instructions` tasks are accepted (the last
   step's extra accepted tasks are kept) or `max_rounds` have run.

`prompt_mode`: `completion` (the default) continues raw text, the paper's mode; `chat` uses the model's
chat template; `auto` picks chat when the tokenizer has one. Chat mode suits capable instruct models; the
135M default mostly copies the listed examples back in it (6 tasks accepted of 57 candidates against 16 of
20 in completion mode, `scripts/bench_self_instruct.py`).

Every finished step (one batch of prompts with its instructions, classifications and instances) is
journaled to `<output_dir>.partial/journal.jsonl`; re-running the same command replays the journal and
continues with the next step, losing and repeating nothing (each step's sampling is seeded by its
number).

Writes `<output_dir>/dataset/` (split `train`, one row per instance: `instruction, input, output,
is_classification, origin ("seed"|"generated"), round, task_id, messages, prompt` — `messages` feeds
`align sft`, `prompt` feeds PPO), `<output_dir>/discarded/` (split `discarded`: every rejected
instruction and instance with `kind, reason, detail`), `journal.jsonl` and `manifest.json` with the
counts per reason.

    align self-instruct --config configs/self-instruct.yaml        # SmolLM2-135M-Instruct, the team's seed tasks
    align self-instruct --config configs/tiny/self-instruct.yaml   # the tiny offline model, seconds (plumbing only)
    align self-instruct --seed_tasks ../shared/data/self_instruct/seed_tasks.jsonl --num_instructions 500 \\
        --output_dir runs/self_instruct_175
    align sft --config configs/sft.yaml --dataset_name runs/self_instruct
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from align.core.command import StageError, now_iso, parse_config, run_stage
from align.core.options import AT_LEAST_ONE, NON_NEGATIVE, PROBABILITY_MASS, Choice, Range
from align.core.outputs import OutputArguments, StageOutput, base_manifest, run_identity, save_dataset_atomic
from align.instruct.dedup import DEFAULT_EMBEDDING_THRESHOLD, EmbeddingFilter
from align.instruct.loop import LocalModel, SelfInstruct, SelfInstructSettings
from align.instruct.prompts import Prompts
from align.instruct.tasks import build_datasets, load_seed_tasks
from align.lm.models import (
    DEFAULT_EMBEDDING_MODEL,
    DEFAULT_MODEL,
    load_for_inference,
    load_tokenizer,
    pick_device,
    require_adapter,
    resolve_embedding_model,
    resolve_model,
)
from align.lm.precision import PRECISION_HELP, precision_problems, stage_precision

STAGE = "self-instruct"
PROMPT_MODES = ("auto", "chat", "completion")
logger = logging.getLogger("align")


@dataclass
class SelfInstructArguments(OutputArguments):
    seed_tasks: str = field(
        default="data/seed/seed_tasks.jsonl",
        metadata={"help": "JSON Lines (.gz ok) of seed tasks: {instruction, instances: [{input, output}], "
                  "is_classification}, e.g. ../shared/data/self_instruct/seed_tasks.jsonl."},
    )
    output_dir: str = field(default="runs/self_instruct", metadata={"help": "Where the finished stage output goes."})
    model_name_or_path: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": f"The generator: '{DEFAULT_MODEL}' (embedded), 'tiny-llama', a local model directory or a "
                  "hub id."},
    )
    adapter: str | None = field(default=None, metadata={"help": "A LoRA adapter on the generator (an `align sft` "
                                                                "output directory)."})
    precision: str = field(default="auto", metadata={"help": PRECISION_HELP})
    prompt_mode: str = field(
        default="completion",
        metadata={"help": "'completion' (raw text continuation, for base models), 'chat' (the chat template, for "
                  "instruct models) or 'auto' (chat when the tokenizer has a template)."},
    )
    embedding_filter: bool = field(
        default=False, metadata={"help": "Also discard paraphrases by embedding cosine similarity (faiss)."}
    )
    embedding_model: str = field(
        default=DEFAULT_EMBEDDING_MODEL, metadata={"help": "sentence-transformers model of the embedding filter."}
    )
    embedding_threshold: float = field(
        default=DEFAULT_EMBEDDING_THRESHOLD, metadata={"help": "Cosine similarity above which a paraphrase is dropped."}
    )
    include_seed_tasks: bool = field(
        default=True, metadata={"help": "Put the seed tasks' instances in the output dataset (origin 'seed')."}
    )


CONFIG_CLASSES = (SelfInstructArguments, SelfInstructSettings)
# Checked by `parse_config` with the shared rules of `align.core.options`, before any work.
OPTION_RULES = {
    "prompt_mode": Choice(PROMPT_MODES), "num_instructions": AT_LEAST_ONE, "max_rounds": AT_LEAST_ONE,
    "prompts_per_round": AT_LEAST_ONE, "seed_examples_per_prompt": AT_LEAST_ONE,
    "generated_examples_per_prompt": NON_NEGATIVE, "new_instructions_per_prompt": AT_LEAST_ONE,
    "instances_per_task": AT_LEAST_ONE, "instance_temperature": NON_NEGATIVE,
    "instance_top_p": PROBABILITY_MASS, "instance_max_new_tokens": AT_LEAST_ONE, "min_words": NON_NEGATIVE,
    "rouge_threshold": Range(0, 1), "embedding_threshold": Range(-1, 1),
}


# ----------------------------------------------------------------------------- the stage


def option_problems(args: SelfInstructArguments, settings: SelfInstructSettings) -> list[str]:
    """What the option ranges (`OPTION_RULES`) cannot say: which options go together."""
    problems = precision_problems(args.precision)
    if settings.max_words <= settings.min_words:
        problems.append(f"--max_words must be > --min_words (got {settings.max_words} <= {settings.min_words})")
    return problems


def run_config(args: SelfInstructArguments, settings: SelfInstructSettings) -> dict:
    """What the manifest records and a resumed run must match: every option except what to do with existing
    directories (one group, as the options are one list on the command line)."""
    return run_identity({"data": {**dataclasses.asdict(args), **dataclasses.asdict(settings)}})


def main(argv: list[str] | None = None) -> Path:
    args, settings = parse_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()
    seeds = load_seed_tasks(args.seed_tasks, STAGE)
    config = run_config(args, settings)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()

    model_path = resolve_model(args.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    mode = args.prompt_mode if args.prompt_mode != "auto" else ("chat" if tokenizer.chat_template else "completion")
    if mode == "chat" and not tokenizer.chat_template:
        raise StageError(STAGE, f"{args.model_name_or_path} has no chat template — use --prompt_mode completion")
    if args.adapter:
        require_adapter(args.adapter, STAGE)
    embedding = None
    if args.embedding_filter:
        embedding = EmbeddingFilter.from_model(resolve_embedding_model(args.embedding_model, STAGE),
                                               args.embedding_threshold)
    device = pick_device()
    precision = stage_precision(args.precision, device, STAGE)
    model = load_for_inference(model_path, precision, [args.adapter] if args.adapter else [], device, STAGE)

    partial = output.open()
    journal = partial / "journal.jsonl"
    loop = SelfInstruct(settings, seeds, LocalModel(model, tokenizer, settings.batch_size), Prompts(mode), embedding)
    resumed = loop.replay(journal)
    if resumed:
        logger.info("resuming: %d steps (%d tasks accepted) already in %s", resumed, len(loop.accepted), journal)
    loop.run(journal)
    if not loop.accepted:
        logger.warning("no generated task was accepted in %d rounds — see the reasons in the manifest; a larger "
                       "model or more rounds may help", loop.round)

    data, discarded = build_datasets(seeds, loop.accepted, loop.discarded, args.include_seed_tasks)
    save_dataset_atomic(data, partial / "dataset")
    save_dataset_atomic(discarded, partial / "discarded")
    base_model = {"name_or_path": args.model_name_or_path, "resolved": model_path, "adapter": args.adapter}
    inputs = {"seed_tasks": args.seed_tasks, **({"adapter": args.adapter} if args.adapter else {})}
    manifest = base_manifest(STAGE, config, inputs, base_model, started)
    manifest["outputs"] = {"dataset": "dataset", "discarded": "discarded", "journal": "journal.jsonl"}
    manifest["metrics"] = run_metrics(loop, data, mode, resumed)
    manifest["finished"] = now_iso()
    final = output.publish(manifest, keep=["dataset", "discarded", "journal.jsonl"])
    logger.info("%d new tasks (%d instances) from %d seed tasks in %d rounds -> %s", len(loop.accepted),
                sum(len(t.instances) for t in loop.accepted), len(seeds), loop.round, final / "dataset")
    return final


def run_metrics(loop: SelfInstruct, data: DatasetDict, mode: str, resumed_steps: int) -> dict[str, Any]:
    counts = loop.counts
    instruction_reasons = {k: v for k, v in counts.items()
                           if k not in ("accepted", "prompts") and not k.startswith("instance_")}
    candidates = counts["accepted"] + sum(instruction_reasons.values())
    return {
        "prompt_mode": mode,
        "classification_threshold": round(loop.classification_threshold(), 4),
        "seed_tasks": len(loop.seeds),
        "generated_tasks": len(loop.accepted),
        "generated_instances": sum(len(t.instances) for t in loop.accepted),
        "classification_tasks": sum(t.is_classification for t in loop.accepted),
        "rows": len(data["train"]),
        "rounds": math.ceil(loop.step / loop.steps_per_round),
        "steps": loop.step,
        "prompts": counts["prompts"],
        "candidates": candidates,
        "acceptance_rate": round(counts["accepted"] / candidates, 4) if candidates else 0.0,
        "discarded_instructions": dict(sorted(instruction_reasons.items())),
        "discarded_instances": dict(sorted((k.removeprefix("instance_"), v) for k, v in counts.items()
                                           if k.startswith("instance_"))),
        "resumed_steps": resumed_steps,
    }


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
