#!/usr/bin/env bash
# First contact with a machine with NVIDIA GPUs, at most ~8 minutes on one H100/H200: versions, venv setup (keeps
# the system's CUDA torch and its Triton), kernel smoke launch, `pytest -m gpu`, the kernel bench at paper shapes,
# 20 bf16 tiny steps with the Triton kernels on and off (same losses), a one-step probe of `huge` at micro-batch 1.
# Every step is time-boxed; a failing step never stops the later ones. Writes OUT/report.json and OUT/report.txt.
#
# Usage: bash launch/gpu-check.sh [--dry-run] [--no-setup] [--out DIR] [--budget SECONDS] [driver flags...]
#   --dry-run   the whole flow on CPU at toy sizes (interpreted kernels, fp32, 2 steps), as the tests run it
#   --no-setup  use the current environment (the venv at $VENV, or this python) instead of running setup.sh
#   driver flags go to `python -m trainer.gpu_check run`: --steps N, --loss-rtol X, --skip a,b, --bench-ops ...
# Environment: GPU_CHECK_OUT (default runs/gpu-check), GPU_CHECK_BUDGET (480), SETUP_TIMEOUT (180), VENV.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${GPU_CHECK_OUT:-$ROOT/runs/gpu-check}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
SETUP_TIMEOUT="${SETUP_TIMEOUT:-180}"
VENV="${VENV:-$ROOT/.venv}"
DRY=0
SETUP=1
args=()
while (($#)); do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --no-setup) SETUP=0; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
start=$(date +%s)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
echo "== versions before setup"
timeout 20 nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>&1 \
  || echo "nvidia-smi: not available"
timeout 20 nvidia-smi 2>/dev/null | grep -o "CUDA Version: [0-9.]*" || true
timeout 60 "${PYTHON_BIN:-python3}" -c 'import torch; print("system torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available())' 2>&1 | tail -1 || true
timeout 30 "${PYTHON_BIN:-python3}" -c 'import triton; print("system triton", triton.__version__)' 2>&1 | tail -1 || true
setup_rc=skipped
t0=$(date +%s)
if [ "$SETUP" = 1 ]; then
  echo "== setup (log: $OUT/setup.log)"
  setup_rc=0
  VENV="$VENV" timeout "$SETUP_TIMEOUT" bash -c 'source "$1/launch/setup.sh"' setup "$ROOT" >"$OUT/setup.log" 2>&1 \
    || setup_rc=$?
  echo "   setup exit $setup_rc ($(( $(date +%s) - t0 )) s)"
fi
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi
if [ "$DRY" = 1 ]; then args+=(--dry-run); fi
cd "$ROOT"
exec "$PY" -m trainer.gpu_check run --out "$OUT" --budget "$BUDGET" --started-at "$start" --setup-rc "$setup_rc" \
  --setup-seconds "$(( $(date +%s) - t0 ))" --setup-log "$OUT/setup.log" "${args[@]}"
