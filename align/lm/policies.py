"""Policies named on a command line — `NAME=MODEL[+ADAPTER...]` — and how they are loaded for inference.

An adapter is a training stage's output (its `adapter/`), an adapter directory, a PPO run's policy at an
evaluation step (`<ppo output>/eval_adapters/step-N`, see `align ppo --eval_steps`) or a PPO checkpoint
(`<ppo output>/checkpoints/checkpoint-N`, kept with `--keep_checkpoints`, or one in a run still in
`.partial`). Adapters are merged in order; a PPO output or checkpoint brings in the SFT adapter its run
started from, so `ppo=smollm2-135m-instruct+runs/ppo` is the PPO policy as it was trained. Shared by
`rag eval` and `align evaluate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from align.core.command import StageError
from align.lm.models import adapter_dir, has_adapter, load_for_inference, merge_adapter

# What `save_checkpoint` of the PPO trainer writes; trainer_state.json last, so it marks a complete checkpoint.
CHECKPOINT_FILES = ("weights.pt", "trainer_state.json")


@dataclass
class PolicySpec:
    name: str
    model: str
    adapters: list[str]


def parse_policies(entries: Sequence[str], stage: str) -> list[PolicySpec]:
    """`NAME=MODEL[+ADAPTER...]` entries (a bare MODEL is named after itself); names must be unique."""
    specs = []
    for entry in entries:
        name, _, target = entry.partition("=") if "=" in entry else (entry, "", entry)
        parts = [p.strip() for p in target.split("+")]
        if not name.strip() or not all(parts):
            raise StageError(stage, f"bad model entry {entry!r} — write NAME=MODEL or NAME=MODEL+ADAPTER")
        specs.append(PolicySpec(name.strip(), parts[0], parts[1:]))
    names = [s.name for s in specs]
    if not specs or len(set(names)) < len(names):
        raise StageError(stage, f"models need unique names, got {names}")
    return specs


def is_ppo_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path).expanduser()
    return all((path / name).is_file() for name in CHECKPOINT_FILES) and path.name.startswith("checkpoint-")


def checkpoint_run_config(checkpoint: str | os.PathLike) -> dict:
    """The config of the PPO run a checkpoint belongs to: its finished output's manifest, or the run_config.json
    of a run still in `.partial`. {} when neither is readable."""
    run = Path(checkpoint).expanduser().parent.parent
    for name, pick in (("manifest.json", lambda d: d.get("config", {})), ("run_config.json", lambda d: d)):
        try:
            return pick(json.loads((run / name).read_text()))
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
    return {}


def stage_manifest(adapter: str) -> dict:
    """The manifest of the stage output an adapter belongs to ({} when there is none)."""
    path = adapter_dir(adapter)
    # <stage>/adapter, or a PPO run's <ppo>/eval_adapters/step-N (the policy at an evaluation step)
    stage_dir = path.parent if path.name == "adapter" else path.parent.parent if path.parent.name == "eval_adapters" \
        else Path(adapter)
    try:
        return json.loads((stage_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def ppo_input(adapter: str, key: str) -> str | None:
    """What the PPO run an output or checkpoint belongs to took as `key` ("sft_adapter", "reward_model"); None
    for anything else."""
    if is_ppo_checkpoint(adapter):
        return checkpoint_run_config(adapter).get("data", {}).get(key)
    manifest = stage_manifest(adapter)
    return (manifest.get("depends_on") or {}).get(key) if manifest.get("stage") == "ppo" else None


def adapter_chain(adapters: Sequence[str]) -> list[str]:
    """Adapters to merge in order: a PPO output or checkpoint is preceded by the SFT adapter its run started from."""
    chain: list[str] = []
    seen: set[Path] = set()

    def add(adapter: str) -> None:
        key = adapter_dir(adapter).resolve()
        if key not in seen:  # the same adapter named twice (or by two paths) is merged once
            seen.add(key)
            chain.append(adapter)

    for adapter in adapters:
        sft = ppo_input(adapter, "sft_adapter")
        if sft:
            add(sft)
        add(adapter)
    return chain


def policy_problems(spec: PolicySpec) -> list[str]:
    """What is missing on disk for `spec` to load (each adapter of its chain exists), one line each."""
    problems = []
    for adapter in spec.adapters:
        if not (has_adapter(adapter) or is_ppo_checkpoint(adapter)):
            problems.append(f"model {spec.name}: no adapter at {adapter} — pass a training stage's output, an "
                            "adapter directory or a PPO checkpoint")
    if problems:
        return problems
    for adapter in adapter_chain(spec.adapters):
        if not (has_adapter(adapter) or is_ppo_checkpoint(adapter)):
            problems.append(f"model {spec.name}: the SFT adapter {adapter} its PPO adapter was trained on is missing "
                            "— pass it explicitly as NAME=MODEL+SFT+PPO or restore it")
    return problems


def merge_ppo_checkpoint(model, checkpoint: str | os.PathLike, stage: str = "model"):
    """Fold the policy LoRA of a PPO checkpoint into `model` (the base with the SFT adapter already merged)."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = checkpoint_run_config(checkpoint).get("data", {})
    if not config:
        raise StageError(stage, f"{checkpoint}: the PPO run it belongs to has no manifest.json or run_config.json — "
                         "pass a checkpoint inside its PPO output directory")
    targets = config.get("lora_target_modules") or ["all-linear"]
    targets = targets[0] if targets == ["all-linear"] else targets
    lora = LoraConfig(r=config.get("lora_r", 16), lora_alpha=config.get("lora_alpha", 32), lora_dropout=0.0,
                      target_modules=targets, task_type="CAUSAL_LM")
    wrapped = get_peft_model(model, lora)
    weights = torch.load(Path(checkpoint) / "weights.pt", weights_only=True, map_location="cpu")
    policy = {n.removeprefix("policy."): w for n, w in weights.items() if n.startswith("policy.")}
    missing = set(policy) - {n for n, _ in wrapped.named_parameters()}
    if not policy or missing:
        raise StageError(stage, f"{checkpoint}: its policy weights do not fit the model (e.g. "
                         f"{sorted(missing)[:1] or 'none found'}) — was it trained on another base model?")
    wrapped.load_state_dict(policy, strict=False)
    return wrapped.merge_and_unload()


def merge_any(model, adapter: str | os.PathLike, stage: str = "model"):
    """Merge a LoRA adapter (stage output or directory) or a PPO checkpoint's policy LoRA into `model`."""
    if is_ppo_checkpoint(adapter):
        return merge_ppo_checkpoint(model, adapter, stage)
    return merge_adapter(model, adapter, stage=stage)


def load_policy(model_path: str, adapters: Sequence[str], precision, device: str = "cpu", stage: str = "model"):
    """A frozen causal LM that generates or scores: the base with every adapter of `adapter_chain(adapters)`
    merged (see `align.lm.models.load_for_inference`)."""
    return load_for_inference(model_path, precision, adapter_chain(adapters), device, stage, merge=merge_any)
