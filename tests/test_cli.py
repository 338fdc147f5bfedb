"""The `align` and `rag` commands: help texts and dispatch."""

from __future__ import annotations

import dataclasses

from align import cli, sft
from rag import cli as rag_cli
from tests.conftest import run_align


def test_align_help_lists_every_stage(capsys):
    """`align --help` exits 0 and names each stage with its summary."""
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for stage, (_, summary) in cli.STAGES.items():
        assert stage in out and summary in out


def test_unknown_stage_is_one_line_and_exit_code_2(capsys):
    """A typo in the stage name gives exit code 2 and one line listing the stages."""
    assert cli.main(["sfft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: align: unknown stage 'sfft'") and "sft" in err[0]


def test_sft_help_explains_every_option():
    """`align sft --help` (a fresh process) lists every field of the stage's dataclasses with its help text."""
    result = run_align("sft", "--help")
    assert result.returncode == 0, result.stderr
    for config_class in sft.CONFIG_CLASSES:
        for field in dataclasses.fields(config_class):
            if not field.init:
                continue
            assert f"--{field.name}" in result.stdout, field.name
    for field in dataclasses.fields(sft.SFTDataArguments):
        help_text = field.metadata["help"]
        assert " ".join(help_text.split()[:4]) in " ".join(result.stdout.split()), field.name
    assert "Supervised fine-tuning with LoRA" in result.stdout


def test_rag_help(capsys):
    """`rag --help` exits 0; an unknown command exits 2 with one line."""
    assert rag_cli.main(["--help"]) == 0
    assert "usage: rag" in capsys.readouterr().out
    assert rag_cli.main(["nope"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
