"""The stage contract: datasets on disk, validation, atomic outputs and manifests.

Every stage reads its input through `load_stage_dataset` + `validate_columns`, works inside a
sibling `<output_dir>.partial/` (`StageOutput`), and publishes it with one rename when complete, so a
crashed stage never leaves a directory that the next stage would accept as finished. Errors a user
can cause are raised as `StageError`; the CLI turns them into one line on stderr and exit code 2.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

logger = logging.getLogger("align")

MANIFEST = "manifest.json"
PARTIAL_SUFFIX = ".partial"
RUN_CONFIG = "run_config.json"

# Which stage (or outside source) produces each canonical column, for error messages.
PRODUCED_BY = {
    "messages": "self-instruct (align self-instruct), or any TRL conversational dataset",
    "prompt": "self-instruct (align self-instruct), or any TRL prompt dataset",
    "completion": "a TRL prompt/completion dataset",
    "responses": "comparisons (align comparisons)",
    "ranks": "comparisons (align comparisons)",
    "chosen": "comparisons (align comparisons) or a TRL preference dataset",
    "rejected": "comparisons (align comparisons) or a TRL preference dataset",
}

# "name" or "org/name": anything else that does not exist on disk is a missing local path.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
DATA_FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")


class StageError(Exception):
    """A problem the user can fix (bad input, bad config, missing model).

    Rendered by the CLI as ``error: <stage>: <message>`` with exit code 2, no traceback.
    """

    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.message = message

    def __str__(self) -> str:
        return f"{self.stage}: {self.message}"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("align-rlhf")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- loading


def parse_json_lines(text: str, path: Path, stage: str) -> list[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of JSON Lines text; a malformed line or a
    line that is not a JSON object is a StageError naming the file and the line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StageError(stage, f"{path} line {number}: malformed JSON ({exc.msg}) — fix or remove that line"
                             ) from None
        if not isinstance(record, dict):
            raise StageError(stage, f"{path} line {number}: expected a JSON object, got {type(record).__name__} "
                             "— one object per line")
        records.append((number, record))
    return records


def read_text(path: Path, stage: str) -> str:
    """The text of a (possibly gzipped) UTF-8 file; unreadable files are a StageError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise StageError(stage, f"cannot read {path}: {exc} — check that it is a UTF-8 JSON/JSONL file") from None


def _read_json_records(path: Path, stage: str) -> list[dict]:
    """Read a JSON Lines file (or a JSON array), optionally gzipped, reporting the bad line."""
    stripped = read_text(path, stage).lstrip()
    if not stripped.startswith("["):
        return [record for _, record in parse_json_lines(stripped, path, stage)]
    try:  # a whole-file JSON array
        records = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise StageError(stage, f"{path}: not valid JSON ({exc}) — fix the file") from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise StageError(stage, f"{path} record {number}: expected a JSON object, got {type(record).__name__}")
    return records


def load_stage_dataset(source: str | os.PathLike, stage: str, split: str = "train") -> DatasetDict:
    """Load a stage's input as a DatasetDict.

    Args:
        source: a stage output directory (its ``dataset/`` is used), a directory written by
            ``save_to_disk``, a JSON/JSONL(.gz)/Parquet/CSV file, or a hub dataset name.
        stage: the stage asking, for error messages.
        split: the split name given to the rows of a single file.

    Raises:
        StageError: when the source is missing, unreadable or malformed.
    """
    from datasets import load_dataset, load_from_disk

    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset").is_dir():  # a stage output directory
            path = path / "dataset"
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = load_from_disk(str(path))
            return loaded if isinstance(loaded, DatasetDict) else DatasetDict({split: loaded})
        files = sorted(p for p in path.iterdir() if p.name.endswith(DATA_FILE_SUFFIXES))
        if not files:
            raise StageError(
                stage,
                f"{path} holds no saved dataset and no data files ({', '.join(DATA_FILE_SUFFIXES)}) — "
                "point --dataset_name at a stage output directory or a data file",
            )
        return DatasetDict({p.name.split(".")[0]: _load_file(p, stage) for p in files})
    if path.is_file():
        return DatasetDict({split: _load_file(path, stage)})
    name = str(source)
    if not HUB_NAME.fullmatch(name) or name.endswith(DATA_FILE_SUFFIXES):
        raise StageError(stage, f"dataset not found: {source} — check the path (did the previous stage finish?)")
    try:  # a hub dataset name such as "trl-lib/Capybara"
        loaded = load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure is a user-facing error here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(
            stage, f"dataset not found locally and could not be loaded from the hub: {name} ({first_line}) — "
            "pass a local path"
        ) from None
    return loaded if isinstance(loaded, DatasetDict) else DatasetDict({split: loaded})


def _load_file(path: Path, stage: str) -> Dataset:
    from datasets import load_dataset

    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        records = _read_json_records(path, stage)
        if not records:
            return Dataset.from_dict({})
        try:
            return Dataset.from_list(records)
        except Exception as exc:  # noqa: BLE001 - arrow type conflicts between rows
            raise StageError(stage, f"{path}: rows do not share one schema ({exc}) — make every row's fields "
                             "the same types") from None
    kind = "parquet" if name.endswith(".parquet") else "csv"
    try:
        return load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001
        raise StageError(stage, f"cannot read {path} as {kind}: {exc}") from None


# ----------------------------------------------------------------------------- validation


def _is_messages(value: Any) -> str | None:
    """Return None when `value` is a valid chat (list of {role, content} with str content)."""
    if not isinstance(value, list) or not value:
        return "expected a non-empty list of {role, content} messages"
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            return "every message needs a string 'role'"
        if not isinstance(turn.get("content"), str):
            return "every message needs a string 'content'"
    return None


def _type_check(kind: str) -> Callable[[Any], str | None]:
    checks: dict[str, Callable[[Any], str | None]] = {
        "str": lambda v: None if isinstance(v, str) else f"expected a string, got {type(v).__name__}",
        "text": lambda v: None if isinstance(v, str) and v.strip() else "expected a non-empty string",
        "bool": lambda v: None if isinstance(v, bool) else f"expected true/false, got {type(v).__name__}",
        "int": lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "expected an integer",
        "messages": _is_messages,
        "str|messages": lambda v: None if isinstance(v, str) else _is_messages(v),
        "list[str]": lambda v: None
        if isinstance(v, list) and all(isinstance(x, str) for x in v)
        else "expected a list of strings",
        "list[int]": lambda v: None
        if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        else "expected a list of integers",
    }
    if kind not in checks:
        raise ValueError(f"unknown column kind {kind!r}")
    return checks[kind]


def validate_columns(
    data: DatasetDict,
    stage: str,
    columns: dict[str, str],
    splits: Iterable[str] | None = None,
    max_problems: int = 5,
) -> None:
    """Check that every split has the columns with values of the right kind, and is not empty.

    Reports every problem found (up to `max_problems` per column) in one error.

    Args:
        data: the loaded dataset.
        stage: the stage asking, for the message.
        columns: column name -> kind ("str", "text", "bool", "int", "messages", "str|messages",
            "list[str]", "list[int]").
        splits: which splits to check (default: all).

    Raises:
        StageError: naming each missing column (and which stage produces it), each bad row, each empty split.
    """
    problems: list[str] = []
    for split in splits if splits is not None else list(data):
        if split not in data:
            problems.append(f"split '{split}' is missing (found: {', '.join(data) or 'none'})")
            continue
        rows = data[split]
        missing = [c for c in columns if c not in rows.column_names]
        for column in missing:
            source = PRODUCED_BY.get(column, "the previous stage")
            problems.append(f"split '{split}' has no '{column}' column (produced by {source})")
        if missing:
            continue
        if len(rows) == 0:
            problems.append(f"split '{split}' is empty")
            continue
        for column, kind in columns.items():
            check = _type_check(kind)
            bad = 0
            for index, value in enumerate(rows[column]):
                reason = check(value)
                if reason:
                    if bad < max_problems:
                        problems.append(f"split '{split}' row {index} column '{column}': {reason}")
                    bad += 1
            if bad > max_problems:
                problems.append(f"... and {bad - max_problems} more bad rows in '{column}'")
    if problems:
        raise StageError(stage, "invalid input: " + "; ".join(problems))


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
        """Validate before anything is written: the output does not exist (unless overwriting) and
        any partial run was started with the same config."""
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
        return self.partial

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
        return self.output_dir


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


# ----------------------------------------------------------------------------- config + CLI plumbing


def parse_config(stage: str, dataclass_types: tuple, argv: list[str] | None, module: str | None = None):
    """Parse ``--config file.yaml`` plus CLI overrides into the given dataclasses (TRL's TrlParser).

    Unknown keys (in the YAML or on the command line), unreadable YAML and invalid values raise
    StageError instead of argparse's usage dump. `stage` is the command after `align` (or a whole command
    such as "rag eval"); `module` is where `--help` takes its description (default ``align.<stage>``).
    """
    from trl import TrlParser

    command = stage if " " in stage else f"align {stage}"

    class _Parser(TrlParser):
        def error(self, message: str):  # argparse would print usage and exit
            raise StageError(stage, f"{message} — see `{command} --help`")

    parser = _Parser(dataclass_types, prog=command, allow_abbrev=False,  # a misspelt option is an error
                     description=_first_paragraph(module or f"align.{stage.replace('-', '_')}"))
    args = list(argv) if argv is not None else None
    if args is not None and "--config" in args:
        config_path = Path(args[args.index("--config") + 1]) if args.index("--config") + 1 < len(args) else None
        if config_path is None or not config_path.is_file():
            raise StageError(stage, f"config file not found: {config_path} — pass --config <path to YAML>")
    try:
        return parser.parse_args_and_config(args=args)
    except StageError:
        raise
    except ValueError as exc:
        message = str(exc).splitlines()[0]
        if message.startswith("Some specified arguments are not used"):
            flags = [f for f in re.findall(r"'(--[^']+)'", message)]
            raise StageError(stage, f"unknown option(s): {', '.join(flags)} — see `{command} --help`") from None
        if message.startswith("Unknown arguments from config file"):
            keys = re.findall(r"'--([^']+)'", message)
            raise StageError(
                stage, f"unknown key(s) in the config file: {', '.join(keys)} — remove or fix them "
                f"(`{command} --help` lists every option)"
            ) from None
        raise StageError(stage, f"invalid configuration: {message}") from None
    except Exception as exc:  # noqa: BLE001 - YAML syntax errors and the like
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(stage, f"cannot read the configuration: {first}") from None


def _first_paragraph(module: str) -> str | None:
    import importlib

    try:
        doc = importlib.import_module(module).__doc__ or ""
    except ImportError:
        return None
    return doc.strip().split("\n\n")[0]


def configure_logging() -> None:
    import datasets
    import transformers

    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    logger.setLevel(logging.INFO)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; the training bar stays
    datasets.disable_progress_bars()
    # Library deprecation notices and the CPU pin_memory notice say nothing a user of a stage can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*pin_memory.*")


def run_stage(stage: str, main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a stage's ``main(argv)`` the way every command does: ``--debug`` shows tracebacks,
    a StageError becomes ``error: <stage>: <message>`` on stderr and exit code 2."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    configure_logging()
    try:
        result = main(args)
    except StageError as exc:
        if debug:
            raise
        print(f"error: {exc.stage}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {stage}: interrupted — re-run the same command to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
