"""`align push <stage output dir> --repo_id namespace/name`: publish a trained adapter on a model hub.

Uploads the adapter of a finished `align sft`, `align reward` or `align ppo` output (weights, adapter
config, tokenizer, and a model card re-rendered with the repository id) together with the stage's
manifest.json, in one commit, to a private repository unless `--private false`. The token comes from
HF_TOKEN or a stored `hf auth login`, never from a flag; `--hub_endpoint` (or HF_ENDPOINT) picks a hub
other than huggingface.co.

    align push runs/sft --repo_id my-org/smollm2-sft
    align push runs/ppo --repo_id my-org/smollm2-ppo --license apache-2.0 --commit_message "PPO, 200 steps"
    align push runs/sft --repo_id my-org/smollm2-sft --hub_endpoint http://hub.internal:8080

Every training stage also writes ``adapter/README.md`` with `write_model_card`: YAML metadata the Hub
understands (``library_name: peft``, ``base_model``, ``pipeline_tag``, tags, datasets) and a body with the
adapter's lineage (input datasets and parent adapters with fingerprints), its metrics, its resolved
config and the code to load it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.common import (
    DATA_FILE_SUFFIXES,
    HUB_NAME,
    MANIFEST,
    PARTIAL_SUFFIX,
    StageError,
    package_version,
    parse_config,
    run_stage,
    strip_secrets,
)

STAGE = "push"
TRAINING_STAGES = ("sft", "reward", "ppo")
logger = logging.getLogger("align")

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


# ----------------------------------------------------------------------------- the model card


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
        lines += ["from align.models import resolve_model", "",
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


# ----------------------------------------------------------------------------- pushing


def hub_endpoint(endpoint: str | None = None) -> str:
    """The hub to talk to: the argument, else $HF_ENDPOINT, else the library's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _hub_error(exc: BaseException, action: str, endpoint: str, repo_id: str) -> StageError:
    """A StageError, in one line that says how to fix it, for a failed hub call."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
    if isinstance(exc, OfflineModeIsEnabled):
        return StageError(STAGE, "offline mode is on (HF_HUB_OFFLINE) — unset HF_HUB_OFFLINE to push")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        detail = _one_line(exc.server_message or str(exc).strip().splitlines()[0])
        if status == 401:
            return StageError(STAGE, f"the hub at {endpoint} refused the token (401: {detail}) — set a valid "
                              "HF_TOKEN or run `hf auth login`")
        if status == 403:
            return StageError(STAGE, f"the hub refused to {action} {repo_id} (403: {detail}) — check that your token "
                              f"has write access to '{namespace}', or choose another --repo_id")
        if status in (400, 409, 422) and action == "create":
            return StageError(STAGE, f"the hub refused the repository name {repo_id} ({status}: {detail}) — choose "
                              "another --repo_id")
        return StageError(STAGE, f"could not {action} {repo_id} on {endpoint} ({status}: {detail}) — try again "
                          "later; nothing was pushed")
    if isinstance(exc, httpx2.TransportError):
        return StageError(STAGE, f"cannot reach the hub at {endpoint} ({type(exc).__name__}) — check --hub_endpoint "
                          "/ HF_ENDPOINT and the network")
    return StageError(STAGE, f"could not {action} {repo_id} on {endpoint}: {_one_line(exc) or type(exc).__name__}")


def _api(endpoint: str, token: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint, token=token, library_name="align-rlhf", library_version=package_version())


def check_push(repo_id: str, endpoint: str | None = None) -> None:
    """Preflight for pushing to `repo_id`, cheap enough to run before training: the id is well formed,
    a token is available, offline mode is off, and the hub accepts the token and lets it write to the
    namespace. Raises StageError("push", ...) with a one-line fix otherwise."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise StageError(STAGE, f"invalid --repo_id {repo_id!r}: {_one_line(exc)} — use 'namespace/name'") from None
    endpoint = hub_endpoint(endpoint)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            raise StageError(STAGE, f"{variable}={os.environ[variable]} is set, so nothing can reach the hub — "
                             f"unset {variable} for the push")
    if constants.is_offline_mode():
        raise StageError(STAGE, "offline mode is on (HF_HUB_OFFLINE) — unset HF_HUB_OFFLINE for the push")
    token = get_token()
    if not token:
        raise StageError(STAGE, "no hub token — set HF_TOKEN or run `hf auth login`")
    try:
        identity = _api(endpoint, token).whoami()
    except Exception as exc:  # noqa: BLE001 - every failure becomes a one-line StageError
        raise _hub_error(exc, "check the token for", endpoint, repo_id) from None
    role = (identity.get("auth", {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise StageError(STAGE, f"the token of '{identity.get('name')}' is read-only — use a token with write access "
                         "(HF_TOKEN or `hf auth login`)")
    orgs = identity.get("orgs")
    if "/" in repo_id and isinstance(orgs, list):
        namespace = repo_id.split("/")[0]
        allowed = {identity.get("name"), *(org.get("name") for org in orgs if isinstance(org, dict))}
        if namespace not in allowed:
            raise StageError(STAGE, f"'{identity.get('name')}' cannot create repositories in '{namespace}' (not a "
                             f"member; namespaces: {', '.join(sorted(n for n in allowed if n))}) — choose another "
                             "--repo_id")


def stage_output_for_push(output_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(path, manifest) of a finished training stage output; a StageError for anything else."""
    path = Path(output_dir).expanduser()
    hint = "push a finished `align sft`, `align reward` or `align ppo` output directory"
    if path.name.endswith(PARTIAL_SUFFIX):
        raise StageError(STAGE, f"{path} is an unfinished run — let the stage finish (re-running its command "
                         f"resumes it), then push {path.with_name(path.name[: -len(PARTIAL_SUFFIX)])}")
    if not path.is_dir():
        raise StageError(STAGE, f"{path} not found — {hint}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise StageError(STAGE, f"{path} has no {MANIFEST}, so it is not a finished stage output — {hint}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(STAGE, f"{path / MANIFEST} is unreadable ({_one_line(exc)}) — {hint}") from None
    stage = manifest.get("stage") if isinstance(manifest, dict) else None
    if stage not in TRAINING_STAGES:
        raise StageError(STAGE, f"{path} is a '{stage}' output, which has no adapter — {hint}")
    adapter = path / "adapter"
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (adapter / name).is_file()]
    if missing:
        raise StageError(STAGE, f"{adapter} lacks {', '.join(missing)} — {hint}")
    return path, manifest


def _operations(path: Path, manifest: dict, repo_id: str, license: str | None, token: str) -> list:
    """The commit: adapter/ files at the repo root (README.md re-rendered for `repo_id`) + manifest.json."""
    from huggingface_hub import CommitOperationAdd

    manifest = strip_secrets(manifest)
    contents: dict[str, bytes] = {}
    adapter = path / "adapter"
    for file in sorted(p for p in adapter.rglob("*") if p.is_file()):
        contents[file.relative_to(adapter).as_posix()] = file.read_bytes()
    contents["README.md"] = render_model_card(manifest, repo_id, license=license).encode()
    contents[MANIFEST] = (json.dumps(manifest, indent=2, default=str) + "\n").encode()
    for name, data in contents.items():
        if token.encode() in data:
            raise StageError(STAGE, f"the hub token appears in {name} — remove it from the output before pushing")
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in contents.items()]


def push_stage_output(output_dir: str | os.PathLike, repo_id: str, *, endpoint: str | None = None,
                      private: bool = True, commit_message: str | None = None, license: str | None = None) -> str:
    """Push a finished training stage's adapter and manifest to `repo_id` in one commit; returns the repo URL.

    A new repository is created private unless `private=False`; an existing one keeps its visibility (and
    pushing to an existing public repository needs `private=False`). If the repository was created by this
    call and the commit fails, it is deleted again, so a failed push leaves nothing behind.

    Raises:
        StageError: ("push", one line saying how to fix it) for a directory that is not a finished training
            output, a missing token, offline mode, an unreachable hub, a refused name or token, a failed commit.
    """
    from huggingface_hub import get_token
    from huggingface_hub.errors import HfHubHTTPError

    path, manifest = stage_output_for_push(output_dir)
    check_push(repo_id, endpoint)
    endpoint = hub_endpoint(endpoint)
    token = get_token()
    api = _api(endpoint, token)
    operations = _operations(path, manifest, repo_id, license, token)
    stage = manifest["stage"]

    created = False
    try:
        url = str(api.create_repo(repo_id, private=private, exist_ok=False))
        created = True
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 409:
            raise _hub_error(exc, "create", endpoint, repo_id) from None
        url = f"{endpoint}/{repo_id}"
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, "create", endpoint, repo_id) from None
    if not created:  # an existing repository: never turn a private push into a public one
        try:
            existing = api.model_info(repo_id)
        except Exception as exc:  # noqa: BLE001
            raise _hub_error(exc, "read", endpoint, repo_id) from None
        if private and not existing.private:
            raise StageError(STAGE, f"{repo_id} already exists and is public — pass --private false to push to it "
                             "anyway, or choose another --repo_id")

    message = commit_message or f"Upload {stage} adapter (align-rlhf {manifest.get('version', '')})"
    try:
        commit = api.create_commit(
            repo_id, operations, commit_message=message,
            commit_description=f"Trained by the `{stage}` stage of align-rlhf; lineage in README.md and {MANIFEST}.",
        )
    except BaseException as exc:
        if created:
            try:
                api.delete_repo(repo_id, missing_ok=True)
            except Exception:  # noqa: BLE001 - best effort: the commit error is what the user needs to see
                logger.debug("could not delete %s after the failed commit", repo_id)
        if not isinstance(exc, Exception):
            raise
        if isinstance(exc, ValueError) and "metadata" in str(exc):
            raise StageError(STAGE, f"the hub rejected the model card's metadata ({_one_line(exc)})") from None
        raise _hub_error(exc, "push to", endpoint, repo_id) from None
    logger.info("pushed %d files from %s to %s (%s, commit %s)", len(operations), path, repo_id,
                "new private repository" if created and private else "new public repository" if created
                else "existing repository", commit.oid[:12] if commit.oid else "?")
    return url


# ----------------------------------------------------------------------------- from a training stage


def check_stage_push(stage: str, push_to_hub: bool, hub_model_id: str | None, endpoint: str | None) -> None:
    """A training stage's `--push_to_hub` preflight, before any training: a repo id is given, and `check_push`
    passes (token, offline mode, the hub reachable and accepting the token)."""
    if not push_to_hub:
        return
    if not hub_model_id:
        raise StageError(stage, "--push_to_hub needs --hub_model_id namespace/name")
    try:
        check_push(hub_model_id, endpoint)
    except StageError as exc:
        raise StageError(stage, f"cannot push to the hub: {exc.message}") from None


def push_after_stage(stage: str, output_dir: Path, hub_model_id: str, endpoint: str | None, private: bool) -> str:
    """Push a stage's just-published output; a failure leaves the output in place and says how to push it later."""
    try:
        url = push_stage_output(output_dir, hub_model_id, endpoint=endpoint, private=private)
    except StageError as exc:
        raise StageError(stage, f"the output is complete in {output_dir} but the push failed: {exc.message} (push "
                         f"it later with `align push {output_dir} --repo_id {hub_model_id}`)") from None
    logger.info("pushed to %s", url)
    return url


# ----------------------------------------------------------------------------- the command


@dataclass
class PushArguments:
    repo_id: str = field(metadata={"help": "Hub repository to push to: 'namespace/name' (or 'name' for your own "
                                   "namespace). Created if it does not exist."})
    hub_endpoint: str | None = field(
        default=None, metadata={"help": "Hub address (default: $HF_ENDPOINT, else https://huggingface.co)."}
    )
    private: bool = field(
        default=True, metadata={"help": "Create the repository private (the default); `--private false` creates it "
                                "public. An existing repository keeps its visibility."}
    )
    commit_message: str | None = field(
        default=None, metadata={"help": "Summary of the commit (default: 'Upload <stage> adapter (align-rlhf X)')."}
    )
    license: str | None = field(
        default=None, metadata={"help": "License id for the model card's metadata (e.g. apache-2.0); omitted when "
                                "not given."}
    )


def _take_positional(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `align push` arguments into the output directory and the options."""
    flags = {"--private", "--no_private", "--no-private"}  # options that may stand alone (`--private` means true)
    values = {"true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}
    positional, rest, index = [], [], 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("-") and arg != "-":
            rest.append(arg)
            takes_value = "=" not in arg and arg not in ("-h", "--help")
            if arg in flags:
                takes_value = index + 1 < len(argv) and argv[index + 1].lower() in values
            if takes_value and index + 1 < len(argv):
                rest.append(argv[index + 1])
                index += 1
        else:
            positional.append(arg)
        index += 1
    if len(positional) > 1:
        raise StageError(STAGE, f"one stage output directory expected, got {len(positional)}: "
                         f"{' '.join(positional)} — see `align push --help`")
    return (positional[0] if positional else None), rest


def main(argv: list[str] | None = None) -> str:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        parse_config(STAGE, (PushArguments,), ["--help"], module="align.hub")  # prints the options and exits
    output_dir, options = _take_positional(args)
    if output_dir is None:
        raise StageError(STAGE, "no stage output directory — usage: align push <output_dir> --repo_id namespace/name")
    (push_args,) = parse_config(STAGE, (PushArguments,), options, module="align.hub")
    url = push_stage_output(output_dir, push_args.repo_id, endpoint=push_args.hub_endpoint,
                            private=push_args.private, commit_message=push_args.commit_message,
                            license=push_args.license)
    print(url)
    return url


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
