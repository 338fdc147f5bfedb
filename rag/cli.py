"""`rag <command> ...`: the RAG evaluator's commands.

Each command is also `python -m rag.<module>`; `rag <command> --help` lists its options, `--config <yaml>`
reads them from a file and flags override it; `--debug` shows a traceback instead of the one-line error.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("rag.evaluate", "models x (closed-book, oracle, k documents x gold positions): accuracy, similarity, "
                             "grounding, report"),
    "rescore": ("rag.rescore", "score a finished `rag eval` again with today's metrics and grounding checker, "
                               "no generation; lists what changed"),
    "build": ("rag.position", "k-document contexts with the gold passage at chosen positions (Lost-in-the-Middle "
                              "files)"),
    "retrieval": ("rag.retrieval", "recall@k, MRR, nDCG@k and throughput of a faiss index over MiniLM embeddings"),
    "calibrate": ("rag.similarity", "fit cosine similarity -> P(same meaning) on labelled pairs; ROC-AUC, ECE"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: rag <command> [--config FILE.yaml] [--option value ...] [--debug]\n\n"
              "Evaluate how models use retrieved passages.\n\ncommands:")
        width = max(map(len, COMMANDS))
        for name, (_, summary) in COMMANDS.items():
            print(f"  {name:<{width}}  {summary}")
        print("\n`rag <command> --help` lists a command's options.")
        return 0
    if args[0] in COMMANDS:
        return importlib.import_module(COMMANDS[args[0]][0]).cli(args[1:])
    print(f"error: rag: unknown command '{args[0]}' — run `rag --help` for the list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
