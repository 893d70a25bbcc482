#!/usr/bin/env bash
# The whole MovieLens-1M comparison of docs/results.md, in one command, on a 2-core CPU:
#
#   scripts/train/ml1m.sh [RUNS]          # RUNS defaults to runs/; progress in RUNS/worker-{a,b}.log
#
# Two single-threaded workers run side by side (one per core):
#   A: MF, TALLRec, CoLLM and SeLLa-Rec at seed 0 in RUNS/ml1m, then soft tokens pinned to the
#      backbone's scale (RUNS/ml1m-pinned: SeLLa-Rec with stage3.soft_token_scale=backbone, reusing
#      the stage-1/2 caches; the config runs the paper's free scale), then the SeLLa ablations
#      SeLLa-Proj and SeLLa-Warm;
#   B: zero-shot, then MF, CoLLM and SeLLa-Rec again at seeds 1 and 2 (RUNS/ml1m-seed1,
#      RUNS/ml1m-seed2: the training noise), then the ablation SeLLa-UI.
# Then `sellarec-train report` writes docs/results.md and docs/figures/. CONFIG overrides the
# configuration (default training/configs/ml1m.yaml; its data paths are relative to it).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
runs=${1:-runs}
config=${CONFIG:-training/configs/ml1m.yaml}
train="$root/.venv/bin/sellarec-train"
mkdir -p "$runs"
stamp() { date -u +%H:%M:%S; }

worker_a() {
  "$train" run mf tallrec collm sellarec --config "$config" --out "$runs/ml1m" --no-progress
  CONFIG=$config "$root/scripts/train/sweep.sh" "$runs/ml1m" "$runs/ml1m-pinned" sellarec -- \
    --set stage3.soft_token_scale=backbone --no-progress
  "$train" run sella-proj sella-warm --config "$config" --out "$runs/ml1m" --no-progress
}

worker_b() {
  # Zero-shot needs no trained stage, so it goes first on this worker while A trains stage 1.
  "$train" run zeroshot --config "$config" --out "$runs/ml1m" --no-progress
  for seed in 1 2; do
    "$train" run mf collm sellarec --config "$config" --out "$runs/ml1m-seed$seed" --seed "$seed" --no-progress
  done
  # The last ablation evens the two workers' loads (its stage-1/2 caches are A's, by then built).
  "$train" run sella-ui --config "$config" --out "$runs/ml1m" --no-progress
}

echo "$(stamp) start: $runs (config $config)"
worker_a > "$runs/worker-a.log" 2>&1 &
a=$!
worker_b > "$runs/worker-b.log" 2>&1 &
b=$!
rc=0; wait $a || rc=$?; echo "$(stamp) worker A done (exit $rc)"
rc=0; wait $b || rc=$?; echo "$(stamp) worker B done (exit $rc)"
"$train" report --runs "$runs/ml1m" --seeds "$runs/ml1m-seed1" --seeds "$runs/ml1m-seed2" \
  --sweep "$runs/ml1m-pinned" --doc docs/results.md --figures docs/figures
echo "$(stamp) report written: docs/results.md"
