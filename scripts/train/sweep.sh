#!/usr/bin/env bash
# A setting tried on validation beside a finished run, reusing the stages it does not change.
#
#   scripts/train/sweep.sh BASE_RUN SWEEP_RUN VARIANTS... -- OVERRIDES...
#   scripts/train/sweep.sh runs/ml1m runs/ml1m-s3lr1e-4 collm sellarec -- --stage3-lr 1e-4
#
# CONFIG (default training/configs/ml1m.yaml) is the base run's configuration.
# SWEEP_RUN gets links to BASE_RUN's stage-1, distillation and stage-2 caches (their keys do
# not depend on stage-3 settings; a stage whose key the OVERRIDES change is rebuilt), then `sellarec-train run`
# trains and evaluates VARIANTS there with OVERRIDES. Results go to SWEEP_RUN/results, so the
# base run's results are never overwritten.
set -euo pipefail
base=$1 sweep=$2
shift 2
variants=()
while [[ $# -gt 0 && $1 != -- ]]; do variants+=("$1"); shift; done
[[ $# -gt 0 ]] && shift
[[ ${#variants[@]} -gt 0 ]] || { echo "usage: $0 BASE_RUN SWEEP_RUN VARIANTS... -- OVERRIDES..." >&2; exit 2; }
mkdir -p "$sweep/stages"
for stage in "$base"/stages/{stage1,distill,stage2}-*; do
  if [[ -f $stage/done.json ]]; then ln -sfn "$(realpath "$stage")" "$sweep/stages/$(basename "$stage")"; fi
done
bin=$(dirname "$(realpath "$0")")/../../.venv/bin
"$bin/sellarec-train" run "${variants[@]}" --config "${CONFIG:-training/configs/ml1m.yaml}" --out "$sweep" "$@"
