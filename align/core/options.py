"""What a valid option value is, checked once for every command right after parsing, before any work.

The rules are read off the option definitions: a float must be finite, and an option's name says its range
(`RULES`: the options ours share with TRL and transformers — learning rates, batch sizes, LoRA, sampling —
plus a stage's own `OPTION_RULES` beside its config classes). A stage adds what depends on several options
at once with `option_problems(*configs)` in its module. `parse_config` reports every problem found, one
line each, so a user fixes a command line in one go.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A number in [low, high] (either bound may be open or absent); None passes when `optional`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = True
    also: tuple = ()  # single values allowed outside the range, e.g. -1 = "not set"

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.optional else "must be set"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # the parser has checked the type
        if value in self.also:
            return None
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"must be {self.describe()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"must be {self.describe()}"
        return None

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {opening}{_number(self.low)}, {_number(self.high)}{closing}"
        if self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return text + "".join(f" (or {_number(v)})" for v in self.also)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values."""

    values: tuple

    def problem(self, value: Any) -> str | None:
        if value is None or value in self.values:
            return None
        return f"must be one of {', '.join(map(str, self.values))}"


PRECISIONS = ("auto", "fp32", "bf16")  # `--precision` of every command that runs a model (`align.lm.precision`)
POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1)
PROBABILITY_MASS = Range(0, 1, low_open=True)  # (0, 1]

# Options by name, wherever they are defined (ours, TRL's or transformers'): what a valid value is.
RULES: dict[str, Range | Choice] = {
    "precision": Choice(PRECISIONS),
    # optimisation
    "learning_rate": POSITIVE,
    "value_learning_rate": POSITIVE,
    "num_train_epochs": NON_NEGATIVE,  # 0 is refused below unless max_steps says how long to train
    "max_steps": Range(1, also=(-1,)),
    "per_device_train_batch_size": AT_LEAST_ONE,
    "per_device_eval_batch_size": AT_LEAST_ONE,
    "gradient_accumulation_steps": AT_LEAST_ONE,
    "weight_decay": NON_NEGATIVE,
    "warmup_ratio": Range(0, 1),
    "warmup_steps": NON_NEGATIVE,
    "max_grad_norm": NON_NEGATIVE,
    "adam_epsilon": POSITIVE,
    "adam_beta1": FRACTION,
    "adam_beta2": FRACTION,
    "logging_steps": POSITIVE,
    "save_steps": POSITIVE,
    "eval_steps": POSITIVE,
    "save_total_limit": AT_LEAST_ONE,
    "dataloader_num_workers": NON_NEGATIVE,
    "seed": Range(0, 2**32 - 1),
    "data_seed": Range(0, 2**32 - 1),
    # data
    "max_length": AT_LEAST_ONE,
    "max_train_samples": AT_LEAST_ONE,
    "eval_fraction": FRACTION,
    # LoRA
    "lora_r": AT_LEAST_ONE,
    "lora_alpha": POSITIVE,
    "lora_dropout": FRACTION,
    # reward model
    "rank_margin": NON_NEGATIVE,
    "center_rewards_coefficient": NON_NEGATIVE,
    "sequences_per_pass": NON_NEGATIVE,
    "judge_hidden_size": NON_NEGATIVE,
    "judge_epochs": AT_LEAST_ONE,
    "judge_learning_rate": POSITIVE,
    "judge_weight_decay": NON_NEGATIVE,
    "judge_dropout": FRACTION,
    # sampling
    "temperature": POSITIVE,
    "top_p": PROBABILITY_MASS,
    "max_new_tokens": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
    "num_responses": Range(2),
}


def _flag(name: str) -> str:
    return f"--{name}"


def find_option_problems(configs: tuple, rules: dict[str, Range | Choice] | None = None,
                    extra: Callable[..., list[str]] | None = None) -> list[str]:
    """Every invalid value in the parsed config dataclasses, one message each ("--name must be ... (got value)").

    Args:
        configs: the parsed dataclass instances of one command.
        rules: the command's own rules, by option name (they take precedence over `RULES`).
        extra: the command's checks that involve several options; called with the configs, returns messages.
    """
    merged = {**RULES, **(rules or {})}
    problems = []
    for config in configs:
        for definition in dataclasses.fields(config):
            name, value = definition.name, getattr(config, definition.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{_flag(name)} must be a finite number (got {value})")
                continue
            rule = merged.get(name)
            problem = rule.problem(value) if rule is not None else None
            if problem:
                problems.append(f"{_flag(name)} {problem} (got {value!r})")
    values = {f.name: getattr(c, f.name) for c in configs for f in dataclasses.fields(c)}
    if values.get("num_train_epochs") == 0 and values.get("max_steps", -1) in (-1, 0):
        problems.append("--num_train_epochs 0 trains nothing: give a number of epochs > 0, or --max_steps")
    if extra is not None:
        problems += extra(*configs)
    return problems
