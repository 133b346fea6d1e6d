#!/usr/bin/env bash
""":"
# This file is both bash and Python: `bash launch/pretrain.sh ARGS` runs this wrapper, which execs the deepspeed
# launcher on this same file; the launcher then runs it on every rank as `python -u FILE`, i.e. the Python tail.
#
# Usage: bash launch/pretrain.sh [--hostfile FILE] [--num-ranks N] [--node-rank R --no-ssh] [--master-addr A]
#            [--master-port P] [--print-only] --recipe tiny --data DIR [--set key=value ...] [--max-steps N]
#            [--run-dir DIR] [--dry-run]
# Also valid: deepspeed [--hostfile FILE] launch/pretrain.sh ARGS   (the launcher first, as operators type it; that
# form keeps DeepSpeed's own signal handling: use the first form where jobs are preempted)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [ -x "$root/.venv/bin/deepspeed" ]; then DEEPSPEED="${DEEPSPEED:-$root/.venv/bin/deepspeed}"; fi
DEEPSPEED="${DEEPSPEED:-deepspeed}"
HOSTFILE="${HOSTFILE:-}"
NUM_RANKS="${NUM_RANKS:-}"
NODE_RANK="${NODE_RANK:-}"
NO_SSH="${NO_SSH:-0}"
MASTER_ADDR="${MASTER_ADDR:-}"
MASTER_PORT="${MASTER_PORT:-29500}"
PRINT_ONLY=0
args=()
while (($#)); do
  case "$1" in
    --hostfile) HOSTFILE="$2"; shift 2 ;;
    --num-ranks) NUM_RANKS="$2"; shift 2 ;;
    --node-rank) NODE_RANK="$2"; shift 2 ;;
    --no-ssh) NO_SSH=1; shift ;;
    --master-addr) MASTER_ADDR="$2"; shift 2 ;;
    --master-port) MASTER_PORT="$2"; shift 2 ;;
    --print-only) PRINT_ONLY=1; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
fi
launcher=(--master_port "$MASTER_PORT")
verbose="${SKYSENSE_VERBOSE:-0}"
for a in "${args[@]}"; do [ "$a" = --verbose ] && verbose=1; done
# The launcher's own INFO lines (world info, spawn commands) and its "no hostfile" warning are not an operator's
# business on a normal start; its errors still print, and --verbose (or SKYSENSE_VERBOSE=1) restores everything.
[ "$verbose" = 1 ] || launcher+=(--log_level error)
if [ -n "$HOSTFILE" ]; then
  [ -f "$HOSTFILE" ] || { echo "pretrain.sh: hostfile $HOSTFILE not found" >&2; exit 2; }
  launcher+=(--hostfile "$HOSTFILE")
  [ -n "$MASTER_ADDR" ] && launcher+=(--master_addr "$MASTER_ADDR")
  if [ "$NO_SSH" = 1 ]; then
    # No ssh between nodes: start this script once per node with its --node-rank; the launchers meet at master.
    [ -n "$NODE_RANK" ] && [ -n "$MASTER_ADDR" ] || {
      echo "pretrain.sh: --no-ssh needs --node-rank R and --master-addr A (run once per node)" >&2; exit 2; }
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
  elif [ "$(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE")" = 1 ]; then
    launcher+=(--no_ssh_check)  # one node: nothing to ssh to
  fi
else
  if [ -z "$NUM_RANKS" ]; then
    if [ "${DS_ACCELERATOR:-}" = cpu ]; then NUM_RANKS=2; else NUM_RANKS="$(nvidia-smi -L | wc -l)"; fi
  fi
  launcher+=(--num_gpus "$NUM_RANKS" --master_addr "${MASTER_ADDR:-127.0.0.1}")
  if [ "${DS_ACCELERATOR:-}" = cpu ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
    # Ranks share this machine's cores; torch would give each rank all of them.
    threads=$(( $(nproc) / NUM_RANKS )); export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
  fi
fi
if [ "${DS_ACCELERATOR:-}" = cpu ] && command -v numactl >/dev/null 2>&1 && [ "${BIND_CORES:-1}" = 1 ]; then
  launcher+=(--bind_cores_to_rank)  # ~3x faster CPU steps (ENVIRONMENT.md)
fi
if [ "$PRINT_ONLY" = 1 ]; then
  echo "$DEEPSPEED ${launcher[*]} $0 ${args[*]}"
  exit 0
fi
# The launcher runs with SIGTERM/SIGINT blocked (the mask is inherited through exec and fork; every rank unblocks
# them, trainer/preempt.py): left alone, DeepSpeed's launcher answers a preemption signal by signalling every rank
# again (which must mean "exit now") and killing them 30 s later. The ranks checkpoint and exit 0, and so does it.
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PYTHON" -c 'import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
os.execvp(sys.argv[1], sys.argv[1:])' "$DEEPSPEED" "${launcher[@]}" "$0" "${args[@]}"
":"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trainer.pretrain import main  # noqa: E402

sys.exit(main())
