"""The planner's step-time inputs against hand counts: what LiveBytes writes down per op, the optimizer's bytes per
parameter, the roofline, and the CPU validation's matmul timer rebuilding the traced shapes."""

import pytest
import torch

from trainer import plan, plan_validate
from trainer.plan_trace import LiveBytes


def test_live_bytes_counts_writes_and_keys_matmuls_by_shape():
    a, b, bias = torch.randn(6, 5), torch.randn(5, 7), torch.zeros(7)
    x = torch.zeros(100)
    live = LiveBytes(exclude=[a, b, bias, x])
    with live:
        y = a @ b  # matmul-class: keyed, not in `written`
        z = torch.addmm(bias, a, b)
        a @ b
        x.add_(1.0)  # in-place: 100 floats written into existing storage
        w = x * 2.0  # new storage: 100 floats
        v = w.view(10, 10)  # a view writes nothing
        torch._foreach_mul_([x, w], 0.5)  # in-place on a list: 200 floats
    assert live.written == 4 * (100 + 100 + 200)
    mm = live.matmuls
    assert mm["mm[(6, 5), (5, 7)]"] == [2, 2 * 6 * 5 * 7, 6 * 7 * 4]
    assert mm["addmm[(7,), (6, 5), (5, 7)]"] == [1, 2 * 6 * 5 * 7, 6 * 7 * 4]
    assert len(mm) == 2 and live.ops >= 7
    del y, z, v


def test_optimizer_bytes_per_parameter_by_hand():
    got = plan.optimizer_written_per_param()
    # torch's single-tensor AdamW step writes 8 full-size tensors (traced: p.mul_ for the decoupled decay,
    # m.lerp_, v.mul_, v.addcmul_, v.sqrt(), .div(bias correction), .add_(eps), p.addcdiv_), then the copy into
    # the weights: 9 fp32 writes. The EMA: foreach mul_ + add_ over the teacher, 2 writes.
    assert got["optimizer"] == pytest.approx(4 * 9, abs=0.01)
    assert got["ema"] == 4 * 2


def test_roofline_takes_the_longer_of_flops_and_bytes():
    mm = {"a": [3, 1e9, 1e6], "b": [2, 1e6, 1e9]}  # compute-bound, memory-bound
    peak, rate = 1e12, 1e10
    assert plan.matmul_roofline(mm, peak, rate) == pytest.approx(3 * 1e-3 + 2 * 0.1)


def test_cpu_timer_rebuilds_the_traced_shapes(monkeypatch):
    seen = []

    def fake_mm(x, y):
        seen.append((tuple(x.shape), tuple(y.shape)))
        return x @ y

    monkeypatch.setitem(plan_validate.TIMED_MATMULS, "mm", fake_mm)
    timer = plan_validate.CpuMatmulTimer(gflops=10.0, min_s=0.0)
    total = timer({"mm[(4, 3), (3, 2)]": [5, 48, 32], "convolution[(1, 3, 8, 8), (4, 3, 2, 2)]": [2, 1e9, 0]})
    assert set(seen) == {((4, 3), (3, 2))}  # timed with tensors of the key's shapes
    t = timer.times["mm[(4, 3), (3, 2)]"]
    assert t > 0 and total == pytest.approx(5 * t + 2 * 1e9 / 10e9)  # untimed ops: FLOPs at the calibrated rate
