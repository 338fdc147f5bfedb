"""`align <stage> ...`: one command per pipeline stage.

Each stage is also `python -m align.<stage>` and `accelerate launch -m align.<stage>`.
`align <stage> --help` lists every option; `--config <yaml>` reads them from a file and flags
override it; `--debug` shows a traceback instead of the one-line error.
"""

from __future__ import annotations

import importlib
import sys

# stage -> (module, one-line summary); a stage is listed once it exists.
STAGES = {
    "self-instruct": ("align.self_instruct", "bootstrap tasks with instances from a few seed tasks (Self-Instruct)"),
    "sft": ("align.sft", "supervised fine-tuning with LoRA on chat or prompt/completion data"),
    "comparisons": ("align.comparisons", "K ranked responses per prompt: OASST, HH-RLHF, sampled policy, human sheets"),
    "label": ("align.label", "a web page where people rank K responses per prompt; writes comparisons for `reward`"),
    "reward": ("align.reward", "reward model trained on K-wise rankings (or chosen/rejected pairs)"),
    "ppo": ("align.ppo", "PPO against a reward model: LoRA policy on the SFT model, value model from the reward model"),
    "evaluate": ("align.evaluate", "alignment report: win rates, length control, KL, best-of-n, by unoptimised judges"),
    "pipeline": ("align.pipeline", "every stage above, then `rag eval`, from one YAML; up-to-date stages are skipped"),
    "push": ("align.push", "upload a trained adapter with its model card (lineage, config, metrics) to a model hub"),
}


def usage() -> str:
    width = max(len(name) for name in STAGES)
    lines = [
        "usage: align <stage> [--config FILE.yaml] [--option value ...] [--debug]",
        "",
        "The InstructGPT recipe as stages connected by datasets on disk.",
        "",
        "stages:",
        *(f"  {name:<{width}}  {summary}" for name, (_, summary) in STAGES.items()),
        "",
        "`align <stage> --help` lists a stage's options. Errors you can fix end with one line",
        "`error: <stage>: ...` and exit code 2; add --debug for the traceback.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    stage, rest = args[0], args[1:]
    if stage not in STAGES:
        print(f"error: align: unknown stage '{stage}' — choose one of: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage][0])
    return module.cli(rest)


if __name__ == "__main__":
    raise SystemExit(main())
