#!/usr/bin/env bash
# The learning benchmark: pretrain the `learn` recipe on unlabelled aerial scenes (default ../shared/data/aid-unlabeled)
# for a fixed step budget (~15 min on 2 CPU cores), then k-NN of the teacher vs random init and a colour histogram.
# Usage: bash launch/learning.sh [--images DIR] [--eval DIR ...] [--steps N] [--set key=value ...] [--skip-train]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
exec python -m trainer.learning_bench "$@"
