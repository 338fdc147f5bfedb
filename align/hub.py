"""Model cards for trained adapters.

Every training stage writes ``adapter/README.md``: YAML metadata the Hub understands
(``library_name: peft``, ``base_model``, tags) and a body with the adapter's lineage (input datasets
with fingerprints, the adapters it was trained on top of), its metrics and config, and the code to load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

# Hub ids of the embedded aliases, for the card's `base_model` field.
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}

# Config keys worth showing in the card (the full resolved config is in manifest.json).
CARD_CONFIG_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "seed",
    "total_steps", "rollout_batch_size", "ppo_epochs", "init_kl_coef", "target_kl", "max_new_tokens",
)


def _flatten(config: dict) -> dict:
    flat: dict = {}
    for value in config.values():
        if isinstance(value, dict):
            flat.update(value)
    return flat


def render_model_card(manifest: dict) -> str:
    """The README.md of an adapter produced by the stage described by `manifest`."""
    stage = manifest["stage"]
    base = manifest.get("base_model", {})
    base_name = base.get("name_or_path", "unknown")
    base_id = ALIAS_HUB_IDS.get(base_name, base_name)
    metadata = {
        "library_name": "peft",
        "base_model": base_id,
        "pipeline_tag": "text-generation",
        "tags": ["align-rlhf", stage, "lora"],
    }
    hub_datasets = [i["path"] for i in manifest.get("inputs", {}).values() if i["fingerprint"].startswith("name:")]
    if hub_datasets:
        metadata["datasets"] = hub_datasets
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", ""]
    lines += [f"# {stage.upper()} LoRA adapter for {base_id}", ""]
    lines += [f"Trained by the `{stage}` stage of align-rlhf {manifest.get('version', '')} "
              f"(finished {manifest.get('finished')}).", ""]
    lines += ["## Lineage", "", f"- base model: `{base_name}`" + (f" (`{base_id}`)" if base_id != base_name else "")]
    for name, source in manifest.get("inputs", {}).items():
        lines.append(f"- {name}: `{source['path']}` — `{source['fingerprint']}`")
    for name, parent in manifest.get("depends_on", {}).items():
        lines.append(f"- {name}: `{parent}`")
    metrics = manifest.get("metrics", {})
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        for key, value in metrics.items():
            if isinstance(value, (int, float, str)):
                shown = f"{value:.4g}" if isinstance(value, float) else value
                lines.append(f"| {key} | {shown} |")
    flat = _flatten(manifest.get("config", {}))
    shown = {k: flat[k] for k in CARD_CONFIG_KEYS if k in flat}
    if shown:
        lines += ["", "## Training configuration", "", "```json", json.dumps(shown, indent=2), "```"]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
        'model = PeftModel.from_pretrained(base, "<this adapter: a local path or hub id>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this adapter: a local path or hub id>")',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(adapter_dir: str | Path, manifest: dict) -> Path:
    path = Path(adapter_dir) / "README.md"
    path.write_text(render_model_card(manifest))
    return path
