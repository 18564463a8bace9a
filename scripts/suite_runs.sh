#!/usr/bin/env bash
# The evidence runs of docs/RESULTS.md "Does it help? The paper's task suite":
# `loopcpp eval --suite paper` for each model and configuration, one thread, low priority,
# resumable per task (a finished task's JSON is kept and skipped on a rerun).
#
#   scripts/suite_runs.sh QUEUE            # QUEUE: small (SmolLM2, Gemma-3, Qwen 0.5B) or big (1.5B)
#   LIMIT=30 SEED=0 scripts/suite_runs.sh small
#   RUN_CONFIGS=paper scripts/suite_runs.sh big   # the authors' recipe
#
# Results: docs/results/suite/<model>/<config>/<task>.json; progress:
# docs/results/suite/progress-<QUEUE>.log. Summary and plot afterwards:
#   loopcpp suite-summary docs/results/suite --json docs/results/suite/summary.json \
#       --plot docs/results/suite/deltas.png
set -euo pipefail
cd "$(dirname "$0")/.."
QUEUE=${1:?give a queue: small or big}
LIMIT=${LIMIT:-25}
SEED=${SEED:-0}
PY=${PY:-.venv/bin/python}
OUT=docs/results/suite
case "$QUEUE" in
  small) MODELS="smollm2-135m-instruct gemma3-270m qwen2.5-coder-0.5b-instruct" ;;
  big) MODELS="qwen2.5-coder-1.5b-instruct" ;;
  *) echo "unknown queue $QUEUE: use small or big" >&2; exit 2 ;;
esac
RUN_CONFIGS=${RUN_CONFIGS:-stock default}
# configuration name -> loop arguments of `loopcpp eval`
loop_args() {  # MODEL CONFIG
  case "$2" in
    stock) echo "--no-loop" ;;
    default) echo "" ;;  # the project's default: the depth rule, K = 2, euler
    # the authors' 16-task recipe (docs/LOOPING.md v2): 4 layers ending at the middle
    # layer, block euler K = 6, anchor 0.5, kv first, apply prefill
    paper) echo "--recipe paper" ;;
    *) echo "unknown configuration $2: use stock, default or paper" >&2; exit 2 ;;
  esac
}
LOG=$OUT/progress-$QUEUE.log
mkdir -p "$OUT"
for model in $MODELS; do
  for config in $RUN_CONFIGS; do
    args=$(loop_args "$model" "$config")
    echo "== $(date -u +%FT%TZ) $model $config (limit $LIMIT, seed $SEED)" >>"$LOG"
    # shellcheck disable=SC2086  # the loop arguments are words
    nice -n 15 "$PY" -m loopcpp eval "$model" --suite paper --limit "$LIMIT" --seed "$SEED" \
      --threads 1 $args --out "$OUT/$model/$config" >>"$LOG" 2>&1
  done
done
echo "== $(date -u +%FT%TZ) queue $QUEUE done" >>"$LOG"
