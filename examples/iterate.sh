#!/usr/bin/env bash
# Iterated online RLHF (Bai et al. 2022; InstructGPT's repeated data collection): each round samples
# the current policy (beside the SFT model, blind-shuffled), has the annotator rank the samples,
# retrains the reward model on all comparisons so far, and continues PPO from the current policy
# with the KL still measured to the SFT model (--ref).
#
# Usage: BASE=runs/demo-tiny ROUNDS=2 bash examples/iterate.sh   (BASE: a finished demo run)
set -euo pipefail

: "${BASE:?set BASE to a finished demo run (sft/, rm/, ppo/, comparisons.jsonl)}"
ROUNDS=${ROUNDS:-2}
DATA=${DATA:-examples/data}
RLHFKIT=${RLHFKIT:-rlhfkit}
PYTHON=${PYTHON:-python3}
K=${K:-4}
TOKENS=${TOKENS:-16}
RM_LR=${RM_LR:-1e-3}
PPO_STEPS=${PPO_STEPS:-4}
PPO_BATCH=${PPO_BATCH:-16}
PPO_LR=${PPO_LR:-1e-4}

policy="$BASE/ppo"
train_sets=("$BASE/comparisons.jsonl")
val_sets=("$BASE/comparisons.val.jsonl")
for round in $(seq 1 "$ROUNDS"); do
  run="$BASE/iterate/round-$round"
  mkdir -p "$run"
  printf '\n\033[1m== round %s of %s: policy %s\033[0m\n' "$round" "$ROUNDS" "$policy" >&2

  $RLHFKIT collect --policy "sft=$BASE/sft" --policy "round-$((round - 1))=$policy" --prompts "$DATA/prompts.jsonl" \
    --k "$K" --max-new-tokens "$TOKENS" --seed "$round" --out "$run/samples.jsonl" > "$run/collect.json"
  $PYTHON examples/annotator.py --seed "$round" < "$run/samples.jsonl" > "$run/rankings.jsonl"
  $RLHFKIT rank-import "$run/rankings.jsonl" --samples "$run/samples.jsonl" --out "$run/comparisons.jsonl" \
    --val-fraction 0.15 --stats "$run/rank_stats.json" > "$run/rank_import.json"  # same split seed every round

  # the reward model is retrained from the SFT model on every comparison collected so far
  train_sets+=("$run/comparisons.jsonl")
  val_sets+=("$run/comparisons.val.jsonl")
  cat "${train_sets[@]}" > "$run/all_comparisons.jsonl"
  cat "${val_sets[@]}" > "$run/all_comparisons.val.jsonl"
  $RLHFKIT train-rm --model "$BASE/sft" --data "$run/all_comparisons.jsonl" --val-data "$run/all_comparisons.val.jsonl" \
    --out "$run/rm" --lr "$RM_LR" --norm-samples "$run/samples.jsonl" --seed "$round" > "$run/train_rm.json"

  # PPO continues from the current policy; the KL penalty still pulls towards the SFT model
  $RLHFKIT ppo --policy "$policy" --ref "$BASE/sft" --rm "$run/rm" --prompts "$DATA/prompts.jsonl" --out "$run/ppo" \
    --steps "$PPO_STEPS" --batch-size "$PPO_BATCH" --max-new-tokens "$TOKENS" --lr "$PPO_LR" --seed "$round" > "$run/ppo.json"
  policy="$run/ppo"

  $PYTHON - "$run" <<'PY'
import json, sys
run = sys.argv[1]
stats = json.load(open(f"{run}/rank_stats.json"))
rm = json.load(open(f"{run}/train_rm.json"))
print(f"round {run.rsplit('-', 1)[-1]}: {rm['train']['pairs']} comparisons so far,"
      f" reward-model held-out accuracy {rm['metrics'].get('rm/accuracy', float('nan')):.3f}", file=sys.stderr)
for name, r in ((stats.get("policies") or {}).get("elo") or {}).items():
    print(f"  Elo by the annotator on this round's samples: {name:<10} {r['rating']:7.1f}  [{r['ci_low']:.1f}, {r['ci_high']:.1f}]", file=sys.stderr)
PY
done
printf '\nfinal policy: %s\n' "$policy"
