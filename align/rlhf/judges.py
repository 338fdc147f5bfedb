"""Judges for an alignment report: finished `align reward` outputs, either family, as one scoring interface.

A judge scores (prompt, response) pairs with the reward normalised by its training responses' mean and std,
so its scores read in "reward standard deviations" whichever judge it is. Which judge a PPO policy was
optimised against (its *proxy*) is read from the PPO run's manifest or checkpoint config: a report must
never let that judge be the one that claims an improvement.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from align.core.command import StageError
from align.lm.policies import ppo_input


@dataclass
class Judge:
    name: str
    path: str
    backbone: str  # "lm" (a LoRA reward model) or "embedding"
    score: Callable[[list, list[str]], list[float]]


def parse_judges(entries: Sequence[str], stage: str) -> list[tuple[str, str]]:
    """`NAME=<reward output>` entries (a bare path is named after its directory); names must be unique."""
    judges = []
    for entry in entries:
        name, _, path = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
        if not name.strip() or not path.strip():
            raise StageError(stage, f"bad judge entry {entry!r} — write NAME=<an `align reward` output directory>")
        judges.append((name.strip(), path.strip()))
    names = [n for n, _ in judges]
    if not judges or len(set(names)) < len(names):
        raise StageError(stage, f"judges need unique names, got {names or 'none'} — pass --judges NAME=<reward output>")
    return judges


def judge_backbone(path: str) -> str | None:
    """'lm' or 'embedding' for a finished reward output at `path`; None when it is not one."""
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("stage") != "reward":
        return None
    backbone = manifest.get("config", {}).get("model", {}).get("backbone", "lm")
    ready = (Path(path) / ("adapter" if backbone == "lm" else "judge")).is_dir()
    return backbone if ready else None


def load_judge(name: str, path: str, precision, device: str, batch_size: int = 8, stage: str = "judge") -> Judge:
    """Load a reward output as a `Judge` (frozen; an LM reward model at `precision`, its score head in fp32)."""
    import torch

    from align.rlhf.embedding_judge import EmbeddingJudge
    from align.rlhf.reward_model import RewardModelScorer, load_reward_model, prepare_for_scoring

    backbone = judge_backbone(path)
    if backbone is None:
        raise StageError(stage, f"judge {name}: {path} is not a finished `align reward` output")
    if backbone == "embedding":
        scorer = EmbeddingJudge.from_output(path, device=device)
    else:
        model, tokenizer, manifest = load_reward_model(path, dtype=torch.float32, stage=stage)
        metrics, training = manifest.get("metrics", {}), manifest["config"].get("training", {})
        scorer = RewardModelScorer(prepare_for_scoring(model, precision, device), tokenizer,
                                   float(metrics.get("reward_mean", 0.0)), float(metrics.get("reward_std", 1.0)),
                                   training.get("max_length") or 512, batch_size)

    def score(prompts: list, responses: list[str]) -> list[float]:
        return [float(s) for s in scorer(list(prompts), list(responses))]

    return Judge(name, path, backbone, score)


def optimised_against(adapters: Sequence[str]) -> list[str]:
    """The reward models the PPO runs among `adapters` (outputs or checkpoints) were trained against."""
    return [reward for reward in (ppo_input(adapter, "reward_model") for adapter in adapters) if reward]


def same_path(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


class HeldOutEvaluation:
    """PPO's periodic held-out evaluation: the policy's greedy responses to the held-out prompts, scored by the
    reward model it optimises (`proxy`) and by every other judge, appended to `log` (one JSON line per step)
    and TensorBoard, and the policy's adapter kept in `adapters/step-N/` so `align evaluate` can score it later.
    The proxy rising while a judge it never saw turns down is over-optimisation, visible during training."""

    def __init__(self, prompts: list, judges: Sequence[Judge], log: Path, adapters: Path, batch_size: int = 8):
        self.prompts, self.judges, self.log, self.adapters = prompts, list(judges), log, adapters
        self.batch_size = batch_size

    def logged_steps(self) -> set[int]:
        if not self.log.exists():
            return set()
        return {json.loads(line)["step"] for line in self.log.read_text().splitlines() if line.strip()}

    def __call__(self, trainer, step: int, kl: float | None = None, writer=None) -> dict:
        from align.core.outputs import append_jsonl

        responses = trainer.greedy_responses(self.prompts, self.batch_size)
        record = {"step": step, "proxy": _mean_of(trainer.evaluate(self.prompts, self.batch_size, responses)),
                  "judges": {judge.name: _mean_of(judge.score(self.prompts, responses)) for judge in self.judges},
                  "kl": kl, "words": _mean_of([float(len(r.split())) for r in responses])}
        if step > 0:
            trainer.policy.save_pretrained(str(self.adapters / f"step-{step}"))
        append_jsonl(self.log, record)
        if writer is not None:
            scalars = {"proxy": record["proxy"], "kl": kl, "words": record["words"],
                       **{f"judge/{name}": value for name, value in record["judges"].items()}}
            for key, value in scalars.items():
                if value is not None:
                    writer.add_scalar(f"eval/{key}", value, step)
        return record


def _mean_of(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
