#!/usr/bin/env bash
# The chain `align pipeline --config configs/quickstart.yaml` runs, one stage per command, so each step can be
# read, changed or re-run alone. Same sizes and wiring as configs/quickstart.yaml (check with its --dry_run).
# Unlike the pipeline, this script does not skip finished stages: it replaces their outputs.
#   bash scripts/run_pipeline.sh                 # into runs/chain
#   OUT=runs/mine bash scripts/run_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PATH="$PWD/.venv/bin:$PATH"
OUT="${OUT:-runs/chain}"
MODEL=smollm2-135m-instruct
REPLACE=(--overwrite_output_dir true)

# 1. Self-Instruct: new tasks with instances from the team's 30 seed tasks (filters, dedup, classification).
align self-instruct --config configs/self-instruct.yaml --num_instructions 6 --prompts_per_round 4 --max_rounds 2 \
  --model_name_or_path "$MODEL" --output_dir "$OUT/self-instruct" "${REPLACE[@]}"

# 2. SFT: a LoRA adapter trained on the seed + generated tasks (chats in the `messages` column).
align sft --config configs/sft.yaml --num_train_epochs 1 --max_length 256 \
  --model_name_or_path "$MODEL" --dataset_name "$OUT/self-instruct" --output_dir "$OUT/sft" "${REPLACE[@]}"

# 3. Comparisons: K=4 responses per prompt sampled from the SFT policy, ranked by similarity to the reference.
align comparisons --config configs/comparisons.yaml --source sample --source_limit 16 --test_records 4 \
  --num_responses 4 --max_new_tokens 48 --model_name_or_path "$MODEL" --input_path "$OUT/self-instruct" \
  --adapter "$OUT/sft" --output_dir "$OUT/comparisons" "${REPLACE[@]}"

# 4. Reward model: K-wise ranking loss, initialised from the SFT model (as in InstructGPT).
align reward --config configs/reward.yaml --max_length 192 --model_name_or_path "$MODEL" \
  --dataset_name "$OUT/comparisons" --sft_adapter "$OUT/sft" --output_dir "$OUT/reward" "${REPLACE[@]}"

# 5. A judge of another family (a head over frozen sentence embeddings) on the same rankings: PPO never sees it.
align reward --config configs/reward_embedding.yaml --model_name_or_path "$MODEL" --dataset_name "$OUT/comparisons" \
  --output_dir "$OUT/judge" "${REPLACE[@]}"

# 6. PPO: the SFT policy against the reward model, KL-penalised to the SFT model, on the Self-Instruct prompts;
#    the reward of greedy responses to 8 held-out prompts is measured before and after.
align ppo --config configs/ppo.yaml --total_steps 8 --rollout_batch_size 4 --max_new_tokens 32 --eval_prompts 8 \
  --save_steps 4 --sample_steps 4 --model_name_or_path "$MODEL" --dataset_name "$OUT/self-instruct" --sft_adapter "$OUT/sft" \
  --reward_model "$OUT/reward" --output_dir "$OUT/ppo" "${REPLACE[@]}"

# 7. The alignment report: base vs SFT vs PPO on the prompts PPO held out, by the reward model PPO optimised
#    (the proxy) and by the judge (gold): win rates with intervals, length-controlled, KL, best-of-n.
align evaluate --config configs/evaluate.yaml --num_samples 2 --best_of_n 4 --max_new_tokens 32 \
  --dataset_name "$OUT/ppo" --policies "base=$MODEL" "sft=$MODEL+$OUT/sft" "ppo=$MODEL+$OUT/ppo" --baseline sft \
  --judges "proxy=$OUT/reward" "gold=$OUT/judge" --output_dir "$OUT/evaluate" "${REPLACE[@]}"

# 8. RAG evaluation: base vs SFT vs PPO on the team's RAG set (closed-book, oracle, 3 documents gold first/last).
rag eval --config configs/rag/eval.yaml --num_questions 10 --num_documents 3 --gold_positions first last \
  --models "base=$MODEL" "sft=$MODEL+$OUT/sft" "ppo=$MODEL+$OUT/ppo" --output_dir "$OUT/rag-eval" "${REPLACE[@]}"

echo "reports: $OUT/evaluate/report.md $OUT/rag-eval/report.md; adapters: $OUT/sft/adapter $OUT/ppo/adapter"
