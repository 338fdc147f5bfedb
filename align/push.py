"""`align push <stage output dir> --repo_id namespace/name`: publish a trained adapter on a model hub.

Uploads the adapter of a finished `align sft`, `align reward` or `align ppo` output (weights, adapter
config, tokenizer, and a model card re-rendered with the repository id) together with the stage's
manifest.json, in one commit, to a private repository unless `--private false`. The token comes from
HF_TOKEN or a stored `hf auth login`, never from a flag; `--hub_endpoint` (or HF_ENDPOINT) picks a hub
other than huggingface.co.

    align push runs/sft --repo_id my-org/smollm2-sft
    align push runs/ppo --repo_id my-org/smollm2-ppo --license apache-2.0 --commit_message "PPO, 200 steps"
    align push runs/sft --repo_id my-org/smollm2-sft --hub_endpoint http://hub.internal:8080
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from align.core.command import StageError, parse_config, run_stage
from align.core.hub import push_stage_output

STAGE = "push"


@dataclass
class PushArguments:
    repo_id: str = field(metadata={"help": "Hub repository to push to: 'namespace/name' (or 'name' for your own "
                                   "namespace). Created if it does not exist."})
    hub_endpoint: str | None = field(
        default=None, metadata={"help": "Hub address (default: $HF_ENDPOINT, else https://huggingface.co)."}
    )
    private: bool = field(
        default=True, metadata={"help": "Create the repository private (the default); `--private false` creates it "
                                "public. An existing repository keeps its visibility."}
    )
    commit_message: str | None = field(
        default=None, metadata={"help": "Summary of the commit (default: 'Upload <stage> adapter (align-rlhf X)')."}
    )
    license: str | None = field(
        default=None, metadata={"help": "License id for the model card's metadata (e.g. apache-2.0); omitted when "
                                "not given."}
    )


def _take_positional(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split `align push` arguments into the output directory and the options."""
    flags = {"--private", "--no_private", "--no-private"}  # options that may stand alone (`--private` means true)
    values = {"true", "false", "yes", "no", "1", "0", "t", "f", "y", "n"}
    positional, rest, index = [], [], 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("-") and arg != "-":
            rest.append(arg)
            takes_value = "=" not in arg and arg not in ("-h", "--help")
            if arg in flags:
                takes_value = index + 1 < len(argv) and argv[index + 1].lower() in values
            if takes_value and index + 1 < len(argv):
                rest.append(argv[index + 1])
                index += 1
        else:
            positional.append(arg)
        index += 1
    if len(positional) > 1:
        raise StageError(STAGE, f"one stage output directory expected, got {len(positional)}: "
                         f"{' '.join(positional)} — see `align push --help`")
    return (positional[0] if positional else None), rest


def main(argv: list[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        parse_config(STAGE, (PushArguments,), ["--help"], module="align.push")  # prints the options and exits
    output_dir, options = _take_positional(args)
    if output_dir is None:
        raise StageError(STAGE, "no stage output directory — usage: align push <output_dir> --repo_id namespace/name")
    (push_args,) = parse_config(STAGE, (PushArguments,), options, module="align.push")
    url = push_stage_output(output_dir, push_args.repo_id, endpoint=push_args.hub_endpoint,
                            private=push_args.private, commit_message=push_args.commit_message,
                            license=push_args.license)
    print(url)
    return url


def cli(argv: list[str] | None = None) -> int:
    return run_stage(STAGE, main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
