"""`align pipeline`: the tiny model through every stage on datasets on disk, skipping up-to-date stages,
--from/--only, and configs that fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from align import pipeline
from align.core.command import parse_config
from align.core.outputs import read_manifest
from tests.conftest import ROOT, run_align

TINY_PIPELINE = ROOT / "configs" / "tiny" / "pipeline.yaml"
STAGES = ["self-instruct", "sft", "comparisons", "reward", "judge", "ppo", "evaluate", "rag-eval"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    result = run_align("pipeline", "--config", TINY_PIPELINE, "--output_dir", out, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def stage_lines(stdout: str) -> dict[str, str]:
    """stage -> its status line ("[n/6] stage: ...")."""
    lines = {}
    for line in stdout.splitlines():
        for stage in STAGES:
            if line.startswith("[") and f"] {stage}: " in line and stage not in lines:
                lines[stage] = line
    return lines


def test_every_stage_runs_on_the_previous_stages_output(finished):
    """Each stage ran, reading the output directory of the stage before it, and the summary names the outputs."""
    out, result = finished
    manifests = {stage: read_manifest(out / stage) for stage in STAGES}
    assert all(" runs — " in line for line in stage_lines(result.stdout).values())
    assert manifests["sft"]["inputs"]["dataset"]["path"] == str(out / "self-instruct")
    assert manifests["comparisons"]["config"]["sampling"]["adapter"] == str(out / "sft")
    assert manifests["comparisons"]["inputs"]["input"]["path"] == str(out / "self-instruct")
    assert manifests["reward"]["inputs"]["dataset"]["path"] == str(out / "comparisons")
    assert manifests["reward"]["depends_on"] == {"sft_adapter": str(out / "sft")}  # InstructGPT: RM from the SFT model
    assert {k: v["path"] for k, v in manifests["ppo"]["inputs"].items()} == {
        "dataset": str(out / "self-instruct"), "sft_adapter": str(out / "sft"), "reward_model": str(out / "reward")}
    models = manifests["rag-eval"]["base_model"]
    assert set(models) == {"base", "sft", "ppo"}
    assert models["sft"]["adapters"] == [str(out / "sft")]
    assert models["ppo"]["adapters"] == [str(out / "sft"), str(out / "ppo")]  # PPO is evaluated on its SFT model
    assert manifests["judge"]["config"]["model"]["backbone"] == "embedding"
    assert manifests["judge"]["inputs"]["dataset"]["path"] == str(out / "comparisons")
    # the report: base, SFT and PPO on the prompts PPO held out, against SFT, by the proxy and the other judge
    report = manifests["evaluate"]
    assert report["inputs"]["dataset"]["path"] == str(out / "ppo")
    assert report["base_model"]["ppo"]["adapters"] == [str(out / "sft"), str(out / "ppo")]
    assert report["config"]["evaluate"]["judges"] == [f"proxy={out / 'reward'}", f"gold={out / 'judge'}"]
    assert report["metrics"]["baseline"] == "sft" and report["metrics"]["proxy"] == "proxy"
    assert report["metrics"]["prompts"] == 2  # the ppo section holds out 2
    assert "Outputs and headline numbers:" in result.stdout
    assert f"report {out / 'rag-eval' / 'report.md'}" in result.stdout
    assert f"report {out / 'evaluate' / 'report.md'}\n      gold: " in result.stdout
    assert not list(out.glob("*.partial"))


def test_a_second_invocation_skips_every_stage(finished):
    out, _ = finished
    before = {stage: (out / stage / "manifest.json").stat().st_mtime_ns for stage in STAGES}
    result = run_align("pipeline", "--config", TINY_PIPELINE, "--output_dir", out)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = stage_lines(result.stdout)
    assert list(lines) == STAGES
    assert all(": up to date, skipped" in line for line in lines.values()), lines
    assert {stage: (out / stage / "manifest.json").stat().st_mtime_ns for stage in STAGES} == before
    assert "Outputs and headline numbers:" in result.stdout


def test_from_only_and_a_changed_option_plan_the_right_stages(finished, tmp_path, capsys):
    """--from re-runs a stage and the rest; --only one stage; a changed option re-runs that stage and what reads it."""
    out, _ = finished

    def plan(*args: str, config: Path = TINY_PIPELINE) -> dict[str, str]:
        assert pipeline.cli(["--config", str(config), "--output_dir", str(out), "--dry_run", *args]) == 0
        return stage_lines(capsys.readouterr().out)

    lines = plan("--from", "ppo")
    assert [s for s, line in lines.items() if " runs — " in line] == ["ppo", "evaluate", "rag-eval"]
    assert all("up to date" in lines[s] for s in STAGES[:5])
    assert list(plan("--only", "reward")) == ["reward"]

    changed = yaml.safe_load(TINY_PIPELINE.read_text())
    changed["stages"]["ppo"]["total_steps"] = 3
    config = tmp_path / "changed.yaml"
    config.write_text(yaml.safe_dump(changed))
    lines = plan(config=config)
    assert "config changed (data.total_steps)" in lines["ppo"], lines["ppo"]
    assert "its input from 'ppo' is made again" in lines["rag-eval"]
    assert "its input from 'ppo' is made again" in lines["evaluate"]
    assert all("up to date" in lines[s] for s in STAGES[:5])


def test_a_changed_input_file_reruns_the_stage(tmp_path, capsys):
    """A stage whose input's fingerprint changed is out of date."""
    planned = pipeline.plan(TINY_PIPELINE, tmp_path / "run")
    sft = next(p for p in planned if p.name == "sft")
    data = tmp_path / "data.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    sft.output_dir.mkdir(parents=True)
    module, _, function = sft.spec.run_config.partition(":")
    import importlib

    config = getattr(importlib.import_module(module), function)(*sft.parsed)
    from align.core.outputs import fingerprint, write_manifest

    write_manifest(sft.output_dir, {"stage": "sft", "config": json.loads(json.dumps(config, default=str)),
                                    "inputs": {"dataset": {"path": str(data), "fingerprint": fingerprint(data)}}})
    assert pipeline.stale_reason(sft) is None
    data.write_text(data.read_text() * 2)
    assert pipeline.stale_reason(sft) == f"input 'dataset' changed ({data})"


def write_config(tmp_path: Path, stages: dict, **top) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "model_name_or_path": "tiny-llama",
                                    **top, "stages": stages}))
    return path


TINY = {name: {"config": f"configs/tiny/{name}.yaml"} for name in ("self-instruct", "sft", "comparisons", "reward")}


@pytest.mark.parametrize("stages, top, message", [
    ({"sft": {}, "dpo": {}}, {}, "unknown stage 'dpo' — choose from self-instruct, sft, comparisons, reward, judge, "
                                 "ppo, evaluate, rag-eval"),
    ({"sft": {"learning_rat": 0.1}}, {}, "stage 'sft': unknown option(s): --learning_rat"),
    ({"sft": {}}, {"epochs": 2}, "unknown key(s) epochs"),
    ({**TINY, "reward": {"config": "configs/tiny/reward.yaml", "dataset_name": "{out}/self-instruct"}}, {},
     "stage 'reward' option dataset_name={out}/self-instruct reads the output of 'self-instruct', but 'reward' "
     "needs a comparisons output there"),
    ({"sft": {"config": "configs/tiny/sft.yaml", "dataset_name": "{out}/reward"}, "reward": TINY["reward"]}, {},
     "reads the output of 'reward', which runs after it"),
    ({"ppo": {"config": "configs/tiny/ppo.yaml", "reward_model": "{tmp}/no-such-reward-model"}}, {},
     "does not exist and no earlier stage in the pipeline writes it"),
    ({"ppo": {"config": "configs/tiny/ppo.yaml", "reward_model": "data"}}, {},
     "reward_model=data is not a finished stage output (no manifest.json)"),
    ({**TINY, "ppo": {"config": "configs/tiny/ppo.yaml"}, "evaluate": {"config": "configs/tiny/evaluate.yaml"}}, {},
     "stage 'evaluate' reads the prompts stage 'ppo' holds out of training, but it holds out none"),
], ids=["unknown-stage", "unknown-option", "unknown-top-level-key", "wrong-producer", "later-stage", "missing-input",
        "not-a-stage-output", "evaluate-without-held-out-prompts"])
def test_configs_that_cannot_run_fail_before_any_work(tmp_path, capsys, stages, top, message):
    out = tmp_path / "out"
    stages = json.loads(json.dumps(stages).replace("{out}", str(out)).replace("{tmp}", str(tmp_path)))
    config = write_config(tmp_path, stages, **top)
    assert pipeline.cli(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pipeline: "), err
    assert message.replace("{out}", str(out)) in err[0]
    assert not out.exists()


def test_only_needs_its_inputs_finished(tmp_path, capsys):
    config = write_config(tmp_path, {**TINY})
    assert pipeline.cli(["--config", str(config), "--only", "reward"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only reward reads" in err[0] and "has not finished" in err[0], err
    assert pipeline.cli(["--config", str(config), "--from", "dpo"]) == 2
    assert "--from dpo (not a stage)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_pipeline_script_is_the_quickstart_chain(tmp_path):
    """scripts/run_pipeline.sh runs, stage by stage, exactly the configs `align pipeline` plans for quickstart.yaml."""
    import importlib
    import re
    import shlex

    out = "runs/chain"
    text = (ROOT / "scripts" / "run_pipeline.sh").read_text().replace("\\\n", " ")
    values = {"OUT": out, "MODEL": "smollm2-135m-instruct"}
    commands = {}
    for line in text.splitlines():
        if not line.startswith(("align ", "rag eval ")):
            continue
        words = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), line))
        words = [w for w in words if not w.startswith("${REPLACE")]  # --overwrite_output_dir: not the run's config
        name = Path(words[words.index("--output_dir") + 1]).name  # the stage's own directory
        commands[name] = words[2:]
    planned = pipeline.plan(ROOT / "configs" / "quickstart.yaml", output_dir=out)
    assert list(commands) == [p.name for p in planned]
    for stage in planned:
        module = importlib.import_module(stage.spec.config_module)
        where, _, name = stage.spec.run_config.partition(":")
        function = getattr(importlib.import_module(where), name)
        script = function(*parse_config(stage.spec.parser_name, module.CONFIG_CLASSES, commands[stage.name]))
        assert pipeline._identity(script) == pipeline._identity(function(*stage.parsed)), stage.name
