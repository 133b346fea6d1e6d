#!/usr/bin/env bash
# The whole pipeline on this machine: sample data -> dataprep -> a short tiny pretraining run on 2 ranks -> summary.
# Usage: bash launch/demo.sh [--verbose]   (DEMO_DIR, DEMO_SETS, DEMO_STEPS, DEMO_RANKS override the defaults)
# The console shows our progress lines, warnings and errors; --verbose adds every library's INFO lines.
set -euo pipefail
if [ "${1:-}" = --verbose ]; then export SKYSENSE_VERBOSE=1; fi
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
DEMO_DIR="${DEMO_DIR:-runs/demo}"
DEMO_SETS="${DEMO_SETS:-64}"
DEMO_STEPS="${DEMO_STEPS:-30}"
DEMO_RANKS="${DEMO_RANKS:-2}"
start=$(date +%s)
echo "== 1/4 sample data: $DEMO_SETS synthetic co-registered HR/S2/S1 sets"
python -m dataprep sample --out "$DEMO_DIR/raw" --sets "$DEMO_SETS" --seed 0
echo "== 2/4 dataprep convert -> Zarr shards + index.parquet"
python -m dataprep convert --manifest "$DEMO_DIR/raw/manifest.jsonl" --out "$DEMO_DIR/data" --workers 2 \
  --shard-size 16 || { rc=$?; [ "$rc" = 1 ] || exit "$rc"; echo "(some rows were rejected: see errors.parquet)"; }
echo "== 3/4 pretrain the tiny recipe on $DEMO_RANKS CPU ranks for $DEMO_STEPS steps"
rm -rf "$DEMO_DIR/run"
bash launch/pretrain.sh --num-ranks "$DEMO_RANKS" --master-port "${MASTER_PORT:-29511}" --recipe tiny \
  --data "$DEMO_DIR/data" --set train.max_steps="$DEMO_STEPS" --run-dir "$DEMO_DIR/run" --set metrics.port=9400
echo "== 4/4 summary and plots"
python -m trainer.report "$DEMO_DIR/run" >/dev/null  # PNGs into RUN/report/; the summary says where
python -m trainer.summary "$DEMO_DIR/run" --wall-seconds "$(( $(date +%s) - start ))"
