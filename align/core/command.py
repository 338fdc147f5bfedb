"""How every command runs: `StageError` (a problem the user can fix), config parsing, logging, exit codes.

A command's `main(argv)` raises `StageError` for anything the user can fix; `run_stage` turns it into
one line on stderr, ``error: <stage>: <what is wrong> — <how to fix>``, and exit code 2 (`--debug`
shows the traceback instead). No torch here: `align --help` and `rag --help` stay instant."""

from __future__ import annotations

import datetime as _dt
import importlib
import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from align.core.options import find_option_problems

logger = logging.getLogger("align")


class StageError(Exception):
    """A problem the user can fix (bad input, bad config, missing model), or several found at once.

    Rendered by the CLI as ``error: <stage>: <message>`` with exit code 2, no traceback: one such line per
    problem when `message` is a list of them.
    """

    def __init__(self, stage: str, message: str | Sequence[str]):
        self.lines = [message] if isinstance(message, str) else list(message)
        self.stage = stage
        self.message = "; ".join(self.lines)
        super().__init__(self.message)

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


# What to undo when a command fails: e.g. a working directory it made that holds nothing to resume from.
_ON_FAILURE: list[Callable[[], None]] = []


def on_failure(undo: Callable[[], None]) -> Callable[[], None]:
    """Run `undo` if the command ends in an error (see `run_stage`); returns `undo`, to pass to `done`."""
    _ON_FAILURE.append(undo)
    return undo


def done(undo: Callable[[], None]) -> None:
    """The work `undo` would clean up is complete: forget it."""
    if undo in _ON_FAILURE:
        _ON_FAILURE.remove(undo)


def _undo_failed_work() -> None:
    while _ON_FAILURE:
        _ON_FAILURE.pop()()


def parse_config(stage: str, dataclass_types: tuple, argv: list[str] | None, module: str | None = None):
    """Parse ``--config file.yaml`` plus CLI overrides into the given dataclasses (TRL's TrlParser), and check
    every value.

    Unknown keys (in the YAML or on the command line), unreadable YAML and invalid values raise
    StageError instead of argparse's usage dump. `stage` is the command after `align` (or a whole command
    such as "rag eval"); `module` is where `--help` takes its description (default ``align.<stage>``) and
    where the command's own option rules live (`OPTION_RULES`, `option_problems`, see `align.core.options`):
    every out-of-range value is reported at once, one line each.
    """
    from trl import TrlParser

    command = stage if " " in stage else f"align {stage}"

    class _Parser(TrlParser):
        def error(self, message: str):  # argparse would print usage and exit
            raise StageError(stage, f"{message} — see `{command} --help`")

    module = module or f"align.{stage.replace('-', '_')}"
    parser = _Parser(dataclass_types, prog=command, allow_abbrev=False,  # a misspelt option is an error
                     description=_first_paragraph(module))
    args = list(argv) if argv is not None else None
    if args is not None and "--config" in args:
        config_path = Path(args[args.index("--config") + 1]) if args.index("--config") + 1 < len(args) else None
        if config_path is None or not config_path.is_file():
            raise StageError(stage, f"config file not found: {config_path} — pass --config <path to YAML>")
    try:
        parsed = parser.parse_args_and_config(args=args)
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
    owner = sys.modules.get(module)
    problems = find_option_problems(tuple(parsed), getattr(owner, "OPTION_RULES", None),
                               getattr(owner, "option_problems", None))
    if problems:
        raise StageError(stage, [f"{problem} — see `{command} --help`" for problem in problems])
    return parsed


def _first_paragraph(module: str) -> str | None:
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
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    configure_logging()
    _ON_FAILURE.clear()  # only this command's own work is undone
    try:
        result = main(args)
    except StageError as exc:
        _undo_failed_work()
        if debug:
            raise
        for line in exc.lines:
            print(f"error: {exc.stage}: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # resumable: the working directory stays
        _ON_FAILURE.clear()
        print(f"error: {stage}: interrupted — re-run the same command to resume", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
