#!/usr/bin/env bash
# The main job on the embedded defaults: set up (if needed), then fine-tune SmolLM2-135M-Instruct
# with LoRA on the team's demonstrations (data/seed/demonstrations.jsonl). A few minutes on 2 CPU cores.
# Interrupted? Run it again: it resumes from the last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT="${OUT:-runs/quickstart}"

# 1. Supervised fine-tuning (LoRA) of the default model.
.venv/bin/align sft --config configs/sft.yaml --output_dir "$OUT/sft" --overwrite_output_dir true

.venv/bin/python - "$OUT/sft" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
metrics = json.loads((out / "manifest.json").read_text())["metrics"]
print(f"\nSFT adapter: {out / 'adapter'}")
print(f"manifest:    {out / 'manifest.json'}")
print(f"held-out loss {metrics['eval_loss_before']:.3f} (base model) -> {metrics['eval_loss']:.3f} (after SFT); "
      f"{metrics['train_examples']} train / {metrics['eval_examples']} eval examples, {metrics['global_step']} steps")
PY
