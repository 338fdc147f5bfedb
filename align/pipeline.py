"""`align pipeline`: the whole recipe from one YAML, re-running only the stages that are out of date.

Runs self-instruct -> sft -> comparisons -> reward -> judge -> ppo -> evaluate -> rag-eval (any subset, always
in this order), each stage in its own process with the command line it prints, each reading the previous
stage's output directory. A stage is skipped when its finished output's manifest records the same config and its inputs
still have the fingerprints recorded there; `--from STAGE` re-runs that stage and everything after it,
`--only STAGE` just that one. Interrupted? Run the same command again: finished stages are skipped and
the interrupted one resumes from its `.partial` directory.

    align pipeline --config configs/quickstart.yaml
    align pipeline --config configs/quickstart.yaml --dry_run        # the plan and the commands, nothing run
    align pipeline --config configs/quickstart.yaml --from reward    # reward, ppo, rag-eval again
    align pipeline --config configs/quickstart.yaml --only rag-eval

The YAML:

    output_dir: runs/quickstart              # stage S writes <output_dir>/<S> unless it sets output_dir
    model_name_or_path: smollm2-135m-instruct  # optional: the model of every stage that does not name one
    stages:
      self-instruct:
        config: configs/self-instruct.yaml   # optional: the stage's own YAML; the keys below override it
        num_instructions: 16
      sft: {config: configs/sft.yaml}        # dataset_name: wired to the self-instruct output
      ...

Inputs are wired from the stages present: sft and ppo read self-instruct's dataset, comparisons
(`source: sample`) samples from the SFT adapter on self-instruct's prompts, reward reads comparisons (on
top of the SFT model, as InstructGPT does), judge (an `align reward` of another family, e.g.
`configs/reward_embedding.yaml`) reads the same comparisons, ppo starts from the SFT adapter with the reward
model, evaluate scores base, base+SFT and base+PPO on the prompts PPO held out with the reward model (the
proxy) and the judge (gold), and rag-eval compares base, base+SFT and base+PPO. An option set in a stage's
section wins over wiring.
A stage name that does not exist, or an input that reads a later stage, the wrong kind of stage or a path
that nothing produces, is an error before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from align.core.command import StageError, parse_config, run_stage
from align.core.inputs import HUB_NAME
from align.core.outputs import MANIFEST, NOT_IDENTITY, changed_keys, fingerprint, strip_secrets

STAGE = "pipeline"
logger = logging.getLogger("align")


@dataclass(frozen=True)
class StageSpec:
    """How the pipeline runs one stage and what it reads."""

    command: tuple[str, ...]  # module run with `python -m`, then the sub-command
    parser_name: str  # the stage's name in its own errors ("sft", "rag eval")
    config_module: str  # holds CONFIG_CLASSES
    run_config: str  # "module:function" computing the config its manifest records
    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # option -> stages whose output it may read
    directories: tuple[str, ...] = ()  # input options that must be a finished stage directory (adapters)


STAGES: dict[str, StageSpec] = {
    "self-instruct": StageSpec(("align.cli", "self-instruct"), "self-instruct", "align.self_instruct",
                               "align.self_instruct:run_config"),
    "sft": StageSpec(("align.cli", "sft"), "sft", "align.sft", "align.lm.training:run_config",
                     {"dataset_name": ("self-instruct",)}),
    "comparisons": StageSpec(("align.cli", "comparisons"), "comparisons", "align.comparisons",
                             "align.comparisons:run_config",
                             {"input_path": ("self-instruct",), "adapter": ("sft",)}, ("adapter",)),
    "reward": StageSpec(("align.cli", "reward"), "reward", "align.reward", "align.lm.training:run_config",
                        {"dataset_name": ("comparisons",), "sft_adapter": ("sft",)}, ("sft_adapter",)),
    # A judge of another family (`align reward --backbone embedding`): PPO never optimises it.
    "judge": StageSpec(("align.cli", "reward"), "reward", "align.reward", "align.lm.training:run_config",
                       {"dataset_name": ("comparisons",)}),
    "ppo": StageSpec(("align.cli", "ppo"), "ppo", "align.ppo", "align.ppo:run_config",
                     {"dataset_name": ("self-instruct",), "sft_adapter": ("sft",), "reward_model": ("reward",)},
                     ("sft_adapter", "reward_model")),
    "evaluate": StageSpec(("align.cli", "evaluate"), "evaluate", "align.evaluate", "align.evaluate:run_config",
                          {"dataset_name": ("ppo",)}, ("dataset_name",)),
    "rag-eval": StageSpec(("rag.cli", "eval"), "rag eval", "rag.evaluate", "rag.evaluate:run_config"),
}
ORDER = list(STAGES)
# Which stages' adapters `rag-eval` and `evaluate` compare with the base model, under which name.
RAG_MODELS = {"sft": "sft", "ppo": "ppo"}
# The judges `evaluate` scores with: the reward model PPO optimised (the proxy) and the other-family judge.
JUDGES = {"reward": "proxy", "judge": "gold"}
# Stages that take no `model_name_or_path` (they name their models in entries).
NO_MODEL = {"rag-eval", "evaluate"}
TOP_LEVEL_KEYS = {"output_dir", "model_name_or_path", "stages"}


@dataclass
class PlannedStage:
    name: str
    spec: StageSpec
    options: dict[str, Any]  # everything passed on the command line after --config
    base_config: str | None
    output_dir: Path
    parsed: tuple = ()

    def argv(self) -> list[str]:
        args = ["--config", self.base_config] if self.base_config else []
        for key, value in self.options.items():
            if value is None:
                continue
            if isinstance(value, (list, tuple)):
                args += [f"--{key}", *map(_flag_value, value)]
            else:
                args += [f"--{key}", _flag_value(value)]
        return args

    def command_line(self) -> str:
        program = "align" if self.spec.command[0] == "align.cli" else "rag"
        return " ".join([program, *self.spec.command[1:], *map(_quote, self.argv())])


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _quote(text: str) -> str:
    return text if text and all(c.isalnum() or c in "-_./=+:@," for c in text) else json.dumps(text)


# ----------------------------------------------------------------------------- planning


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise StageError(STAGE, f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise StageError(STAGE, f"{path} is not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise StageError(STAGE, f"{path} must be a mapping of options, got {type(data).__name__}")
    return data


def _same_path(a: Any, b: Path) -> bool:
    return isinstance(a, str) and Path(a).expanduser().resolve() == b.expanduser().resolve()


def _producer(value: Any, planned: list[PlannedStage]) -> PlannedStage | None:
    return next((p for p in planned if _same_path(value, p.output_dir)), None)


def plan(config_path: str | Path, output_dir: str | None = None) -> list[PlannedStage]:
    """Read the pipeline YAML, wire the stages together and check every stage's options and inputs.

    Nothing is written and no model is loaded. Raises StageError on an unknown stage or key, a stage
    option its parser rejects, or inputs that do not chain.
    """
    config_path = Path(config_path)
    config = _read_yaml(config_path, "pipeline config")
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise StageError(STAGE, f"{config_path}: unknown key(s) {', '.join(unknown)} — the top level takes "
                         f"{', '.join(sorted(TOP_LEVEL_KEYS))}")
    stages = config.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise StageError(STAGE, f"{config_path}: `stages` must map stage names to their options — stages: "
                         f"{', '.join(ORDER)}")
    for name in stages:
        if name not in STAGES:
            raise StageError(STAGE, f"{config_path}: unknown stage '{name}' — choose from {', '.join(ORDER)}")
        if stages[name] is not None and not isinstance(stages[name], dict):
            raise StageError(STAGE, f"{config_path}: stage '{name}' must map option names to values")
    root = Path(output_dir or config.get("output_dir") or "runs/pipeline")
    model = config.get("model_name_or_path")

    names = [n for n in ORDER if n in stages]
    outputs = {n: Path(str((stages[n] or {}).get("output_dir") or root / n)) for n in names}
    if len({str(p.resolve()) for p in outputs.values()}) < len(outputs):
        raise StageError(STAGE, f"{config_path}: two stages write the same output_dir — give each its own")
    planned: list[PlannedStage] = []
    for name in names:
        options = dict(stages[name] or {})
        base = options.pop("config", None)
        if base is not None:
            base = str(base)
            _read_yaml(Path(base), f"stage '{name}' config")
        explicit = set(options)
        if model is not None and name not in NO_MODEL and "model_name_or_path" not in explicit:
            options["model_name_or_path"] = model
        options["output_dir"] = str(outputs[name])
        stage = PlannedStage(name, STAGES[name], options, base, outputs[name])
        _wire(stage, explicit, planned, model)
        stage.parsed = _parse(stage)
        if name == "comparisons" and stage.parsed[0].source != "sample":
            for key in stage.spec.inputs:  # importing human rankings: nothing upstream to read
                if key not in explicit:
                    stage.options.pop(key, None)
            stage.parsed = _parse(stage)
        planned.append(stage)
        _check_chain(stage, planned, outputs)
        source = _producer(_option(stage, "dataset_name"), planned[:-1]) if name == "evaluate" else None
        if source is not None and source.name == "ppo" and not _option(source, "eval_prompts"):
            raise StageError(STAGE, "stage 'evaluate' reads the prompts stage 'ppo' holds out of training, but it "
                             "holds out none — set eval_prompts in the ppo section")
    return planned


def _wire(stage: PlannedStage, explicit: set[str], planned: list[PlannedStage], model: str | None) -> None:
    by_name = {p.name: p for p in planned}
    for key, producers in stage.spec.inputs.items():
        source = next((by_name[p] for p in producers if p in by_name), None)
        if source is not None and key not in explicit:
            stage.options[key] = str(source.output_dir)
    if stage.name == "rag-eval" and "models" not in explicit:
        trained = next((p for p in planned if p.name in RAG_MODELS), None)
        base = model or (trained.parsed[0].model_name_or_path if trained is not None else None)
        if base is not None:  # else the models of the stage's own config
            stage.options["models"] = [f"base={base}"] + [
                f"{RAG_MODELS[p.name]}={base}+{p.output_dir}" for p in planned if p.name in RAG_MODELS]
    if stage.name == "evaluate":  # base, SFT and PPO against SFT (when there), by the proxy and the gold judge
        trained = next((p for p in planned if p.name in RAG_MODELS), None)
        base = model or (trained.parsed[0].model_name_or_path if trained is not None else None)
        if base is not None and "policies" not in explicit:
            stage.options["policies"] = [f"base={base}"] + [
                f"{RAG_MODELS[p.name]}={base}+{p.output_dir}" for p in planned if p.name in RAG_MODELS]
        if "baseline" not in explicit and "sft" in by_name:
            stage.options["baseline"] = "sft"
        if "judges" not in explicit and any(p.name in JUDGES for p in planned):
            stage.options["judges"] = [f"{JUDGES[p.name]}={p.output_dir}" for p in planned if p.name in JUDGES]


def _parse(stage: PlannedStage) -> tuple:
    module = importlib.import_module(stage.spec.config_module)
    try:
        return tuple(parse_config(stage.spec.parser_name, module.CONFIG_CLASSES, stage.argv(),
                                  module=stage.spec.config_module))
    except StageError as exc:
        raise StageError(STAGE, [f"stage '{stage.name}': {line}" for line in exc.lines]) from None


def _option(stage: PlannedStage, key: str) -> Any:
    for parsed in stage.parsed:
        if hasattr(parsed, key):
            return getattr(parsed, key)
    return None


def _reads(stage: PlannedStage) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """(option, path, stages that may produce it, must be a finished stage directory) for every input."""
    reads = [(key, _option(stage, key), producers, key in stage.spec.directories)
             for key, producers in stage.spec.inputs.items() if _option(stage, key) is not None]
    if stage.name in ("rag-eval", "evaluate"):
        key = "models" if stage.name == "rag-eval" else "policies"
        reads += [(key, adapter, tuple(RAG_MODELS), True) for entry in _option(stage, key) or []
                  for adapter in entry.partition("=")[2].split("+")[1:]]
    if stage.name == "evaluate":
        reads += [("judges", entry.partition("=")[2], tuple(JUDGES), True) for entry in _option(stage, "judges") or []]
    return reads


def _check_chain(stage: PlannedStage, planned: list[PlannedStage], outputs: dict[str, Path]) -> None:
    """Every input an earlier stage of the right kind produces, or a finished directory / existing data."""
    later = [n for n in outputs if ORDER.index(n) > ORDER.index(stage.name)]
    for key, value, producers, must_be_directory in _reads(stage):
        source = _producer(value, planned[:-1])
        where = f"stage '{stage.name}' option {key}={value}"
        if source is not None:
            if source.name not in producers:
                raise StageError(STAGE, f"{where} reads the output of '{source.name}', but '{stage.name}' needs "
                                 f"a {' or '.join(producers)} output there — point it at one")
            continue
        reader = next((n for n in [stage.name, *later] if _same_path(value, outputs[n])), None)
        if reader is not None:
            whose = "its own output" if reader == stage.name else f"the output of '{reader}', which runs after it"
            raise StageError(STAGE, f"{where} reads {whose} — point it at an earlier stage's output")
        path = Path(str(value)).expanduser()
        if path.exists():
            if must_be_directory and not (path / MANIFEST).is_file():
                raise StageError(STAGE, f"{where} is not a finished stage output (no {MANIFEST}) — run the stage "
                                 "that writes it first")
            continue
        if not must_be_directory and HUB_NAME.fullmatch(str(value)) and not Path(str(value).split("/")[0]).exists():
            continue  # a hub dataset name such as "trl-lib/Capybara"
        raise StageError(STAGE, f"{where}: {value} does not exist and no earlier stage in the pipeline writes it — "
                         f"add the stage that produces it, or point {key} at an existing "
                         f"{' or '.join(producers)} output")


# ----------------------------------------------------------------------------- up to date?


def _identity(config: Any) -> Any:
    """A config as its manifest stores it (JSON, secrets stripped), without the options that are not part of a
    run's identity (at any depth: `rag eval` nests its groups)."""
    config = json.loads(json.dumps(strip_secrets(config), default=str))

    def drop(value):
        if isinstance(value, dict):
            return {k: drop(v) for k, v in value.items() if k not in NOT_IDENTITY}
        return value

    return drop(config)


def stale_reason(stage: PlannedStage) -> str | None:
    """None when `stage`'s finished output matches its config and its inputs' fingerprints, else why not."""
    manifest_path = stage.output_dir / MANIFEST
    if not manifest_path.is_file():
        return "no finished output"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return f"{manifest_path} is unreadable"
    module_name, _, function = stage.spec.run_config.partition(":")
    expected = _identity(getattr(importlib.import_module(module_name), function)(*stage.parsed))
    recorded = _identity(manifest.get("config", {}))
    if expected != recorded:
        changed = sorted(changed_keys(recorded, expected))
        return f"config changed ({', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})"
    for name, source in manifest.get("inputs", {}).items():
        if fingerprint(source["path"]) != source["fingerprint"]:
            return f"input '{name}' changed ({source['path']})"
    return None


# ----------------------------------------------------------------------------- running


def select(planned: list[PlannedStage], start: str | None, only: str | None) -> set[str]:
    """The stages to run whatever their state (--from / --only); the rest run only when out of date."""
    names = [p.name for p in planned]
    for flag, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            known = "" if value in STAGES else " (not a stage)"
            raise StageError(STAGE, f"{flag} {value}{known}: the pipeline's stages are {', '.join(names)}")
    if start is not None and only is not None:
        raise StageError(STAGE, "--from and --only exclude each other — pass one")
    if only is not None:
        return {only}
    if start is not None:
        return set(names[names.index(start):])
    return set()


def run(planned: list[PlannedStage], forced: set[str], only: str | None, dry_run: bool, restart: bool) -> int:
    total = len(planned)
    if only is not None:  # the stages before it must be finished already
        stage = next(p for p in planned if p.name == only)
        for upstream in planned[:planned.index(stage)]:
            if not (upstream.output_dir / MANIFEST).is_file() and any(
                    _same_path(v, upstream.output_dir) for _, v, _, _ in _reads(stage)):
                raise StageError(STAGE, f"--only {only} reads {upstream.output_dir}, which '{upstream.name}' has "
                                 "not finished — run the pipeline without --only first")
    remade: list[PlannedStage] = []
    for number, stage in enumerate(planned, start=1):
        head = f"[{number}/{total}] {stage.name}"
        if only is not None and stage.name != only:
            continue
        upstream = next((p.name for p in remade if any(_same_path(v, p.output_dir) for _, v, _, _ in _reads(stage))),
                        None)
        if stage.name in forced:
            reason = "forced (--from/--only)"
        elif upstream is not None:
            reason = f"its input from '{upstream}' is made again"
        else:
            reason = stale_reason(stage)
        if reason is None:
            print(f"{head}: up to date, skipped ({stage.output_dir})", flush=True)
            continue
        argv = stage.argv()
        if stage.output_dir.exists():
            argv += ["--overwrite_output_dir", "true"]
        if restart:
            argv += ["--restart", "true"]
        print(f"{head}: runs — {reason}\n  $ {stage.command_line()}", flush=True)
        remade.append(stage)
        if dry_run:
            continue
        started = time.time()
        result = subprocess.run([sys.executable, "-m", *stage.spec.command, *argv])
        if result.returncode != 0:
            print(f"pipeline stopped at '{stage.name}' (exit code {result.returncode}); finished stages are kept — "
                  "fix the problem and run the same command again", file=sys.stderr, flush=True)
            return result.returncode
        print(f"{head}: done in {_duration(time.time() - started)} -> {stage.output_dir}", flush=True)
    return 0


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ----------------------------------------------------------------------------- the summary


def summary(planned: list[PlannedStage]) -> list[str]:
    """Where the outputs are and the headline numbers, from the finished stages' manifests."""
    lines = ["", "Outputs and headline numbers:"]
    for stage in planned:
        path = stage.output_dir / MANIFEST
        if not path.is_file():
            lines.append(f"  {stage.name:<13} (not finished) {stage.output_dir}")
            continue
        metrics = json.loads(path.read_text()).get("metrics", {})
        lines.append(f"  {stage.name:<13} {_headline(stage, metrics)}")
    return lines


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "n/a"


def _headline(stage: PlannedStage, m: dict) -> str:
    out = stage.output_dir
    if stage.name == "self-instruct":
        return (f"{m.get('generated_tasks')} new tasks, {m.get('rows')} rows (acceptance "
                f"{_num(m.get('acceptance_rate'), 2)}) -> {out / 'dataset'}")
    if stage.name == "sft":
        return (f"held-out loss {_num(m.get('eval_loss_before'))} (base) -> {_num(m.get('eval_loss'))}; "
                f"adapter {out / 'adapter'}")
    if stage.name == "comparisons":
        rows = m.get("rows", {})
        shown = ", ".join(f"{k} {v}" for k, v in rows.items()) if isinstance(rows, dict) else rows
        return f"ranked prompts: {shown} -> {out / 'dataset'}"
    if stage.name in ("reward", "judge"):
        weights = out / "judge" if (out / "judge").is_dir() else out / "adapter"  # an embedding judge: a head
        return (f"held-out ranking accuracy {_num(m.get('eval_accuracy_before'))} (untrained) -> "
                f"{_num(m.get('eval_accuracy'))} on {m.get('eval_pairs', 'n/a')} pairs; {weights}")
    if stage.name == "ppo":
        if m.get("eval_reward_before") is not None:
            reward = (f"reward on {m.get('eval_prompts')} held-out prompts {_num(m['eval_reward_before'])} (SFT) -> "
                      f"{_num(m.get('eval_reward_after'))} (PPO)")
        else:
            reward = (f"reward of sampled responses {_num(m.get('score_first'))} (first iterations) -> "
                      f"{_num(m.get('score_last'))} (last)")
        return f"{reward}, KL {_num(m.get('kl_last'))}; adapter {out / 'adapter'}"
    if stage.name == "evaluate":
        return f"report {out / 'report.md'}" + "".join(f"\n      {line}" for line in m.get("headline", []))
    if stage.name == "rag-eval":
        parts = []
        for model, cells in m.items():
            shown = " ".join(f"{cell} {_num(rate)}" for cell, rate in cells.items())
            parts.append(f"\n      {model:<6} {shown}")
        return f"report {out / 'report.md'}; accuracy:" + "".join(parts)
    return str(out)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    doc = (__doc__ or "").strip().split("\n\n")
    parser = argparse.ArgumentParser(prog="align pipeline", description=doc[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(doc[1:]))
    parser.add_argument("--config", required=True, help="The pipeline YAML (e.g. configs/quickstart.yaml).")
    parser.add_argument("--output_dir", help="Where the stages write (default: the YAML's output_dir).")
    parser.add_argument("--from", dest="start", metavar="STAGE", help="Re-run this stage and every later one.")
    parser.add_argument("--only", metavar="STAGE", help="Run just this stage (its inputs must be finished).")
    parser.add_argument("--dry_run", action="store_true", help="Print what would run, with the commands; run nothing.")
    parser.add_argument("--restart", action="store_true",
                        help="Discard unfinished (.partial) runs of the stages that run instead of resuming them.")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def refuse(message: str):
        raise StageError(STAGE, f"{message} — see `align pipeline --help`")

    parser.error = refuse  # one line instead of argparse's usage dump
    args = parser.parse_args(argv)
    planned = plan(args.config, args.output_dir)
    forced = select(planned, args.start, args.only)
    code = run(planned, forced, args.only, args.dry_run, args.restart)
    if code == 0 and not args.dry_run:
        print("\n".join(summary(planned)), flush=True)
    return code


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
