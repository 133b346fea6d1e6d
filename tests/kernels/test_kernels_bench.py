"""`python -m kernels.bench`: the no-GPU exit path, the peak table, and the full measuring path via the interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.bench import device_peak

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kernels.bench", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_peak_table():
    assert device_peak("NVIDIA H100 80GB HBM3") == (989.0, 3.35)
    assert device_peak("NVIDIA H200") == (989.0, 4.8)
    assert device_peak("NVIDIA H20") == (148.0, 4.0)
    assert device_peak("NVIDIA H100 PCIe") == (756.0, 2.0)
    assert device_peak("Some Future GPU") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed where there is no CUDA device")
def test_bench_without_cuda_exits_cleanly():
    res = bench()
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no CUDA device" in res.stdout


@pytest.mark.slow
def test_bench_smoke_through_interpreter():
    res = bench("--smoke", "--no-compile", "--reps", "1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("device: ") and "unknown peak" in res.stdout
    for op in ("window_attention fwd+bwd", "apm_merge fwd+bwd", "top1_route", "moe_dispatch", "moe_combine"):
        row = next((ln for ln in lines if ln.startswith(op)), None)
        assert row is not None and "FAILED" not in row, f"{op}: {row}"
        err = float(row.split()[-3])  # max relative error against the reference
        assert err < 1e-4, row
