#!/usr/bin/env bash
# The evidence runs of docs/RESULTS.md that follow the suite (issue "Does it help?"), in two
# queues that each use one thread at low priority, so both fit a 2-core machine side by side:
#
#   scripts/evidence_runs.sh curves       # the 1.5B: window-centre curve, then the recipe's K curve
#   scripts/evidence_runs.sh calibrated   # the calibrated loop of each model on the held-out tasks
#
# curves (arc_easy, 100 seeded questions, the held-in task):
#   centre: the authors' recipe (euler K = 6, anchor 0.5, kv first, apply prefill) on a 4-layer
#           window whose centre is swept over the depth (the paper's Figure 3a)
#   kcurve: the same recipe at the paper window (centre 0.46 = [11, 15)) for K = 1, 2, 4, 6, 8,
#           beside the naive curve already in docs/results/kcurve_1.5b/naive (Figure 3b)
# calibrated: every model's calibrated loop (`loopcpp window --calibrate arc_easy`, the held-in
#   task; the 1.5B's from the centre curve) on the suite without arc_easy (`--skip arc_easy`),
#   paired with the stock runs of docs/results/suite. A model whose calibration picked no loop
#   is left out (its calibrated configuration is the stock model).
#
# Progress: docs/results/evidence-<QUEUE>.log. Each step is skipped when its result exists.
set -euo pipefail
cd "$(dirname "$0")/.."
QUEUE=${1:?give a queue: curves or calibrated}
PY=${PY:-.venv/bin/python}
BIG=qwen2.5-coder-1.5b-instruct
RECIPE=(--methods euler --anchor 0.5 --kv first --apply prefill --width 4)
LOG=docs/results/evidence-$QUEUE.log
mkdir -p docs/results
say() { echo "== $(date -u +%FT%TZ) $*" >>"$LOG"; }
run() { nice -n 15 "$@" >>"$LOG" 2>&1; }

case "$QUEUE" in
  curves)
    if [ ! -f docs/results/centre_1.5b/sweep.json ]; then
      say "$BIG centre curve"
      run "$PY" -m loopcpp sweep "$BIG" --task arc_easy --limit 100 --seed 0 --threads 1 \
        --counts 6 "${RECIPE[@]}" --centres 0.2,0.3,0.4,0.5,0.6,0.7,0.8 -o docs/results/centre_1.5b
    fi
    if [ ! -f docs/results/kcurve_1.5b/paper/sweep.json ]; then
      say "$BIG recipe K curve"
      run "$PY" -m loopcpp sweep "$BIG" --task arc_easy --limit 100 --seed 0 --threads 1 \
        --counts 1,2,4,6,8 "${RECIPE[@]}" --centres 0.46 -o docs/results/kcurve_1.5b/paper
    fi
    ;;
  calibrated)
    # model -> its calibrated loop (docs/results/calibrate_*/calibration.json, and the centre
    # curve's best point by held-in mean log-likelihood for the 1.5B: scripts/calibrated_loop.py)
    for model in smollm2-135m-instruct qwen2.5-coder-0.5b-instruct "$BIG"; do
      if [ "$model" = "$BIG" ]; then  # its calibration is the centre curve of the other queue
        while [ ! -f docs/results/centre_1.5b/sweep.json ]; do sleep 60; done
      fi
      args=$("$PY" scripts/calibrated_loop.py "$model")
      if [ "$args" = "none" ]; then
        say "$model: its calibration picked no loop; skipped"
        continue
      fi
      say "$model calibrated: $args"
      # shellcheck disable=SC2086  # the loop arguments are words
      run "$PY" -m loopcpp eval "$model" --suite paper --limit 30 --seed 0 --threads 1 \
        --skip arc_easy $args --out "docs/results/suite/$model/calibrated"
    done
    ;;
  *) echo "unknown queue $QUEUE: use curves or calibrated" >&2; exit 2 ;;
esac
say "queue $QUEUE done"
