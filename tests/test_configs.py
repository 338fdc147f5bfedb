"""Every YAML under configs/ parses: stage configs into their stage's dataclasses, accelerate profiles
into accelerate's config class."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from align.core.command import parse_config
from tests.conftest import ROOT

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    """The real and tiny configs of every stage are shipped."""
    names = {str(p.relative_to(ROOT / "configs")) for p in CONFIGS}
    stages = ("self-instruct", "sft", "comparisons", "reward", "ppo")
    assert {f"{stage}.yaml" for stage in stages} | {f"tiny/{stage}.yaml" for stage in stages} <= names
    assert {"accelerate/ddp.yaml", "accelerate/deepspeed-zero3.yaml", "accelerate/fsdp.yaml"} <= names
    assert {"quickstart.yaml", "tiny/pipeline.yaml"} <= names
    assert {"rag/eval.yaml", "rag/eval-nq.yaml", "rag/eval-kv.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_parses(path: Path, tmp_path):
    """The file opens with a comment saying how to launch it, and parses with no unknown keys."""
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} should open with a comment on how to launch it"
    if path.parent.name == "accelerate":
        from accelerate.commands.config.config_args import load_config_from_file

        config = load_config_from_file(str(path))
        assert config.num_processes >= 1
        return
    if path.stem in ("quickstart", "pipeline"):  # pipeline configs: every stage parses and the inputs chain
        from align.pipeline import plan

        planned = plan(path, output_dir=str(tmp_path))
        assert [p.name for p in planned] == ["self-instruct", "sft", "comparisons", "reward", "judge", "ppo",
                                             "evaluate", "rag-eval"]
        assert "align pipeline --config" in text
        return
    if path.parent.name == "rag":  # rag/<command>[-variant].yaml
        command = path.stem.split("-")[0]
        module = importlib.import_module({"eval": "rag.evaluate"}[command])
        stage, launch = f"rag {command}", f"rag {command} --config"
    else:  # <stage>[_variant].yaml
        stage = path.stem.split("_")[0]
        module = importlib.import_module(f"align.{stage.replace('-', '_')}")
        launch = f"align {stage} --config"
    parsed = parse_config(stage, module.CONFIG_CLASSES, ["--config", str(path), "--output_dir", str(tmp_path)])
    assert len(parsed) == len(module.CONFIG_CLASSES)
    assert launch in text or f"-m align.{stage} --config" in text
