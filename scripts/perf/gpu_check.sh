#!/usr/bin/env bash
# The GPU check (docs/performance.md, "On a GPU"): bf16 agreement, then the engine against
# the straightforward path at qwen2-0.5b and qwen2-7b sizes, 100 and 500 candidates.
#
#   bash scripts/perf/gpu_check.sh [OUT] [options of python -m sellarec.bench.gpu_check]
#   bash scripts/perf/gpu_check.sh runs/gpu-check            # on a CUDA machine, < 8 minutes
#   bash scripts/perf/gpu_check.sh /tmp/gpu-smoke --smoke    # a dry run on the CPU, seconds
#
# Needs only this working tree and a Python with torch (CUDA build), transformers, peft,
# typer and rich (matplotlib for the figures): no network, no weights (the models are
# randomly initialised on the GPU, the tokenizer is built in code). The Python is
# $PYTHON, else the first of .venv/bin/python and python3 whose torch sees a GPU. When
# the sellarec package is not installed in it, the tree's folders are put on the path
# under the `sellarec` namespace (a temporary folder of links). Writes OUT/gpu_check.json
# (after every measurement), OUT/gpu-<arch>.png and OUT/gpu_check.log; exits 1 if the
# agreement check fails, 2 if there is no GPU, 124 if it ran past 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/gpu-check}
shift || true
SMOKE=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && SMOKE=1; done

has() { [ -n "$1" ] && command -v "$1" >/dev/null 2>&1 && "$1" -c "$2" >/dev/null 2>&1; }
PY=""
for candidate in "${PYTHON:-}" .venv/bin/python python3; do
  if has "$candidate" "import torch; assert torch.cuda.is_available()"; then PY=$candidate; break; fi
done
if [ -z "$PY" ]; then
  for candidate in "${PYTHON:-}" .venv/bin/python python3; do
    if has "$candidate" "import torch"; then PY=$candidate; break; fi
  done
  if [ -z "$PY" ]; then
    echo "gpu_check: no Python with torch found (set PYTHON=/path/to/python)" >&2
    exit 2
  fi
  if [ "$SMOKE" = 0 ]; then
    echo "gpu_check: $PY has torch $("$PY" -c 'import torch; print(torch.__version__)') but sees no CUDA GPU;" \
      "run on a GPU machine, or add --smoke for a CPU dry run" >&2
    exit 2
  fi
fi

if ! "$PY" -c "import sellarec.bench.gpu_check" >/dev/null 2>&1; then
  SHIM=$(mktemp -d)
  trap 'rm -rf "$SHIM"' EXIT
  mkdir "$SHIM/sellarec"
  for room in model training service loadtest bench; do ln -s "$PWD/$room" "$SHIM/sellarec/$room"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi

mkdir -p "$OUT"
echo "gpu_check: $PY ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
PYTHONUNBUFFERED=1 timeout 475 "$PY" -m sellarec.bench.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
