"""Tasks: the seed tasks people wrote, and the datasets the accepted tasks become (one row per instance,
with `messages` for SFT and `prompt` for PPO)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, List, Value

from align.core.command import StageError
from align.core.inputs import parse_json_lines, read_text


@dataclass
class Task:
    instruction: str
    instances: list[tuple[str, str]]  # (input, output); input "" when the task needs none
    is_classification: bool
    task_id: str
    round: int = 0  # 0 for seeds


def load_seed_tasks(path: str | os.PathLike, stage: str = "self-instruct") -> list[Task]:
    """Read and check a seed-task file; the first problem is a StageError (of `stage`) naming the line."""
    path = Path(path)
    if not path.is_file():
        raise StageError(stage, f"seed task file {path} not found — pass --seed_tasks, e.g. data/seed/seed_tasks.jsonl")
    tasks = []
    for number, record in parse_json_lines(read_text(path, stage), path, stage):
        where = f"{path} line {number}"
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise StageError(stage, f"{where}: missing or empty 'instruction' — every seed task needs one")
        instances = record.get("instances")
        if not isinstance(instances, list) or not instances:
            raise StageError(stage, f"{where}: 'instances' must be a non-empty list of {{input, output}} objects")
        pairs = []
        for position, instance in enumerate(instances, start=1):
            if not isinstance(instance, dict) or not isinstance(instance.get("output"), str):
                raise StageError(stage, f"{where}: instance {position} has no 'output' string — give every instance "
                                 "an output (and an input, \"\" when the task needs none)")
            value = instance.get("input", "")
            if not isinstance(value, str):
                raise StageError(stage, f"{where}: instance {position} 'input' must be a string")
            pairs.append((value.strip(), instance["output"].strip()))
        is_classification = record.get("is_classification", False)
        if not isinstance(is_classification, bool):
            raise StageError(stage, f"{where}: 'is_classification' must be true or false")
        tasks.append(Task(instruction.strip(), pairs, is_classification, str(record.get("id", f"seed_{number}"))))
    if not tasks:
        raise StageError(stage, f"{path} has no seed tasks — the pool needs at least one (the paper used 175)")
    return tasks


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
