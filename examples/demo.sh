#!/usr/bin/env bash
# The whole RLHF recipe, one rlhfkit command per stage, with files between the stages:
#
#   sft -> collect -> simulated annotator ranks -> rank-import -> train-rm -> ppo -> eval
#
# Usage: MODEL=path/to/model-or.gguf RUN=runs/demo bash examples/demo.sh
# Every size below can be overridden from the environment (make demo-tiny does).
set -euo pipefail

: "${MODEL:?set MODEL to a model directory or .gguf file}"
RUN=${RUN:-runs/demo}
DATA=${DATA:-examples/data}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}

SFT_EPOCHS=${SFT_EPOCHS:-2}
SFT_LR=${SFT_LR:-5e-5}
SFT_BATCH=${SFT_BATCH:-8}
K=${K:-4}
COLLECT_TOKENS=${COLLECT_TOKENS:-40}
RM_EPOCHS=${RM_EPOCHS:-1}
RM_LR=${RM_LR:-2e-5}
RM_BATCH=${RM_BATCH:-4}
PPO_STEPS=${PPO_STEPS:-10}
PPO_BATCH=${PPO_BATCH:-16}
PPO_TOKENS=${PPO_TOKENS:-40}
PPO_LR=${PPO_LR:-1e-5}
PPO_KL=${PPO_KL:-0.05}
PPO_EXTRA=${PPO_EXTRA:---value-head policy --ppo-epochs 2}
EVAL_TOKENS=${EVAL_TOKENS:-40}
EVAL_SAMPLES=${EVAL_SAMPLES:-2}

mkdir -p "$RUN"
START=$SECONDS
stage() { printf '\n\033[1m== %s\033[0m  (%ss so far)\n' "$1" "$((SECONDS - START))" >&2; }

stage "1/7 sft: supervised fine-tuning on $DATA/demos.jsonl"
$RLHFKIT sft --model "$MODEL" --data "$DATA/demos.jsonl" --out "$RUN/sft" --seed "$SEED" \
  --epochs "$SFT_EPOCHS" --lr "$SFT_LR" --batch-size "$SFT_BATCH" --val-fraction 0.1 --max-length 256 \
  > "$RUN/sft.json"

stage "2/7 collect: $K completions per prompt from the SFT policy"
$RLHFKIT collect --policy "sft=$RUN/sft" --prompts "$DATA/prompts.jsonl" --k "$K" --out "$RUN/samples.jsonl" \
  --max-new-tokens "$COLLECT_TOKENS" --temperature 1.0 --seed "$SEED" > "$RUN/collect.json"

stage "3/7 the simulated annotator ranks them (examples/annotator.py, two noisy labelers)"
$PYTHON examples/annotator.py --annotators 2 --noise 0.1 --seed "$SEED" < "$RUN/samples.jsonl" > "$RUN/rankings.jsonl"

stage "4/7 rank-import: rankings -> comparison pairs, agreement"
$RLHFKIT rank-import "$RUN/rankings.jsonl" --samples "$RUN/samples.jsonl" --out "$RUN/comparisons.jsonl" \
  --val-fraction 0.15 --stats "$RUN/rank_stats.json" --seed "$SEED" > "$RUN/rank_import.json"

stage "5/7 train-rm: Bradley-Terry reward model from the SFT model"
$RLHFKIT train-rm --model "$RUN/sft" --data "$RUN/comparisons.jsonl" --val-data "$RUN/comparisons.val.jsonl" \
  --out "$RUN/rm" --epochs "$RM_EPOCHS" --lr "$RM_LR" --batch-size "$RM_BATCH" --seed "$SEED" \
  --norm-samples "$RUN/samples.jsonl" > "$RUN/train_rm.json"

stage "6/7 ppo: against the reward model with a KL penalty to the SFT model"
# shellcheck disable=SC2086
$RLHFKIT ppo --policy "$RUN/sft" --rm "$RUN/rm" --prompts "$DATA/prompts.jsonl" --out "$RUN/ppo" \
  --steps "$PPO_STEPS" --batch-size "$PPO_BATCH" --max-new-tokens "$PPO_TOKENS" --lr "$PPO_LR" \
  --kl-coef "$PPO_KL" --temperature 1.0 --seed "$SEED" --save-every 5 --keep-checkpoints 0 --sample-every 5 $PPO_EXTRA > "$RUN/ppo.json"

stage "7/7 eval: PPO vs SFT on held-out prompts, judged by the reward model and the annotator"
$RLHFKIT eval --policy "ppo=$RUN/ppo" --baseline "sft=$RUN/sft" --rm "$RUN/rm" \
  --judge "$PYTHON examples/annotator.py" --prompts "$DATA/eval_prompts.jsonl" --demos "$DATA/eval_demos.jsonl" \
  --n-samples "$EVAL_SAMPLES" --max-new-tokens "$EVAL_TOKENS" --temperature 0.7 --seed "$SEED" \
  --checkpoints "$RUN/ppo" --out "$RUN/eval" > "$RUN/eval.json"

stage "done"
$PYTHON examples/summarize.py "$RUN" "$((SECONDS - START))"
$PYTHON examples/check_cards.py "$RUN"  # every model directory: a model card with rlhfkit.json's numbers, and curves.png
