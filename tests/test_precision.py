"""`--precision`: bf16 where the processor has it (read from its flags), fp32 elsewhere, a clear refusal of a
forced bf16 on a CPU without it, and what each kind of stage does with the choice."""

from __future__ import annotations

import importlib

import pytest
import torch

from align.core.command import run_stage
from align.lm import precision as precision_module
from align.lm.precision import PrecisionError, choose_precision, cpu_bf16_flag
from tests.conftest import NEEDS_BF16, ROOT

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16 vaes\n"
OLD_XEON = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd dotprod\nCPU implementer\t: 0x41\n"


@pytest.fixture
def cpu(tmp_path, monkeypatch):
    """Pretend to run on a processor whose /proc/cpuinfo is the given text."""

    def use(text: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(precision_module, "CPUINFO", path)

    return use


@pytest.mark.parametrize(("cpuinfo", "flag"), [(EPYC, "avx512_bf16"), (OLD_XEON, None), (SAPPHIRE_RAPIDS, "amx_bf16"),
                                               (GRAVITON3, "bf16"), (GRAVITON2, None), ("", None)])
def test_native_bf16_is_read_from_the_cpu_flags(cpu, cpuinfo, flag):
    cpu(cpuinfo)
    assert cpu_bf16_flag() == flag


def test_unreadable_cpuinfo_means_no_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(precision_module, "CPUINFO", tmp_path / "missing")
    assert cpu_bf16_flag() is None
    assert choose_precision("auto", "cpu").name == "fp32"


def test_auto_is_bf16_on_a_bf16_cpu_and_fp32_elsewhere(cpu):
    cpu(EPYC)
    chosen = choose_precision("auto", "cpu")
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16 and "avx512_bf16" in chosen.reason
    cpu(OLD_XEON)
    chosen = choose_precision("auto", "cpu")
    assert chosen.name == "fp32" and chosen.dtype == torch.float32 and "no native bf16" in chosen.reason
    assert choose_precision("fp32", "cpu").name == "fp32"
    assert choose_precision("auto", "mps").name == "fp32"  # not switched on where it is untested


def test_forced_bf16_without_it_is_refused(cpu):
    cpu(OLD_XEON)
    with pytest.raises(PrecisionError, match="needs native bf16"):
        choose_precision("bf16", "cpu")
    cpu(EPYC)
    assert choose_precision("bf16", "cpu").name == "bf16"
    with pytest.raises(PrecisionError, match="must be one of"):
        choose_precision("fp16", "cpu")


def test_autocast_only_under_bf16(cpu):
    cpu(EPYC)
    layer = torch.nn.Linear(8, 8)
    with choose_precision("bf16", "cpu").autocast("cpu"):
        assert layer(torch.randn(2, 8)).dtype == torch.bfloat16
    with choose_precision("fp32", "cpu").autocast("cpu"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32
    assert layer.weight.dtype == torch.float32  # autocast never casts the weights themselves


def test_compute_in_fp32_keeps_names_copies_and_fp32_outputs_under_autocast():
    import copy

    from align.lm.precision import compute_in_fp32

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    names = [name for name, _ in model.named_parameters()]
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16
        compute_in_fp32(model[1])
        out = model(x)
        copied = copy.deepcopy(model[1])  # PEFT copies a trained head this way
        copied.weight.data.mul_(2)  # the copy computes with its own weights
        copied.bias.data.mul_(2)
        assert copied(model[0](x)).dtype == torch.float32
        assert torch.allclose(copied(model[0](x)), 2 * out, atol=1e-2)
    assert out.dtype == torch.float32
    assert [name for name, _ in model.named_parameters()] == names
    assert isinstance(model[1], torch.nn.Linear)
    assert compute_in_fp32(model[1]) is model[1] and type(model[1]).__mro__.count(type(model[1])) == 1


# ----------------------------------------------------------------------------- the stages

TINY = {stage: ["--config", str(ROOT / "configs" / "tiny" / f"{stage}.yaml")]
        for stage in ("sft", "reward", "ppo", "self-instruct", "comparisons")}
MODULES = {"sft": "align.sft", "reward": "align.reward", "ppo": "align.ppo", "self-instruct": "align.self_instruct",
           "comparisons": "align.comparisons", "rag eval": "rag.evaluate"}


@pytest.mark.parametrize("stage", list(MODULES))
def test_forced_bf16_on_a_cpu_without_it_is_one_line_and_nothing_on_disk(stage, cpu, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu(OLD_XEON)
    out = tmp_path / "out"
    base = TINY.get(stage, ["--records", str(ROOT / "data" / "rag" / "questions.jsonl"),
                            "--models", "tiny=tiny-llama"])
    code = run_stage(stage, importlib.import_module(MODULES[stage]).main,
                     [*base, "--precision", "bf16", "--output_dir", str(out)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, errors
    assert len(errors) == 1 and errors[0].startswith(f"error: {stage}: ") and "needs native bf16" in errors[0], errors
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_an_unknown_precision_is_one_line(tmp_path, capsys):
    from align import sft

    code = run_stage("sft", sft.main, [*TINY["sft"], "--precision", "fp16", "--output_dir", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(errors) == 1 and "--precision must be one of auto, fp32, bf16" in errors[0], errors


def training_args(argv: list[str]):
    from align import sft
    from align.core.command import parse_config

    _, args, _ = parse_config("sft", sft.CONFIG_CLASSES, [*TINY["sft"], *argv])
    return args


def test_training_stages_turn_the_choice_into_mixed_precision(cpu, monkeypatch):
    """A training stage's bf16 is transformers' mixed precision (autocast over fp32 weights); on a CPU it needs
    `use_cpu`. `--bf16` is honoured as the same choice, and contradicting `--precision` is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu(EPYC)
    args = training_args([])
    assert args.bf16 and args.use_cpu and args.precision_choice.name == "bf16"
    assert not training_args(["--precision", "fp32"]).bf16
    assert not training_args(["--bf16", "false"]).bf16
    cpu(OLD_XEON)
    args = training_args([])
    assert not args.bf16 and args.precision_choice.name == "fp32"
    from align.core.command import StageError

    with pytest.raises(StageError, match="contradicts --precision fp32"):
        training_args(["--bf16", "true", "--precision", "fp32"])
    with pytest.raises(StageError, match="needs native bf16"):
        training_args(["--bf16", "true"])


@NEEDS_BF16
def test_frozen_models_are_cast_to_bf16_once(tiny_model_path):
    """`load_for_inference` under bf16: every weight in bf16, eval mode, logits within bf16 rounding of fp32's."""
    from align.lm.models import load_causal_lm, load_for_inference

    reference = load_causal_lm(tiny_model_path, dtype=torch.float32).eval()
    model = load_for_inference(tiny_model_path, choose_precision("bf16", "cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        low = model(input_ids=ids).logits.float()
        high = reference(input_ids=ids).logits
    assert torch.allclose(low, high, atol=0.05), (low - high).abs().max()
