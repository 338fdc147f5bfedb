"""The model card of a trained adapter: Hub metadata and the adapter's lineage, metrics and config.

Every training stage writes ``adapter/README.md`` with `write_model_card`: YAML metadata the Hub
understands (``library_name: peft``, ``base_model``, ``pipeline_tag``, tags, datasets) and a body with the
adapter's lineage (input datasets and parent adapters with fingerprints), its metrics, its resolved
config and the code to load it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from align.core.inputs import DATA_FILE_SUFFIXES, HUB_NAME
from align.core.outputs import strip_secrets

# Hub ids of the embedded aliases, for the card's `base_model` field (aliases missing here exist only locally).
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


LOCAL_ALIASES = ("smollm2-135m-instruct", "tiny-llama")


STAGE_FACTS = {  # stage -> (what it trained, pipeline_tag, extra tags)
    "sft": ("supervised fine-tuning on demonstrations", "text-generation", ["sft"]),
    "reward": ("a reward model: one scalar score per response, trained on ranked comparisons",
               "text-classification", ["reward-model", "rlhf"]),
    "ppo": ("PPO against a reward model, starting from the SFT policy", "text-generation", ["rlhf", "ppo"]),
}


# Inputs that are models rather than data, and how the lineage names them.
MODEL_INPUTS = {
    "sft_adapter": "SFT adapter (merged into the base model before training)",
    "reward_model": "reward model (scored the sampled responses)",
}


# Config keys shown in the card's summary table (the full resolved config follows it).
CARD_CONFIG_KEYS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "max_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "seed",
    "total_steps", "rollout_batch_size", "ppo_epochs", "init_kl_coef", "target_kl", "max_new_tokens", "rank_margin",
)


def base_model_hub_id(name: str) -> str | None:
    """The hub id of a manifest's base model, or None when it exists only locally (an alias built on this
    machine, or a local directory)."""
    if name in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[name]
    if name in LOCAL_ALIASES or not HUB_NAME.fullmatch(name) or Path(name).expanduser().exists():
        return None
    return name


def dataset_label(source: dict) -> str:
    """How the card's `datasets` metadata names an input: its hub id, or the local file's or directory's name."""
    if source.get("fingerprint", "").startswith("name:"):
        return source["fingerprint"][len("name:"):]
    name = Path(str(source["path"])).name
    for suffix in sorted(DATA_FILE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _flatten_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _flatten_metrics(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _shown(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "—"
    return str(value)


def _config_summary(config: dict) -> dict:
    flat: dict = {}
    for group in config.values():
        if isinstance(group, dict):
            flat.update({k: v for k, v in group.items() if k in CARD_CONFIG_KEYS})
    return {key: flat[key] for key in CARD_CONFIG_KEYS if key in flat}


def _output_dir(manifest: dict) -> str | None:
    for group in manifest.get("config", {}).values():
        if isinstance(group, dict) and group.get("output_dir"):
            return str(group["output_dir"])
    return None


def _local_adapter(path: str) -> str:
    """A stage output's adapter/ directory when it is there, else the path as given."""
    return f"{path.rstrip('/')}/adapter" if (Path(path) / "adapter" / "adapter_config.json").exists() else path


def _load_snippet(manifest: dict, base_name: str, base_id: str | None, adapter_ref: str) -> list[str]:
    stage = manifest["stage"]
    sft = manifest.get("depends_on", {}).get("sft_adapter")
    lines = ["```python", "from peft import PeftModel"]
    if stage == "reward":
        lines.append("from transformers import " + ("AutoModelForCausalLM, " if sft else "")
                     + "AutoModelForSequenceClassification, AutoTokenizer")
    else:
        lines.append("from transformers import AutoModelForCausalLM, AutoTokenizer")
    lines.append("")
    if base_id:
        lines.append(f'base_model = "{base_id}"')
    elif base_name in LOCAL_ALIASES:
        lines += ["from align.lm.models import resolve_model", "",
                  f'base_model = resolve_model("{base_name}")  # built locally by align-rlhf']
    else:
        lines.append(f'base_model = "{base_name}"  # the local base model this adapter was trained on')
    lines.append(f'adapter = "{adapter_ref}"')
    if sft:
        lines.append(f'sft_adapter = "{_local_adapter(sft)}"  # or its hub id, if you pushed it')
    lines += ["tokenizer = AutoTokenizer.from_pretrained(adapter)", ""]
    if stage == "reward":
        lines += [
            "model = AutoModelForSequenceClassification.from_pretrained(base_model, num_labels=1)",
            "model.config.pad_token_id = tokenizer.pad_token_id",
        ]
        if sft:
            lines += [
                "# the reward model was trained on the SFT model: fold the SFT adapter into its backbone first",
                "sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), sft_adapter)",
                "sft = sft.merge_and_unload()",
                "getattr(model, model.base_model_prefix).load_state_dict(",
                "    getattr(sft, sft.base_model_prefix).state_dict())",
            ]
        lines += [
            "model = PeftModel.from_pretrained(model, adapter).eval()  # LoRA + the trained score head",
            'reward = model(**tokenizer("<prompt + response>", return_tensors="pt")).logits[0, 0]',
            "# PPO normalises rewards with reward_mean / reward_std (see the metrics above)",
        ]
    else:
        lines.append("base = AutoModelForCausalLM.from_pretrained(base_model)")
        if stage == "ppo" and sft:
            lines.append("base = PeftModel.from_pretrained(base, sft_adapter).merge_and_unload()"
                         "  # the SFT policy PPO started from")
        lines.append("model = PeftModel.from_pretrained(base, adapter)")
    lines += ["```", ""]
    return lines


def render_model_card(manifest: dict, repo_id: str | None = None, *, license: str | None = None) -> str:
    """The README.md of an adapter produced by the stage described by `manifest`.

    Args:
        manifest: the stage's manifest (credentials are stripped again here).
        repo_id: the hub repository the adapter is pushed to; the load snippet uses it when given,
            otherwise the adapter's local directory.
        license: a license identifier for the metadata; left out when not given.
    """
    manifest = strip_secrets(manifest)
    stage = manifest["stage"]
    trained, pipeline_tag, extra_tags = STAGE_FACTS.get(stage, (stage, "text-generation", []))
    base_name = manifest.get("base_model", {}).get("name_or_path", "unknown")
    base_id = base_model_hub_id(base_name)
    inputs = manifest.get("inputs", {})
    depends_on = manifest.get("depends_on", {})

    metadata: dict[str, Any] = {"library_name": "peft"}
    if base_id:
        metadata["base_model"] = base_id
    metadata["pipeline_tag"] = pipeline_tag
    metadata["tags"] = list(dict.fromkeys(["align-rlhf", stage, "lora", *extra_tags]))
    datasets = [dataset_label(source) for name, source in inputs.items()
                if name not in MODEL_INPUTS and name not in depends_on]
    if datasets:
        metadata["datasets"] = list(dict.fromkeys(datasets))
    if license:
        metadata["license"] = license

    output_dir = _output_dir(manifest)
    adapter_ref = repo_id or (f"{output_dir}/adapter" if output_dir else "<this adapter: a local path or hub id>")
    base_shown = f"`{base_id}`" if base_id else f"`{base_name}` (local, not on the hub)"
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", ""]
    lines += [f"# {repo_id or f'{stage.upper()} LoRA adapter'}", ""]
    lines += [f"A LoRA adapter for {base_shown}, trained by the `{stage}` stage of align-rlhf "
              f"{manifest.get('version', '')}: {trained}. Finished {manifest.get('finished') or 'unknown'}.", ""]

    lines += ["## Lineage", "", f"- base model: `{base_name}`" + (f" (`{base_id}`)" if base_id and base_id != base_name
                                                                 else "")]
    for name, source in inputs.items():
        label = MODEL_INPUTS.get(name, name)
        lines.append(f"- {label}: `{source['path']}` — fingerprint `{source['fingerprint']}`")
    for name, path in depends_on.items():
        if name not in inputs:
            lines.append(f"- {MODEL_INPUTS.get(name, name)}: `{path}` (fingerprint not recorded)")
    if depends_on:
        lines += ["", "Depends on:"]
        if "sft_adapter" in depends_on:
            lines.append(f"- the SFT adapter `{depends_on['sft_adapter']}`: merge it into the base model before "
                         "loading this adapter (as the snippet below does)")
        if "reward_model" in depends_on:
            lines.append(f"- the reward model `{depends_on['reward_model']}`, which scored the responses PPO "
                         "optimised (needed to continue training, not to generate)")
    if manifest.get("resumed_from"):
        lines.append(f"\nTraining resumed from {manifest['resumed_from']}.")

    metrics = _flatten_metrics(manifest.get("metrics", {}))
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_shown(value)} |" for key, value in metrics]

    config = manifest.get("config", {})
    if config:
        summary = _config_summary(config)
        lines += ["", "## Training configuration", ""]
        if summary:
            lines += ["| option | value |", "|---|---|", *(f"| {k} | {_shown(v)} |" for k, v in summary.items()), ""]
        lines += ["<details>", "<summary>Full resolved configuration (manifest.json)</summary>", "", "```json",
                  json.dumps(config, indent=2, default=str), "```", "", "</details>"]

    lines += ["", "## Use", ""]
    lines += _load_snippet(manifest, base_name, base_id, adapter_ref)
    return "\n".join(lines)


def write_model_card(adapter_dir: str | Path, manifest: dict) -> Path:
    path = Path(adapter_dir) / "README.md"
    path.write_text(render_model_card(manifest))
    return path
