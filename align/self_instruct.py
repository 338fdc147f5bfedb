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
   (ROUGE-L F1 > 0.7 against any instruction in the pool, seeds included — `align.dedup.RougeLFilter`,
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
import json
import logging
import math
import os
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from datasets import Dataset, DatasetDict

from align.common import (
    StageError,
    StageOutput,
    base_manifest,
    now_iso,
    parse_config,
    parse_json_lines,
    read_text,
    run_stage,
    save_dataset_atomic,
)
from align.dedup import DEFAULT_EMBEDDING_THRESHOLD, DEFAULT_THRESHOLD, EmbeddingFilter, RougeLFilter
from align.generation import Generation, GenerationSettings
from align.models import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL

STAGE = "self-instruct"
PROMPT_MODES = ("auto", "chat", "completion")
# Requests a text-only model cannot act on (the paper's list).
BLOCKED_KEYWORDS = ("image", "picture", "graph", "file", "map", "draw", "plot", "go to")
logger = logging.getLogger("align")


@dataclass
class SelfInstructArguments:
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
    dtype: str = field(default="auto", metadata={"help": "Weights dtype ('auto', 'float32', 'bfloat16')."})
    prompt_mode: str = field(
        default="completion",
        metadata={"help": "'completion' (raw text continuation, for base models), 'chat' (the chat template, for "
                  "instruct models) or 'auto' (chat when the tokenizer has a template)."},
    )
    num_instructions: int = field(default=100, metadata={"help": "Stop once this many new tasks are accepted."})
    max_rounds: int = field(default=20, metadata={"help": "Stop after this many rounds even if short of the target."})
    prompts_per_round: int = field(default=16, metadata={"help": "Instruction-generation prompts per round."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (and per journaled step)."})
    seed_examples_per_prompt: int = field(default=6, metadata={"help": "Human seed instructions shown per prompt."})
    generated_examples_per_prompt: int = field(
        default=2, metadata={"help": "Generated instructions shown per prompt (seeds fill in while fewer exist)."}
    )
    new_instructions_per_prompt: int = field(
        default=8, metadata={"help": "Most new instructions taken from one reply."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Instruction sampling temperature (> 0)."})
    top_p: float = field(default=0.9, metadata={"help": "Instruction nucleus sampling mass (0 < p <= 1)."})
    max_new_tokens: int = field(default=160, metadata={"help": "Longest instruction-generation reply."})
    instances_per_task: int = field(default=2, metadata={"help": "Instances sampled per new task."})
    instance_temperature: float = field(
        default=0.7, metadata={"help": "Instance sampling temperature (0 = greedy, then one instance per task)."}
    )
    instance_top_p: float = field(default=0.9, metadata={"help": "Instance nucleus sampling mass."})
    instance_max_new_tokens: int = field(default=128, metadata={"help": "Longest instance reply."})
    min_words: int = field(default=3, metadata={"help": "Discard instructions of this many words or fewer."})
    max_words: int = field(default=150, metadata={"help": "Discard instructions of more words than this."})
    blocked_keywords: list[str] = field(
        default_factory=lambda: list(BLOCKED_KEYWORDS),
        metadata={"help": "Discard instructions containing any of these words (plural too)."},
    )
    rouge_threshold: float = field(
        default=DEFAULT_THRESHOLD,
        metadata={"help": "Discard instructions whose ROUGE-L F1 with a pool member is above this."},
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
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing finished output_dir."})
    restart: bool = field(
        default=False, metadata={"help": "Discard an unfinished run in <output_dir>.partial instead of resuming it."}
    )
    seed: int = field(default=42, metadata={"help": "Seed for example sampling and generation."})


CONFIG_CLASSES = (SelfInstructArguments,)


# ----------------------------------------------------------------------------- seed tasks


@dataclass
class Task:
    instruction: str
    instances: list[tuple[str, str]]  # (input, output); input "" when the task needs none
    is_classification: bool
    task_id: str
    round: int = 0  # 0 for seeds


def load_seed_tasks(path: str | os.PathLike) -> list[Task]:
    """Read and check a seed-task file; the first problem is a StageError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise StageError(STAGE, f"seed task file {path} not found — pass --seed_tasks, e.g. data/seed/seed_tasks.jsonl")
    tasks = []
    for number, record in parse_json_lines(read_text(path, STAGE), path, STAGE):
        where = f"{path} line {number}"
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise StageError(STAGE, f"{where}: missing or empty 'instruction' — every seed task needs one")
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances:
            raise StageError(STAGE, f"{where}: 'instances' must be a non-empty list of {{input, output}} objects")
        pairs = []
        for position, instance in enumerate(instances, start=1):
            if not isinstance(instance, dict) or not isinstance(instance.get("output"), str):
                raise StageError(STAGE, f"{where}: instance {position} has no 'output' string — give every instance "
                                 "an output (and an input, \"\" when the task needs none)")
            value = instance.get("input", "")
            if not isinstance(value, str):
                raise StageError(STAGE, f"{where}: instance {position} 'input' must be a string")
            pairs.append((value.strip(), instance["output"].strip()))
        is_classification = record.get("is_classification", False)
        if not isinstance(is_classification, bool):
            raise StageError(STAGE, f"{where}: 'is_classification' must be true or false")
        tasks.append(Task(instruction.strip(), pairs, is_classification, str(record.get("id", f"seed_{number}"))))
    if not tasks:
        raise StageError(STAGE, f"{path} has no seed tasks — the pool needs at least one (the paper used 175)")
    return tasks


# ----------------------------------------------------------------------------- prompts (written by the team)

INSTRUCTION_HEADER = ("Below is a list of tasks that people give to a helpful assistant. Each task is one instruction. "
                      "The tasks differ in topic and in kind: questions, rewriting, classification, brainstorming, "
                      "math, coding, advice, explanation.")
CLASSIFICATION_HEADER = ("For each task, decide whether its answer is always one of a small fixed set of labels, "
                         "such as yes/no, true/false, positive/negative or one category from a given list. "
                         "Answer Yes or No.")
# (instruction, has a fixed label set) — written for this prompt, not taken from any seed file.
CLASSIFICATION_EXAMPLES = (
    ("Classify the sentiment of the review as positive, negative, or neutral.", True),
    ("Write a short story about a dog that gets lost in a city.", False),
    ("Is the following statement true or false?", True),
    ("Summarize the paragraph in two sentences.", False),
    ("Decide whether the email is spam or not spam.", True),
    ("Give three tips for sleeping better.", False),
    ("Tell which of the four seasons the description fits best.", True),
    ("Translate the sentence into French.", False),
    ("Find the largest number in the list.", False),
    ("Does the sentence contain a grammatical error?", True),
)
INPUT_FIRST_HEADER = ("Each task below is followed by one example: the input it is applied to (None when the task "
                      "needs no input) and a correct output.")
OUTPUT_FIRST_HEADER = ("Each task below has a small set of possible answers (class labels). Each example gives a label "
                       "first, then an input that has that label.")
NO_INPUT = "None"
EMPTY_INPUTS = {"", "none", "n/a", "na", "<noinput>", "no input", "-", "(none)", "null", "nothing", "<input>", "<none>"}


class Prompts:
    """The text (completion mode) or chat messages (chat mode) of every prompt the stage sends."""

    def __init__(self, mode: str):
        if mode not in ("chat", "completion"):
            raise ValueError(f"prompt mode must be chat or completion, got {mode!r}")
        self.mode = mode

    def instructions(self, examples: Sequence[str], new: int) -> str | list[dict]:
        listed = "\n".join(f"Task {i}: {text}" for i, text in enumerate(examples, start=1))
        following = len(examples) + 1
        if self.mode == "completion":
            return f"{INSTRUCTION_HEADER}\n\n{listed}\nTask {following}:"
        request = (f"{INSTRUCTION_HEADER}\n\n{listed}\n\nWrite {new} new tasks, different from these and from each "
                   f"other. Number them from Task {following}, one instruction per line, and do not answer them.")
        return [{"role": "user", "content": request}]

    def instruction_stop(self, examples: int, new: int) -> tuple[str, ...]:
        # Completion mode ends the list at a blank line or after `new` items; a chat reply ends at EOS.
        return ("\n\n", f"Task {examples + new + 1}:") if self.mode == "completion" else ()

    def classification(self, instruction: str) -> str | list[dict]:
        shots = "\n\n".join(f"Task: {text}\nFixed labels: {'Yes' if label else 'No'}"
                            for text, label in CLASSIFICATION_EXAMPLES)
        if self.mode == "completion":
            return f"{CLASSIFICATION_HEADER}\n\n{shots}\n\nTask: {instruction}\nFixed labels:"
        question = f"{CLASSIFICATION_HEADER}\n\n{shots}\n\nTask: {instruction}\nFixed labels?"
        return [{"role": "user", "content": question}]

    def classification_options(self) -> tuple[str, str]:
        return (" Yes", " No") if self.mode == "completion" else ("Yes", "No")

    def instance(self, instruction: str, output_first: bool, demos: Sequence[Task]) -> str | list[dict]:
        """Input-first (ordinary) or output-first (classification) instance prompt with seed demonstrations."""
        if self.mode == "completion":
            header = OUTPUT_FIRST_HEADER if output_first else INPUT_FIRST_HEADER
            blocks = [f"Task: {task.instruction}\n{self._answer(task.instances[0], output_first)}" for task in demos]
            opening = "Class label:" if output_first else "Input:"
            return "\n\n".join([header, *blocks, f"Task: {instruction}\n{opening}"])
        messages = []
        for task in demos:
            messages += [{"role": "user", "content": self._request(task.instruction, output_first)},
                         {"role": "assistant", "content": self._answer(task.instances[0], output_first)}]
        return messages + [{"role": "user", "content": self._request(instruction, output_first)}]

    def instance_stop(self) -> tuple[str, ...]:
        # A blank line ends an example in completion mode (the prompt separates examples with one); a small
        # model otherwise rambles on to max_new_tokens and the instance is lost as truncated.
        return ("\n\n", "\nTask:") if self.mode == "completion" else ()

    def instance_prefix(self, output_first: bool) -> str:
        """What the completion prompt already wrote of the reply (put back before parsing)."""
        if self.mode == "chat":
            return ""
        return "Class label:" if output_first else "Input:"

    @staticmethod
    def _request(instruction: str, output_first: bool) -> str:
        if output_first:
            return (f"Task: {instruction}\n\nThe answer to this task is one of a few class labels. Pick one label, "
                    "then write an input that has that label. Answer exactly in this form:\nClass label: <label>\n"
                    "Input: <input>")
        return (f"Task: {instruction}\n\nGive one example of this task: the input it is applied to (None if it needs "
                "no input) and a correct output. Answer exactly in this form:\nInput: <input>\nOutput: <output>")

    @staticmethod
    def _answer(instance: tuple[str, str], output_first: bool) -> str:
        task_input, output = instance
        if output_first:
            return f"Class label: {output}\nInput: {task_input or NO_INPUT}"
        return f"Input: {task_input or NO_INPUT}\nOutput: {output}"


# ----------------------------------------------------------------------------- parsing

# The start of a list item: "Task 9:", "Instruction 3.", "9.", "9)", "- ", "* ", "• ".
_ITEM_START = re.compile(r"^\s*(?:(?:task|instruction)\s*#?\s*\d+\s*[:.)-]|\d+\s*[.):]|[-*•](?=\s))\s*", re.I)
_LABEL = re.compile(r"^(?:task|instruction|new task)\s*:\s*", re.I)


def parse_instructions(text: str, truncated: bool, limit: int | None = None) -> tuple[list[str], str | None]:
    """Instructions in a generated list, leniently.

    Items start with "Task N:", "N.", "N)" or a bullet; a line without a marker continues the current item
    unless a blank line closed it (so a preamble or a sign-off is ignored). Markdown bold and quotes around an
    item are removed, and whitespace is collapsed.

    Args:
        text: The reply; in completion mode, the reply with the prompt's last "Task N:" put back in front.
        truncated: The generation ran out of tokens, so its last item may be cut off.
        limit: Keep at most this many items (None: all).

    Returns:
        (items, dropped): the complete items in order, and the last item when `truncated` dropped it, else None.
    """
    items: list[list[str]] = []
    open_item = False
    for line in text.splitlines():
        if not line.strip():
            open_item = False
            continue
        marker = _ITEM_START.match(line)
        if marker:
            items.append([line[marker.end():]])
            open_item = True
        elif open_item:
            items[-1].append(line)
    cleaned = [_clean_item(" ".join(parts)) for parts in items]
    dropped = None
    if truncated and cleaned:
        dropped = cleaned.pop()
    cleaned = [item for item in cleaned if item]
    return (cleaned if limit is None else cleaned[:limit]), dropped


def _clean_item(text: str) -> str:
    text = " ".join(text.split())
    text = _LABEL.sub("", text)
    for wrapper in ("**", '"', "'", "`"):
        if len(text) > 2 * len(wrapper) and text.startswith(wrapper) and text.endswith(wrapper):
            text = text[len(wrapper):-len(wrapper)].strip()
    return text.replace("**", "").strip()


_INPUT = re.compile(r"^\s*input\s*:[ \t]*", re.I | re.M)
_OUTPUT = re.compile(r"^\s*output\s*:[ \t]*", re.I | re.M)
_LABEL_LINE = re.compile(r"^\s*(?:class\s*label|label)\s*:[ \t]*", re.I | re.M)
# A second example or a next task starting inside the reply: everything from there on is dropped.
_NEXT_BLOCK = re.compile(r"\n\s*(?:input|output|task|example\s*\d*|class\s*label|label)\s*:", re.I)


def parse_instance(text: str, output_first: bool) -> tuple[str, str] | None:
    """(input, output) from an instance reply, or None when it lacks the labelled parts.

    Input-first replies read "Input: ...\\nOutput: ..."; output-first ones "Class label: ...\\nInput: ...".
    An input written as None / N/A / <noinput> becomes "". Text after the first example is ignored.
    """
    first, second = (_LABEL_LINE, _INPUT) if output_first else (_INPUT, _OUTPUT)
    start = first.search(text)
    if start is None:
        return None
    middle = second.search(text, start.end())
    if middle is None:
        return None
    head = text[start.end():middle.start()].strip()
    tail = text[middle.end():]
    following = _NEXT_BLOCK.search(tail)
    tail = (tail[:following.start()] if following else tail).strip()
    if output_first:
        label, task_input = head.splitlines()[0].strip() if head else "", tail
        return _normal_input(task_input), label
    return _normal_input(head), tail


def _normal_input(text: str) -> str:
    return "" if text.strip().strip(".").lower() in EMPTY_INPUTS else text.strip()


# ----------------------------------------------------------------------------- filters


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def keyword_pattern(keywords: Sequence[str]) -> re.Pattern | None:
    """Whole-word, case-insensitive match of any keyword or its plural."""
    words = [k.strip() for k in keywords if k.strip()]
    if not words:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")s?\b", re.I)


def instruction_problem(text: str, min_words: int, max_words: int,
                        keywords: re.Pattern | None) -> tuple[str, str] | None:
    """(reason, detail) when an instruction fails a text filter, else None (ROUGE-L and duplicates aside)."""
    words = len(text.split())
    if words <= min_words:
        return "too_short", f"{words} words"
    if words > max_words:
        return "too_long", f"{words} words"
    found = keywords.search(text) if keywords else None
    if found:
        return "blocked_keyword", found.group(0).lower()
    if text[0] in string.punctuation:
        return "starts_with_punctuation", text[0]
    if not text[0].isascii():
        return "starts_non_ascii", text[0]
    return None


def filter_instances(parsed: Sequence[tuple[Generation, tuple[str, str] | None]]
                     ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Keep the sound instances of one task: (kept (input, output), discarded (input, output, reason)).

    Per instance: `unparseable`, `truncated` (ran out of tokens), `empty_output`, `input_equals_output`;
    then `duplicate_instance` (a repeat of a kept one), `extra_no_input` (a task that takes no input needs one
    example: its first is kept, later ones with other outputs are dropped — open-ended tasks have many right
    answers, so they are not conflicts) and `conflicting_outputs` (one non-empty input with different outputs:
    none of them is trusted).
    """
    kept: list[tuple[str, str]] = []
    discarded: list[tuple[str, str, str]] = []
    for generation, instance in parsed:
        if instance is None:
            discarded.append(("", generation.text, "unparseable"))
            continue
        task_input, output = instance
        if generation.truncated:
            reason = "truncated"
        elif not output.strip():
            reason = "empty_output"
        elif task_input and _normal(task_input) == _normal(output):
            reason = "input_equals_output"
        elif any(_normal(task_input) == _normal(i) and _normal(output) == _normal(o) for i, o in kept):
            reason = "duplicate_instance"
        elif not task_input and any(not i for i, _ in kept):
            reason = "extra_no_input"
        else:
            kept.append(instance)
            continue
        discarded.append((task_input, output, reason))
    outputs_by_input: dict[str, set[str]] = {}
    for task_input, output in kept:
        outputs_by_input.setdefault(_normal(task_input), set()).add(_normal(output))
    conflicting = {key for key, outputs in outputs_by_input.items() if len(outputs) > 1}
    discarded += [(i, o, "conflicting_outputs") for i, o in kept if _normal(i) in conflicting]
    return [(i, o) for i, o in kept if _normal(i) not in conflicting], discarded


# ----------------------------------------------------------------------------- the generator


class Generator(Protocol):
    """What the loop needs from a model; `LocalModel` is the real one."""

    def generate(self, prompts: Sequence[str | list[dict]], settings: GenerationSettings, num_return_sequences: int,
                 seed: int) -> list[list[Generation]]: ...

    def score(self, prompts: Sequence[str | list[dict]], options: Sequence[str]) -> list[list[float]]: ...


class LocalModel:
    """A local causal LM behind `align.generation`, in batches of `batch_size` prompts."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def _text(self, prompt: str | list[dict]) -> str:
        from align.generation import render_chat

        return prompt if isinstance(prompt, str) else render_chat(self.tokenizer, prompt)

    def generate(self, prompts, settings, num_return_sequences, seed):
        from transformers import set_seed

        from align.generation import generate

        set_seed(seed)  # the same step samples the same text when it is re-run
        texts = [self._text(p) for p in prompts]
        results: list[list[Generation]] = []
        for start in range(0, len(texts), self.batch_size):
            results += generate(self.model, self.tokenizer, texts[start:start + self.batch_size], settings,
                                num_return_sequences)
        return results

    def score(self, prompts, options):
        from align.generation import score_options

        texts = [self._text(p) for p in prompts]
        scores: list[list[float]] = []
        for start in range(0, len(texts), self.batch_size):
            scores += score_options(self.model, self.tokenizer, texts[start:start + self.batch_size], options)
        return scores


# ----------------------------------------------------------------------------- the loop


class SelfInstruct:
    """The bootstrapping loop: state (pool, accepted tasks, discards) rebuilt from a journal, then steps.

    One step = `batch_size` instruction prompts (fewer at the end of a round) and everything that follows
    from them; it is journaled as one JSON line when complete.
    """

    def __init__(self, args: SelfInstructArguments, seeds: list[Task], generator: Generator, prompts: Prompts,
                 embedding_filter: EmbeddingFilter | None = None):
        self.args, self.seeds, self.generator, self.prompts = args, seeds, generator, prompts
        self.rouge = RougeLFilter(args.rouge_threshold)
        self.rouge.add_pool(task.instruction for task in seeds)
        self.embedding = embedding_filter
        if embedding_filter is not None:
            embedding_filter.add_pool(task.instruction for task in seeds)
        self.known = {_normal(task.instruction) for task in seeds}
        self.keywords = keyword_pattern(args.blocked_keywords)
        self.accepted: list[Task] = []
        self.discarded: list[dict] = []  # rows of the `discarded` dataset
        self.counts: Counter = Counter()
        self.step = 0
        self.threshold: float | None = None  # see classification_threshold
        self.phase = ""  # what the current step is doing, for the progress bar
        self._progress = None
        self.steps_per_round = math.ceil(args.prompts_per_round / args.batch_size)
        demos = [task for task in seeds if task.instances]
        self.demos = {kind: [t for t in demos if t.is_classification == kind] or demos for kind in (False, True)}

    # --- progress

    @property
    def round(self) -> int:
        return self.step // self.steps_per_round

    def finished(self) -> bool:
        return len(self.accepted) >= self.args.num_instructions or self.round >= self.args.max_rounds

    # --- journal

    def replay(self, journal: Path) -> int:
        """Rebuild the state from the complete steps in `journal`; drops a torn last line. Returns steps replayed."""
        if not journal.exists():
            return 0
        kept = []
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record["step"] != self.step:
                    break
                self._apply(record)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                break  # a line torn by a kill: this step and anything after it run again
            kept.append(line)
        journal.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        return len(kept)

    def _apply(self, record: dict) -> None:
        """Add one journaled step's outcome to the state (also used for freshly run steps)."""
        step_round = record["round"]
        for candidate in record["candidates"]:
            instruction = candidate["instruction"]
            if candidate["in_pool"]:
                self.rouge.add_pool([instruction])
                if self.embedding is not None:
                    self.embedding.add_pool([instruction])
                self.known.add(_normal(instruction))
            is_classification = bool(candidate.get("is_classification"))
            for task_input, output, reason in candidate.get("discarded_instances", []):
                self.counts[f"instance_{reason}"] += 1
                self.discarded.append({"kind": "instance", "instruction": instruction, "input": task_input,
                                       "output": output, "is_classification": is_classification,
                                       "round": step_round + 1, "reason": reason, "detail": ""})
            if candidate["reason"] is None:
                instances = [(i, o) for i, o in candidate["instances"]]
                self.accepted.append(Task(instruction, instances, is_classification,
                                          f"generated_{len(self.accepted)}", step_round + 1))
                self.counts["accepted"] += 1
            else:
                self.counts[candidate["reason"]] += 1
                self.discarded.append({"kind": "instruction", "instruction": instruction, "input": "", "output": "",
                                       "is_classification": is_classification, "round": step_round + 1,
                                       "reason": candidate["reason"], "detail": candidate.get("detail", "")})
        self.counts["prompts"] += record["prompts"]
        self.step += 1

    # --- one step

    def run_step(self) -> dict:
        """Generate, filter, classify and instantiate one batch of prompts; returns the journal record."""
        args = self.args
        in_round = self.step % self.steps_per_round
        prompts_now = min(args.batch_size, args.prompts_per_round - in_round * args.batch_size)
        rng = random.Random(f"{args.seed}:{self.step}")
        base_seed = args.seed * 1_000_003 + self.step * 4
        examples = [self._examples(rng) for _ in range(prompts_now)]
        requests = [self.prompts.instructions(shown, args.new_instructions_per_prompt) for shown in examples]
        settings = GenerationSettings(args.temperature, args.top_p, args.max_new_tokens,
                                      self.prompts.instruction_stop(len(examples[0]), args.new_instructions_per_prompt))
        self._show(f"instructions ({prompts_now} prompts)")
        replies = [group[0] for group in self.generator.generate(requests, settings, 1, base_seed)]

        candidates: list[dict] = []
        for shown, reply in zip(examples, replies, strict=True):
            text = f"Task {len(shown) + 1}: {reply.text}" if self.prompts.mode == "completion" else reply.text
            items, dropped = parse_instructions(text, reply.truncated, args.new_instructions_per_prompt)
            candidates += [self._screen(item) for item in items]
            if dropped:
                candidates.append(_candidate(dropped, "truncated", "cut off at max_new_tokens"))
        survivors = [c for c in candidates if c["reason"] is None]
        if survivors:
            self._classify(survivors)
            self._instantiate(survivors, rng, base_seed + 1)
        return {"step": self.step, "round": self.round, "prompts": prompts_now, "candidates": candidates}

    def _examples(self, rng: random.Random) -> list[str]:
        args = self.args
        machine = rng.sample(self.accepted, min(args.generated_examples_per_prompt, len(self.accepted)))
        wanted = args.seed_examples_per_prompt + args.generated_examples_per_prompt - len(machine)
        human = rng.sample(self.seeds, min(wanted, len(self.seeds)))
        shown = [task.instruction for task in human + machine]
        rng.shuffle(shown)
        return shown

    def _screen(self, instruction: str) -> dict:
        """Text filters, then exact and near duplicates against the pool; a survivor joins the pool now."""
        problem = instruction_problem(instruction, self.args.min_words, self.args.max_words, self.keywords)
        if problem:
            return _candidate(instruction, *problem)
        if _normal(instruction) in self.known:
            return _candidate(instruction, "duplicate", "")
        if self.rouge.is_near_duplicate(instruction):
            score, member = self.rouge.max_similarity(instruction)
            return _candidate(instruction, "similar_rouge", f"ROUGE-L {score:.3f} with: {member}")
        if self.embedding is not None and not self.embedding.add(instruction):
            score, member = self.embedding.max_similarity(instruction)
            return _candidate(instruction, "similar_embedding", f"cosine {score:.3f} with: {member}")
        self.rouge.add_pool([instruction])
        self.known.add(_normal(instruction))
        return _candidate(instruction, None, "", in_pool=True)

    def _yes_margins(self, instructions: Sequence[str]) -> list[float]:
        """log P(Yes) - log P(No) after the classification prompt, per instruction."""
        scores = self.generator.score([self.prompts.classification(text) for text in instructions],
                                      self.prompts.classification_options())
        return [yes - no for yes, no in scores]

    def classification_threshold(self) -> float:
        """The Yes-No margin above which a task counts as classification, calibrated on the prompt's own examples.

        Small models lean towards one answer whatever the task (SmolLM2-135M says "No" to nearly everything),
        so the raw argmax would almost never pick output-first. The midpoint between the mean margins of the
        prompt's Yes examples and No examples corrects that bias (cf. contextual calibration, Zhao et al. 2021):
        on 205 labelled seed instructions it raised the share of tasks called classification from 1.5% to 19%
        (truly 18%), see `scripts/bench_self_instruct.py`. Computed once per run; deterministic.
        """
        if self.threshold is None:
            margins = self._yes_margins([text for text, _ in CLASSIFICATION_EXAMPLES])
            yes = [m for m, (_, label) in zip(margins, CLASSIFICATION_EXAMPLES, strict=True) if label]
            no = [m for m, (_, label) in zip(margins, CLASSIFICATION_EXAMPLES, strict=True) if not label]
            self.threshold = (sum(yes) / len(yes) + sum(no) / len(no)) / 2
        return self.threshold

    def _classify(self, survivors: list[dict]) -> None:
        self._show(f"classifying {len(survivors)}")
        threshold = self.classification_threshold()
        margins = self._yes_margins([c["instruction"] for c in survivors])
        for candidate, margin in zip(survivors, margins, strict=True):
            candidate["is_classification"] = margin > threshold

    def _instantiate(self, survivors: list[dict], rng: random.Random, seed: int) -> None:
        args = self.args
        k = 1 if args.instance_temperature <= 0 else args.instances_per_task
        settings = GenerationSettings(args.instance_temperature, args.instance_top_p, args.instance_max_new_tokens,
                                      self.prompts.instance_stop())
        requests = []
        for candidate in survivors:
            kind = candidate["is_classification"]
            demos = rng.sample(self.demos[kind], min(2, len(self.demos[kind])))
            requests.append(self.prompts.instance(candidate["instruction"], kind, demos))
        groups: list[list[Generation]] = []
        for start in range(0, len(requests), args.batch_size):  # in batches, so the progress bar moves
            self._show(f"instances {start}/{len(requests)} tasks")
            groups += self.generator.generate(requests[start:start + args.batch_size], settings, k, seed + start)
        for candidate, group in zip(survivors, groups, strict=True):
            prefix = self.prompts.instance_prefix(candidate["is_classification"])
            parsed = [(g, parse_instance(f"{prefix} {g.text}" if prefix else g.text, candidate["is_classification"]))
                      for g in group]
            kept, discarded = filter_instances(parsed)
            candidate["instances"] = kept
            candidate["discarded_instances"] = discarded
            if not kept:
                candidate["reason"] = "no_valid_instances"
                candidate["detail"] = ", ".join(sorted({reason for _, _, reason in discarded}))

    # --- the whole run

    def run(self, journal: Path) -> None:
        """Steps until done, each journaled (fsync) before the next starts, with a progress bar."""
        from tqdm import tqdm

        with open(journal, "a", encoding="utf-8") as handle, \
                tqdm(total=self.args.num_instructions, initial=min(len(self.accepted), self.args.num_instructions),
                     desc="self-instruct", unit="task") as progress:
            self._progress = progress
            progress.set_postfix(self._postfix())
            while not self.finished():
                before = len(self.accepted)
                record = self.run_step()
                handle.write(json.dumps(record) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
                self._apply(record)
                progress.update(min(len(self.accepted), self.args.num_instructions) - min(before,
                                                                                          self.args.num_instructions))
                progress.set_postfix(self._postfix())

        self._progress = None

    def _postfix(self) -> dict:
        discarded = sum(1 for row in self.discarded if row["kind"] == "instruction")
        return {"round": self.round, "accepted": len(self.accepted), "discarded": discarded, "now": self.phase}

    def _show(self, phase: str) -> None:
        self.phase = phase
        if self._progress is not None:
            self._progress.set_postfix(self._postfix())


def _candidate(instruction: str, reason: str | None, detail: str, in_pool: bool = False) -> dict:
    return {"instruction": instruction, "reason": reason, "detail": detail, "in_pool": in_pool,
            "is_classification": None, "instances": [], "discarded_instances": []}


# ----------------------------------------------------------------------------- datasets


def user_turn(instruction: str, task_input: str) -> str:
    """The user message of an instance: the instruction, then its input after a blank line (if any)."""
    return f"{instruction}\n\n{task_input}" if task_input else instruction


def task_rows(tasks: Sequence[Task], origin: str) -> list[dict]:
    rows = []
    for task in tasks:
        for task_input, output in task.instances:
            user = {"role": "user", "content": user_turn(task.instruction, task_input)}
            rows.append({"instruction": task.instruction, "input": task_input, "output": output,
                         "is_classification": task.is_classification, "origin": origin, "round": task.round,
                         "task_id": task.task_id, "messages": [user, {"role": "assistant", "content": output}],
                         "prompt": [user]})
    return rows


def build_datasets(seeds: Sequence[Task], accepted: Sequence[Task], discarded: Sequence[dict],
                   include_seeds: bool) -> tuple[DatasetDict, DatasetDict]:
    """(dataset with split `train`, discarded with split `discarded`), typed even when empty."""
    from datasets import Features, List, Value

    turn = {"role": Value("string"), "content": Value("string")}
    features = Features({
        "instruction": Value("string"), "input": Value("string"), "output": Value("string"),
        "is_classification": Value("bool"), "origin": Value("string"), "round": Value("int64"),
        "task_id": Value("string"), "messages": List(turn), "prompt": List(turn),
    })
    rows = (task_rows(seeds, "seed") if include_seeds else []) + task_rows(accepted, "generated")
    discarded_features = Features({
        "kind": Value("string"), "instruction": Value("string"), "input": Value("string"), "output": Value("string"),
        "is_classification": Value("bool"), "round": Value("int64"), "reason": Value("string"),
        "detail": Value("string"),
    })

    def table(records, schema):
        return Dataset.from_dict({column: [r[column] for r in records] for column in schema}, features=schema)

    return (DatasetDict({"train": table(rows, features)}),
            DatasetDict({"discarded": table(discarded, discarded_features)}))


# ----------------------------------------------------------------------------- the stage


def check_arguments(args: SelfInstructArguments) -> None:
    """Report every invalid option at once."""
    problems = []
    if args.prompt_mode not in PROMPT_MODES:
        problems.append(f"--prompt_mode {args.prompt_mode!r} is not one of {', '.join(PROMPT_MODES)}")
    positive = ("num_instructions", "max_rounds", "prompts_per_round", "batch_size", "new_instructions_per_prompt",
                "max_new_tokens", "instances_per_task", "instance_max_new_tokens")
    problems += [f"--{name} must be >= 1" for name in positive if getattr(args, name) < 1]
    if args.seed_examples_per_prompt < 1 or args.generated_examples_per_prompt < 0:
        problems.append("--seed_examples_per_prompt must be >= 1 and --generated_examples_per_prompt >= 0")
    if args.temperature <= 0 or not 0 < args.top_p <= 1 or not 0 < args.instance_top_p <= 1:
        problems.append("--temperature must be > 0 and --top_p / --instance_top_p in (0, 1]")
    if args.instance_temperature < 0:
        problems.append("--instance_temperature must be >= 0 (0 = greedy)")
    if args.min_words < 0 or args.max_words <= args.min_words:
        problems.append("--min_words must be >= 0 and --max_words > --min_words")
    if not 0 <= args.rouge_threshold <= 1 or not -1 <= args.embedding_threshold <= 1:
        problems.append("--rouge_threshold must be in [0, 1] and --embedding_threshold in [-1, 1]")
    if problems:
        raise StageError(STAGE, "; ".join(problems) + " — see `align self-instruct --help`")


def run_config(args: SelfInstructArguments) -> dict:
    """What the manifest records and a resumed run must match: every option except what to do with existing
    directories."""
    config = {"data": dataclasses.asdict(args)}
    config["data"].pop("restart")
    config["data"].pop("overwrite_output_dir")
    return config


def main(argv: list[str] | None = None) -> Path:
    (args,) = parse_config(STAGE, CONFIG_CLASSES, argv)
    started = now_iso()
    check_arguments(args)
    seeds = load_seed_tasks(args.seed_tasks)
    config = run_config(args)
    output = StageOutput(STAGE, Path(args.output_dir), config, overwrite=args.overwrite_output_dir,
                         restart=args.restart)
    output.check()

    import torch

    from align.models import adapter_dir, load_causal_lm, load_tokenizer, resolve_model

    model_path = resolve_model(args.model_name_or_path, STAGE)
    tokenizer = load_tokenizer(model_path, STAGE)
    mode = args.prompt_mode if args.prompt_mode != "auto" else ("chat" if tokenizer.chat_template else "completion")
    if mode == "chat" and not tokenizer.chat_template:
        raise StageError(STAGE, f"{args.model_name_or_path} has no chat template — use --prompt_mode completion")
    if args.adapter and not (adapter_dir(args.adapter) / "adapter_config.json").exists():
        raise StageError(STAGE, f"no adapter at {args.adapter} — pass an `align sft` output directory")
    embedding = None
    if args.embedding_filter:
        from align.models import resolve_embedding_model

        embedding = EmbeddingFilter.from_model(resolve_embedding_model(args.embedding_model, STAGE),
                                               args.embedding_threshold)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(model_path, dtype=args.dtype, adapter=args.adapter, stage=STAGE).to(device).eval()

    partial = output.open()
    journal = partial / "journal.jsonl"
    loop = SelfInstruct(args, seeds, LocalModel(model, tokenizer, args.batch_size), Prompts(mode), embedding)
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
