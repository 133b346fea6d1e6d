#!/usr/bin/env bash
# Write a DeepSpeed hostfile ("host slots=N" per line) for this Slurm job's nodes, in Slurm's node order.
# Usage: bash launch/slurm/hostfile.sh OUT   (SLURM_JOB_NODELIST from the job; SLOTS default: GPUs per node)
set -euo pipefail
out="${1:?usage: hostfile.sh OUT}"
: "${SLURM_JOB_NODELIST:?not inside a Slurm job (SLURM_JOB_NODELIST is unset)}"
# SLURM_GPUS_ON_NODE is set inside a step; SLURM_GPUS_PER_NODE may read "h100:8".
SLOTS="${SLOTS:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}}"
SLOTS="${SLOTS##*:}"
hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
[ -n "$hosts" ] || { echo "hostfile.sh: no hosts in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2; exit 2; }
tmp="$out.$$"
while read -r host; do echo "$host slots=$SLOTS"; done <<<"$hosts" >"$tmp"
mv "$tmp" "$out"
