#!/usr/bin/env bash
# Set up if needed, then run the whole test suite. Extra arguments go to pytest:
#   bash scripts/test.sh -m "not smoke"      # skip the real-model smoke tests
#   bash scripts/test.sh tests/test_common.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
