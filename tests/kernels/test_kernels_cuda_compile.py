"""Every Triton kernel compiles for a real GPU (sm_90, bf16 at paper shapes) through Triton's own ptxas, here on
a CPU-only machine: catches what the interpreter cannot (typing, lowering, register/shared-memory limits)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "kernels.cuda_compile", "--targets", "90", "--quick"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0 and "FAIL" not in res.stdout:
        # No compiler toolchain for CUDA in this Triton build (e.g. a CPU-only wheel): nothing to check here.
        pytest.skip(f"cannot compile for CUDA here: {res.stderr.strip().splitlines()[-1:]}")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert res.stdout.count("ok   sm_90") >= 9, res.stdout
