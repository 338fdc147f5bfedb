"""Which number format a model computes in: `--precision auto|fp32|bf16`, the same option in every stage.

`auto` picks bf16 where the hardware multiplies bf16 natively — a GPU that supports it, or a CPU with
bf16 instructions (x86 `avx512_bf16` / `amx_bf16`, Arm `bf16`) — and fp32 elsewhere, where bf16 would be
emulated and slower than fp32. On such a CPU bf16 takes about 40% off a forward pass of the default
model (prefill 1.63× faster, `scripts/bench_precision.py`).

How each kind of work uses the choice:

- **Training** (sft, reward, the PPO policy and value model): mixed precision — weights, gradients and
  optimizer states stay fp32, the forward pass runs under `torch.autocast` (for the HF trainers this is
  `TrainingArguments.bf16`, which accelerate turns into autocast on a CPU too).
- **Frozen models that only generate or score** (self-instruct, comparison sampling, `rag eval`): the
  weights are cast to bf16 once after any adapter is merged in fp32, which also halves the bytes read
  per generated token.
- Log-probabilities, losses and scores are always reduced in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

from align.core.command import StageError
from align.core.options import PRECISIONS

logger = logging.getLogger("align")
PRECISION_HELP = ("Number format of the model's arithmetic: 'auto' (bf16 on a GPU or CPU with native bf16, "
                  "fp32 otherwise; the log says which and why), 'fp32', or 'bf16' (refused where the hardware "
                  "lacks it).")
CPUINFO = Path("/proc/cpuinfo")
# CPU feature flags that mean bf16 matrix products run natively (Linux /proc/cpuinfo names).
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FLAGS = ("bf16",)


class PrecisionError(ValueError):
    """bf16 was asked for on hardware that has no native bf16."""


@dataclass(frozen=True)
class Precision:
    name: str  # "bf16" or "fp32"
    reason: str  # why, for the log

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.name == "bf16" else torch.float32

    @property
    def is_bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self, device_type: str):
        """`torch.autocast` to bf16 on `device_type` ('cpu', 'cuda') under bf16; a no-op context under fp32."""
        import torch

        if not self.is_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)

    def describe(self) -> str:
        return f"precision {self.name} ({self.reason})"


def cpu_bf16_flag(cpuinfo: Path | None = None) -> str | None:
    """The CPU flag that says this processor computes bf16 natively, or None (also when it cannot be read)."""
    path = cpuinfo or CPUINFO
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break  # every core lists the same flags
    for flag in (*X86_BF16_FLAGS, *ARM_BF16_FLAGS):
        if flag in flags:
            return flag
    return None


def _cuda_bf16() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no GPU"
    name = torch.cuda.get_device_name()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"{name} supports bf16"
    return False, f"{name} has no bf16"


def choose_precision(requested: str, device_type: str = "cpu") -> Precision:
    """Resolve `--precision` for work on `device_type` ('cpu' or 'cuda').

    Raises:
        PrecisionError: `bf16` requested where the hardware has no native bf16, or an unknown value.
    """
    if requested not in PRECISIONS:
        raise PrecisionError(f"--precision must be one of {', '.join(PRECISIONS)} (got {requested!r})")
    if device_type == "cuda":
        supported, why = _cuda_bf16()
    elif device_type == "cpu":
        flag = cpu_bf16_flag()
        supported = flag is not None
        why = (f"CPU has native bf16 ({flag})" if supported
               else f"this {platform.machine() or 'CPU'} processor has no native bf16 (no "
                    f"{'/'.join(X86_BF16_FLAGS + ARM_BF16_FLAGS)} flag)")
    else:  # other accelerators: keep what is known to work
        supported, why = False, f"bf16 is not enabled automatically on '{device_type}'"
    if requested == "fp32":
        return Precision("fp32", "--precision fp32")
    if requested == "bf16":
        if not supported:
            raise PrecisionError(f"--precision bf16 needs native bf16, but {why} — use --precision auto or fp32")
        return Precision("bf16", f"--precision bf16; {why}")
    return Precision("bf16", why) if supported else Precision("fp32", why)


def compute_in_fp32(module):
    """Make `module` compute in fp32 even under bf16 autocast, in place (its weights must be fp32): its class becomes a
    subclass whose forward turns autocast off and takes fp32 inputs. Parameter names, state dicts and deep copies
    (PEFT copies a trained head) stay as they were. Used for the layers whose outputs are compared closely: the
    policy's logits (PPO's probability ratios) and reward scores."""
    base = type(module)
    if getattr(base, "computes_in_fp32", False):
        return module

    def forward(self, hidden, *args, **kwargs):
        with autocast_off(hidden.device.type):
            return base.forward(self, hidden.float(), *args, **kwargs)

    module.__class__ = type(f"FP32{base.__name__}", (base,), {"forward": forward, "computes_in_fp32": True})
    return module


def autocast_off(device_type: str):
    import torch

    return torch.autocast(device_type=device_type, enabled=False)


def precision_problems(requested: str, device_type: str | None = None) -> list[str]:
    """For a command's `option_problems`: `--precision bf16` on hardware without native bf16 (checked before any
    work; `auto` and `fp32` always work). `device_type` defaults to the GPU when one is visible, else the CPU."""
    if requested != "bf16":
        return []
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        choose_precision(requested, device_type)
    except PrecisionError as exc:
        return [str(exc)]
    return []


def stage_precision(requested: str, device_type: str, stage: str) -> Precision:
    """`choose_precision` for a stage: logs the choice and its reason; a refusal is the stage's one-line error."""
    try:
        precision = choose_precision(requested, device_type)
    except PrecisionError as exc:
        raise StageError(stage, str(exc)) from None
    logger.info("%s on %s", precision.describe(), device_type)
    return precision
