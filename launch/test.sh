#!/usr/bin/env bash
# Set up .venv when absent and run the test suite. Extra arguments go to pytest (e.g. -m "not slow", -k dataprep).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
python -m pytest -q --timeout 900 "$@"
