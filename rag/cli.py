"""`rag <command> ...`: the RAG evaluator's commands."""

from __future__ import annotations

import sys

# command -> (module, one-line summary); a command is listed once it exists.
COMMANDS: dict[str, tuple[str, str]] = {}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: rag <command> [options]\n\nEvaluate how models use retrieved passages.\n\ncommands:")
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name}  {summary}")
        if not COMMANDS:
            print("  (none installed in this version)")
        return 0
    print(f"error: rag: unknown command '{args[0]}' — run `rag --help` for the list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
