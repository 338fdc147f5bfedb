#!/usr/bin/env bash
# The main job on the embedded defaults: set up (if needed), then the whole pipeline on SmolLM2-135M-Instruct,
# the team's seed tasks and the team's RAG set (configs/quickstart.yaml): Self-Instruct -> SFT -> comparisons
# -> reward model -> PPO -> RAG evaluation of base vs SFT vs PPO. Under 20 minutes on 2 CPU cores.
# Interrupted? Run it again: finished stages are skipped and the interrupted one resumes.
#   OUT=runs/elsewhere bash scripts/quickstart.sh     # another output directory
#   bash scripts/quickstart.sh --from reward           # extra arguments go to `align pipeline`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-runs/quickstart}"
exec .venv/bin/align pipeline --config configs/quickstart.yaml --output_dir "$OUT" "$@"
