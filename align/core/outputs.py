"""The stage contract's output side: working directories, atomic publication, manifests, fingerprints.

A stage works inside a sibling `<output_dir>.partial/` (`StageOutput`) and publishes it with one rename
when complete, so a crashed stage never leaves a directory that the next stage would accept as
finished. The manifest records the run's identity (`run_identity`: its config without the options that
only say what to do with existing directories or where to publish) and the fingerprints of its inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import DatasetDict

from align.core.command import StageError, done, on_failure, package_version

logger = logging.getLogger("align")

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
RUN_CONFIG = "run_config.json"

# ----------------------------------------------------------------------------- fingerprints


def fingerprint(source: str | os.PathLike) -> str:
    """A content fingerprint of an input: sha256 of a file, the datasets fingerprints of a
    saved DatasetDict, or of every file under another directory. Hub names hash to their name."""
    path = Path(source).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return "sha256:" + digest.hexdigest()
    if path.is_dir():
        if (path / "dataset").is_dir():
            path = path / "dataset"
        for state in sorted(path.rglob("state.json")):  # datasets' own fingerprint of each split
            try:
                digest.update(str(json.loads(state.read_text()).get("_fingerprint")).encode())
            except (OSError, json.JSONDecodeError):
                digest.update(state.read_bytes())
        if not any(path.rglob("state.json")):
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(str(file.relative_to(path)).encode())
                digest.update(file.read_bytes())
        return "sha256:" + digest.hexdigest()
    return "name:" + str(source)


# ----------------------------------------------------------------------------- outputs


def is_secret_key(key: str) -> bool:
    """Keys that hold credentials (hub_token, token, *_api_key, *password*, *secret*), not e.g. pad_token."""
    key = key.lower()
    return (
        key in {"token", "hub_token", "hf_token", "use_auth_token", "auth_token", "api_key"}
        or key.endswith(("_api_key", "_auth_token"))
        or "password" in key
        or "secret" in key
    )


def strip_secrets(config: Any) -> Any:
    """Drop every key that could hold a credential (see `is_secret_key`), at any depth."""
    if isinstance(config, dict):
        return {k: strip_secrets(v) for k, v in config.items() if not is_secret_key(str(k))}
    if isinstance(config, (list, tuple)):
        return [strip_secrets(v) for v in config]
    if isinstance(config, (str, int, float, bool)) or config is None:
        return config
    return str(config)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST
    write_json_atomic(path, strip_secrets(manifest))
    return path


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StageError("manifest", f"{path} not found — is {directory} a finished stage output?") from None
    except json.JSONDecodeError as exc:
        raise StageError("manifest", f"{path} is not valid JSON ({exc})") from None


def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


@dataclass
class StageOutput:
    """The working directory of one stage run and its atomic publication.

    ``<output_dir>.partial/`` holds everything while the stage runs; `publish` renames it to
    ``<output_dir>``. The resolved config is kept in the partial directory so that re-running the
    same command resumes, and a different command does not silently continue someone else's run.
    """

    stage: str
    output_dir: Path
    config: dict
    overwrite: bool = False
    restart: bool = False
    resumed: bool = field(default=False, init=False)

    @property
    def partial(self) -> Path:
        return self.output_dir.with_name(self.output_dir.name + PARTIAL_SUFFIX)

    def check(self) -> None:
        """Validate before anything is written: the output can be created, does not exist (unless overwriting),
        and any partial run was started with the same config."""
        _check_creatable(self.stage, self.output_dir)
        if self.output_dir.exists() and not self.overwrite:
            raise StageError(
                self.stage,
                f"{self.output_dir} already exists — choose another --output_dir or pass --overwrite_output_dir true",
            )
        if self.partial.exists() and not self.restart:
            saved_path = self.partial / RUN_CONFIG
            saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
            if saved is not None and saved != json.loads(json.dumps(strip_secrets(self.config), default=str)):
                changed = sorted(changed_keys(saved, strip_secrets(self.config)))
                raise StageError(
                    self.stage,
                    f"{self.partial} holds an unfinished run with a different config (changed: "
                    f"{', '.join(changed[:8])}) — re-run the original command to resume it, or pass --restart true "
                    "to discard it",
                )

    def open(self, is_main_process: bool = True) -> Path:
        """Create (or reuse) the partial directory. Returns its path."""
        if self.restart and self.partial.exists() and is_main_process:
            shutil.rmtree(self.partial)
        self.resumed = (self.partial / RUN_CONFIG).exists()
        if is_main_process:
            (self.partial / "logs").mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.partial / RUN_CONFIG, strip_secrets(self.config))
            self._undo = on_failure(self._discard_if_nothing_to_resume)
        return self.partial

    def resumable(self) -> bool:
        """Whether the working directory holds work a re-run would resume from: a checkpoint or a journal."""
        journal = self.partial / "journal.jsonl"
        return any(self.partial.rglob("checkpoint-*")) or (journal.exists() and journal.stat().st_size > 0)

    def _discard_if_nothing_to_resume(self) -> None:
        """After an error: remove the working directory unless a re-run could resume from it."""
        if self.partial.exists() and not self.resumable():
            shutil.rmtree(self.partial, ignore_errors=True)

    def publish(self, manifest: dict, keep: Iterable[str] = ()) -> Path:
        """Write the manifest, drop working files not in `keep`, and rename partial -> output_dir."""
        (self.partial / RUN_CONFIG).unlink(missing_ok=True)
        for name in keep:
            if not (self.partial / name).exists():
                raise AssertionError(f"{self.stage}: expected output {name} was not written")
        write_manifest(self.partial, manifest)
        if self.output_dir.exists():  # --overwrite_output_dir: swap, then delete the old one
            trash = self.output_dir.with_name(self.output_dir.name + ".old")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(self.output_dir, trash)
            os.replace(self.partial, self.output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.partial, self.output_dir)
        done(getattr(self, "_undo", None))
        return self.output_dir


def _check_creatable(stage: str, output_dir: Path) -> None:
    """`output_dir` (and its working sibling) can be made: its nearest existing ancestor is a writable directory."""
    ancestor = output_dir.expanduser().absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise StageError(stage, f"cannot create {output_dir}: {ancestor} is a file, not a directory — choose another "
                         "--output_dir")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise StageError(stage, f"cannot create {output_dir}: {ancestor} is not writable — choose another --output_dir")


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the values that differ between two (nested) configs."""
    new = json.loads(json.dumps(new, default=str))
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def save_dataset_atomic(data: DatasetDict, path: str | os.PathLike) -> None:
    """save_to_disk into a temporary sibling, then rename, so `path` is either absent or complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        data.save_to_disk(str(tmp))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def base_manifest(stage: str, config: dict, inputs: dict[str, str], base_model: dict, started: str) -> dict:
    """The fields every stage's manifest has; the stage adds outputs and metrics."""
    return {
        "stage": stage,
        "version": package_version(),
        "config": strip_secrets(config),
        "inputs": {name: {"path": str(path), "fingerprint": fingerprint(path)} for name, path in inputs.items()},
        "base_model": base_model,
        "outputs": {},
        "metrics": {},
        "started": started,
        "finished": None,
        "host": socket.gethostname(),
    }


# ----------------------------------------------------------------------------- the run's identity


@dataclass
class OutputArguments:
    """What to do with existing output and working directories (not part of the run's identity)."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an existing finished output_dir (atomically, at the end)."}
    )
    restart: bool = field(
        default=False, metadata={"help": "Discard an unfinished run in <output_dir>.partial instead of resuming it."}
    )


@dataclass
class RunArguments(OutputArguments):
    """A training stage's `OutputArguments`, what to keep and where the hub is."""

    keep_checkpoints: bool = field(
        default=False, metadata={"help": "Keep checkpoints/ in the finished output (default: delete them)."}
    )
    hub_endpoint: str | None = field(
        default=None, metadata={"help": "With --push_to_hub: the hub's address (default: $HF_ENDPOINT, else "
                                "https://huggingface.co). The token comes from HF_TOKEN or `hf auth login`."}
    )


# Where and whether to publish the adapter: they do not change what is trained.
PUBLISH_KEYS = {"push_to_hub", "hub_model_id", "hub_endpoint", "hub_private_repo", "hub_strategy", "hub_token",
                "hub_always_push", "hub_revision"}
# The options that are never part of a run's identity: how to treat existing directories, and publishing.
# (`keep_checkpoints` is: it changes what the finished output holds.)
NOT_IDENTITY = {"overwrite_output_dir", "restart"} | PUBLISH_KEYS


def run_identity(config: dict) -> dict:
    """A stage's config ({group: {option: value}}) as its manifest records it and a resumed run or the
    pipeline's skip check compares it: without the `NOT_IDENTITY` options."""
    return {group: {k: v for k, v in values.items() if k not in NOT_IDENTITY} if isinstance(values, dict) else values
            for group, values in config.items()}
