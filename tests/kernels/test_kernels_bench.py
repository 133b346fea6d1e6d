"""`python -m kernels.bench`: the no-GPU exit path, the peak table, the full measuring path via the interpreter
(JSON report, drift of the atomic gradients), and the paper shapes against what the huge model really calls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.bench import PAPER, device_peak

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
def test_bench_smoke_through_interpreter(tmp_path):
    out = tmp_path / "bench.json"
    res = bench("--smoke", "--no-compile", "--reps", "1", "--drift-reps", "3", "--json", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert lines[0].startswith("device: ") and "unknown peak" in res.stdout
    assert "baseline: trainer/model/ops.py" in res.stdout
    for op in ("window_attention fwd+bwd", "apm_merge fwd+bwd", "top1_route", "moe_dispatch", "moe_combine"):
        row = next((ln for ln in lines if ln.startswith(op)), None)
        assert row is not None and "FAILED" not in row, f"{op}: {row}"
        err = float(row.split()[-3])  # max relative error against the model's PyTorch fallback
        assert err < 1e-4, row
    report = json.loads(out.read_text())
    assert report["failures"] == 0 and report["shapes"] == "smoke" and len(report["rows"]) == 10
    assert all(r["ms"] > 0 and r["ms_torch"] > 0 and r["ms_compile"] is None for r in report["rows"])
    (drift,) = report["drift"]
    assert drift["reps"] == 3 and drift["qkv_bitwise_identical"]
    assert 0 <= drift["bias_table"] < 1e-5 and 0 <= drift["logit_scale"] < 1e-5


@pytest.mark.slow
def test_paper_shapes_are_what_the_huge_model_calls():
    """The bench's PAPER table equals the shapes the huge backbone passes to each op for 8 HR images of 512 px."""
    from trainer.model import build_model, ops
    from trainer.model.config import huge_model

    seen = {"window_attention": set(), "apm_merge": set(), "moe_routing": set()}
    real = {n: getattr(ops, n) for n in ("window_attention", "apm_merge", "top1_route")}

    def wa(q, k, v, ls, bt, window, shift):
        seen["window_attention"].add((*q.shape, window, shift))
        return real["window_attention"](q, k, v, ls, bt, window, shift)

    def apm(x, w, b, reduce, eps=1e-5):
        seen["apm_merge"].add((*x.shape, reduce))
        return real["apm_merge"](x, w, b, reduce, eps)

    def route(x, wg, capacity, drop_tokens=True, **kw):
        seen["moe_routing"].add((x.shape[0], x.shape[1], wg.shape[0], capacity))
        return real["top1_route"](x, wg, capacity, drop_tokens, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(ops, "window_attention", wa)
    mp.setattr(ops, "apm_merge", apm)
    mp.setattr(ops, "top1_route", route)
    try:
        model = build_model(huge_model(), device="meta")
        with torch.no_grad():
            model.forward_features(torch.empty(8, 3, 512, 512, device="meta"), "hr")
    finally:
        mp.undo()
    assert seen["window_attention"] == set(PAPER["window_attention"])
    assert seen["apm_merge"] == set(PAPER["apm_merge"])
    cf = huge_model().moe.capacity_factor
    assert seen["moe_routing"] == {(n, d, e, -(-int(cf * n) // e)) for n, d, e, _ in PAPER["moe_routing"]}
