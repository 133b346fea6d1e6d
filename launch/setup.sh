# Sourced by demo.sh and test.sh: create .venv when absent and install the project into it.
# CPU machines get torch==2.13.0 (CPU build) installed FIRST so nothing pulls a multi-GB CUDA wheel; on a CUDA
# machine the venv sees the system's torch (--system-site-packages) and keeps it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  if has_cuda; then "$PYTHON_BIN" -m venv --system-site-packages "$VENV"; else "$PYTHON_BIN" -m venv "$VENV"; fi
fi
stamp="$VENV/.skysense-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/launch/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log="$VENV/install.log"
  echo "setup: installing the project into $VENV (a minute or two the first time; log: $log)"
  pip_install() { "$VENV/bin/pip" install "$@" >>"$log" 2>&1 || { tail -30 "$log" >&2; echo "setup: pip failed" >&2; exit 1; }; }
  if has_cuda && "$VENV/bin/python" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    # Keep the machine's torch AND the Triton built for it (constraints.txt pins the CPU machines' triton, which
    # would replace or shadow it; some torch builds ship it as pytorch-triton): pin both to what is installed,
    # install the other dependencies, then the project itself without dependencies.
    "$VENV/bin/python" "$ROOT/launch/cuda_deps.py" "$ROOT" "$VENV/cuda" >>"$log" 2>&1 \
      || { tail -30 "$log" >&2; echo "setup: cannot read the installed torch/triton" >&2; exit 1; }
    pip_install -c "$VENV/cuda-constraints.txt" -r "$VENV/cuda-requirements.txt"
    pip_install --no-deps -e "$ROOT"
  else
    pip_install "$TORCH_SPEC"
    pip_install -c "$ROOT/launch/constraints.txt" "$TORCH_SPEC" -e "$ROOT[test]"
  fi
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
