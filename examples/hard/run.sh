#!/usr/bin/env bash
# The hard example: RLHF from 64 ranked prompts on SmolLM2-135M-Instruct, judged on 48 prompts about
# topics it never saw ranked (see examples/hard/README.md).
#
#   base model (GGUF -> safetensors, once)
#   -> collect K=4 on the train prompts -> annotator ranks -> rank-import -> train-rm
#   -> RM agreement with the annotator on the base model's samples of the test prompts
#   -> ppo against the RM -> eval on the test prompts (annotator as --judge, best-of-n by the same RM)
#
# Usage: RUN=runs/hard bash examples/hard/run.sh      (make -C examples hard)
# A stage whose output is already in RUN is skipped: rm -rf RUN to start over.
# Every size below can be overridden from the environment.
set -euo pipefail

RUN=${RUN:-runs/hard}
HERE=examples/hard
DATA=${DATA:-$HERE/data}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python3}
SEED=${SEED:-0}
# plain: the prompts as strings ({"prompt": ...}), rendered with the model's chat template by
# --chat-template auto (the default); chat: the same prompts as one-turn conversations ({"messages": ...})
PROMPT_FORMAT=${PROMPT_FORMAT:-plain}
case "$PROMPT_FORMAT" in chat) EXT=.chat.jsonl ;; plain) EXT=.jsonl ;; *) echo "PROMPT_FORMAT: chat or plain" >&2; exit 1 ;; esac
TRAIN_PROMPTS=$DATA/train_prompts$EXT
TEST_PROMPTS=$DATA/test_prompts$EXT

K=${K:-4}
TOKENS=${TOKENS:-96}           # max new tokens everywhere (collect, ppo, eval)
TEMPERATURE=${TEMPERATURE:-0.7}  # sampling temperature everywhere (at 1.0 SmolLM2-135M mostly writes nonsense)
# the reward model: a probe on frozen last-token + completion-mean features of 5 layers (README table: what each choice bought)
RM_OPTIONS=${RM_OPTIONS:---pooling last+mean --feature-layers 5 --trainable-layers 0}
PPO_STEPS=${PPO_STEPS:-12}
PPO_BATCH=${PPO_BATCH:-16}
PPO_LR=${PPO_LR:-1e-5}
PPO_KL=${PPO_KL:-0.05}
PPO_EOS_PENALTY=${PPO_EOS_PENALTY--1.0}  # the score of an answer cut off at TOKENS; PPO_EOS_PENALTY= for none
PPO_EXTRA=${PPO_EXTRA:---value-head policy --ppo-epochs 2}
JUDGE_EVERY=${JUDGE_EVERY:-3}    # ppo's judge monitor on the test prompts: the annotator's win-rate over the base model vs KL
EVAL_SAMPLES=${EVAL_SAMPLES:-2}
EVAL_BATCH=${EVAL_BATCH:-48}
BEST_OF=${BEST_OF:-4}
JUDGE="$PYTHON $HERE/annotator.py"

mkdir -p "$RUN"
START=$SECONDS
LAST=$SECONDS
: > "$RUN/times.tsv.tmp"
stage() {
  local now=$SECONDS
  [ -n "${STAGE:-}" ] && printf '%s\t%s\n' "$STAGE" "$((now - LAST))" >> "$RUN/times.tsv.tmp"
  STAGE=$1 LAST=$now
  printf '\n\033[1m== %s\033[0m  (%ss so far)\n' "$1" "$((now - START))" >&2
}

stage "base: SmolLM2-135M-Instruct as a safetensors directory"
$PYTHON $HERE/base_model.py "$RUN/base"

stage "collect: $K answers per train prompt from the base model"
[ -f "$RUN/collect.json" ] || $RLHFKIT collect --policy "base=$RUN/base" --prompts "$TRAIN_PROMPTS" --k "$K" \
  --out "$RUN/samples.jsonl" --max-new-tokens "$TOKENS" --temperature "$TEMPERATURE" --seed "$SEED" > "$RUN/collect.json"

stage "annotate + rank-import: the scripted annotator ranks them (ties allowed)"
$PYTHON $HERE/annotator.py < "$RUN/samples.jsonl" > "$RUN/rankings.jsonl"
$RLHFKIT rank-import "$RUN/rankings.jsonl" --samples "$RUN/samples.jsonl" --out "$RUN/comparisons.jsonl" \
  --stats "$RUN/rank_stats.json" --seed "$SEED" > "$RUN/rank_import.json"

stage "train-rm: Bradley-Terry reward model from the base model"
# shellcheck disable=SC2086
[ -f "$RUN/train_rm.json" ] || $RLHFKIT train-rm --model "$RUN/base" --data "$RUN/comparisons.jsonl" --out "$RUN/rm" \
  --seed "$SEED" --norm-samples "$RUN/samples.jsonl" $RM_OPTIONS > "$RUN/train_rm.json"

stage "RM vs annotator on unseen topics: $K base-model answers per test prompt"
[ -f "$RUN/test_collect.json" ] || $RLHFKIT collect --policy "base=$RUN/base" --prompts "$TEST_PROMPTS" --k "$K" \
  --out "$RUN/test_samples.jsonl" --max-new-tokens "$TOKENS" --temperature "$TEMPERATURE" --seed "$((SEED + 1))" \
  > "$RUN/test_collect.json"
[ -f "$RUN/rm_agreement.json" ] || $PYTHON $HERE/feasibility.py rm --rm "$RUN/rm" --test "$RUN/test_samples.jsonl" --modes as_sampled > "$RUN/rm_agreement.json"

stage "ppo: against the reward model, KL to the base model"
# shellcheck disable=SC2086
[ -f "$RUN/ppo.json" ] || $RLHFKIT ppo --policy "$RUN/base" --rm "$RUN/rm" --prompts "$TRAIN_PROMPTS" --out "$RUN/ppo" \
  --steps "$PPO_STEPS" --batch-size "$PPO_BATCH" --max-new-tokens "$TOKENS" --temperature "$TEMPERATURE" --lr "$PPO_LR" \
  --kl-coef "$PPO_KL" ${PPO_EOS_PENALTY:+--missing-eos-penalty "$PPO_EOS_PENALTY"} --seed "$SEED" --save-every 3 --keep-checkpoints 1 \
  --sample-every 3 --judge "$JUDGE" --judge-every "$JUDGE_EVERY" --judge-prompts "$TEST_PROMPTS" --judge-samples 48 \
  --no-keep-best $PPO_EXTRA > "$RUN/ppo.json"

stage "eval: PPO vs base on the test prompts, judged by the annotator; best-of-$BEST_OF by the same RM"
[ -f "$RUN/eval.json" ] || $RLHFKIT eval --policy "ppo=$RUN/ppo" --baseline "base=$RUN/base" --rm "$RUN/rm" --judge "$JUDGE" \
  --prompts "$TEST_PROMPTS" --n-samples "$EVAL_SAMPLES" --batch-size "$EVAL_BATCH" --best-of "$BEST_OF" --max-new-tokens "$TOKENS" \
  --temperature "$TEMPERATURE" --seed "$SEED" --out "$RUN/eval" > "$RUN/eval.json"

stage "done"
mv "$RUN/times.tsv.tmp" "$RUN/times.tsv"
$PYTHON $HERE/summarize.py "$RUN" "$((SECONDS - START))"
