#!/usr/bin/env bash
# The full service under load: Redis store, real HTTP, the batcher; the numbers of
# docs/performance.md ("Service under load").
#
#   bash scripts/perf/service_load.sh [BUNDLE] [OUT]      (defaults: artifacts/demo runs/perf)
#
# Loads BUNDLE into the local Redis under a throw-away prefix, starts `sellarec-serve` on
# it, and runs, all on /rerank with CANDIDATES candidates (default 100) and the bundle's
# known users and items:
#   1. idle: one request at a time -> idle p50;
#   2. saturation: closed loop at concurrency 1, 2 and 4 -> the service's best candidates/s,
#      and the model thread's own rate over the same run (sellarec_batch_duration_seconds);
#   3. open loop: Poisson arrivals at half the saturated request rate -> p99 vs idle p50.
# Everything is bounded in requests and seconds; the server and the Redis keys are removed
# at the end. Needs the package installed (make setup) and Redis at 127.0.0.1:6379.
# Knobs (environment): CANDIDATES, CONCURRENCIES (1,2,4), STEP_REQUESTS (12), OPEN_LOOP_S
# (180), PORT (8011), and any SELLAREC_* server setting (e.g. SELLAREC_MAX_BATCH_REQUESTS=1).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUNDLE=${1:-artifacts/demo}
OUT=${2:-runs/perf}
CANDIDATES=${CANDIDATES:-100}
PORT=${PORT:-8011}
BIN=.venv/bin
URL=http://127.0.0.1:$PORT
export SELLAREC_REDIS_URL=${SELLAREC_REDIS_URL:-redis://127.0.0.1:6379/0}
export SELLAREC_REDIS_PREFIX=sellarec-perf-$$
mkdir -p "$OUT"

cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  redis-cli -u "$SELLAREC_REDIS_URL" --scan --pattern "$SELLAREC_REDIS_PREFIX*" \
    | xargs -r redis-cli -u "$SELLAREC_REDIS_URL" del >/dev/null || true
}
trap cleanup EXIT

# The bundle's own ids, so every request is a known user with its stored history.
$BIN/python - "$BUNDLE" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
catalog = json.loads((Path(sys.argv[1]) / "catalog.json").read_text())
out = Path(sys.argv[2])
(out / "users.json").write_text(json.dumps(catalog["users"]))
(out / "items.json").write_text(json.dumps(catalog["items"]))
EOF
ids=(--users-file "$OUT/users.json" --items-file "$OUT/items.json" --candidates "$CANDIDATES" --endpoint rerank)

$BIN/sellarec-store load --artifacts "$BUNDLE"
$BIN/sellarec-serve --artifacts "$BUNDLE" --port "$PORT" --log-level warning &
server=$!

metric() {  # the sum of one metric's samples
  curl -s "$URL/metrics" | awk -v m="$1" '$1 == m {s += $2} END {printf "%.6f\n", s}'
}

$BIN/sellarec-loadtest idle --url "$URL" "${ids[@]}" --requests 8 --warmup 2 --wait-ready 300 \
  --timeout 120 --json-out "$OUT/idle.json"

busy0=$(metric sellarec_batch_duration_seconds_sum)
scored0=$(metric sellarec_candidates_scored_total)
$BIN/sellarec-loadtest sweep --url "$URL" "${ids[@]}" --concurrencies "${CONCURRENCIES:-1,2,4}" \
  --requests "${STEP_REQUESTS:-12}" --warmup 2 \
  --timeout 300 --json-out "$OUT/sweep.json" --plot-out "$OUT/sweep.png"
busy1=$(metric sellarec_batch_duration_seconds_sum)
scored1=$(metric sellarec_candidates_scored_total)

half=$($BIN/python - "$OUT" "$busy0" "$busy1" "$scored0" "$scored1" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
b0, b1, s0, s1 = map(float, sys.argv[2:])
steps = json.loads((out / "sweep.json").read_text())["steps"]
best = max(steps, key=lambda s: s["candidates_per_s"] or 0)
model_rate = (s1 - s0) / (b1 - b0)
summary = {
    "service_candidates_per_s": best["candidates_per_s"],
    "at_concurrency": best["concurrency"],
    "model_thread_candidates_per_s": model_rate,
    "service_vs_model_thread": best["candidates_per_s"] / model_rate,
    "half_rate_requests_per_s": best["ok_requests_per_s"] / 2,
}
(out / "saturation.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary), file=sys.stderr)
print(f"{summary['half_rate_requests_per_s']:.4f}")
EOF
)

duration=${OPEN_LOOP_S:-180}
$BIN/sellarec-loadtest run --url "$URL" "${ids[@]}" --rate "$half" --duration "$duration" --warmup 0 \
  --timeout 300 --json-out "$OUT/open-loop.json"

$BIN/python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
idle = json.loads((out / "idle.json").read_text())
open_loop = json.loads((out / "open-loop.json").read_text())
sat = json.loads((out / "saturation.json").read_text())
sat.update(
    idle_p50_ms=idle["latency_p50_ms"],
    open_loop_rate=open_loop["target_rate"],
    open_loop_requests=open_loop["ok"],
    open_loop_p50_ms=open_loop["latency_p50_ms"],
    open_loop_p99_ms=open_loop["latency_p99_ms"],
    p99_vs_idle_p50=open_loop["latency_p99_ms"] / idle["latency_p50_ms"],
)
(out / "summary.json").write_text(json.dumps(sat, indent=2))
print(json.dumps(sat, indent=2))
EOF
