#!/usr/bin/env bash
""":"
# This file is both bash and Python. As bash it sets defaults and execs the deepspeed launcher on itself;
# the launcher then runs it as `python -u` on every rank, which skips this string and runs the Python tail.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# LAUNCHER=none: one plain process (pass --rank/--world-size yourself, e.g. a loop over ranks).
if [ "${LAUNCHER:-deepspeed}" = "none" ]; then
  exec "$PYTHON" -u "$0" "$@"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
ARGS=()
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29571}")
  [ -n "${NODE_RANK:-}" ] && ARGS+=(--no_ssh --node_rank "$NODE_RANK")
else
  ARGS+=(--num_gpus "${NPROC:-1}" --master_port "${MASTER_PORT:-29571}")
fi
DEEPSPEED="${DEEPSPEED:-$(dirname "$PYTHON")/deepspeed}"
[ -x "$DEEPSPEED" ] || DEEPSPEED=deepspeed
exec "$DEEPSPEED" "${ARGS[@]}" "$0" "$@"
":"""
# Python tail: one rank of `python -m dataprep convert`; RANK / WORLD_SIZE come from the launcher's environment.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataprep.__main__ import main  # noqa: E402

argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher adds --local_rank=N
sys.exit(main(["convert", *argv]))
