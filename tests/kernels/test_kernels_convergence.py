"""Convergence: the tiny model trained a few steps with the Triton kernels (interpreter) and with the references
reaches the same losses. The kernels are swapped in where the model calls them, `trainer.model.ops`."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

OPS = ("window_attention", "apm_merge", "top1_route", "moe_dispatch", "moe_combine")
STEPS = int(os.environ.get("SKYSENSE_CONVERGENCE_STEPS", "3"))


def train(backend: str, monkeypatch) -> list[float]:
    import kernels
    from trainer.model import build_model, ops, tiny_model

    calls = dict.fromkeys(OPS, 0)
    if backend == "triton":
        for name in OPS:
            fn = getattr(kernels, name)

            def counted(*args, _fn=fn, _name=name, **kw):
                calls[_name] += 1
                return _fn(*args, **kw)

            monkeypatch.setattr(ops, name, counted)
    kernels.set_backend(backend)
    try:
        torch.manual_seed(0)
        # Two blocks in stages 1-2 so the shifted-window path runs; MoE in the last two blocks (stages 3-4).
        cfg = dataclasses.replace(tiny_model(), depths=(2, 2, 1, 1))
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        hr = torch.randn(1, 3, 24, 24, generator=g)  # 6 x 6 tokens: windows of 4 padded to 8 x 8, shift 2; reduce
        s2 = torch.randn(1, 10, 12, 12, generator=g)  # 3 x 3 tokens: window clamped to 3, APM keep
        target = torch.randn(1, model.out_dim, generator=g)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            loss = 0.0
            for x, m in ((hr, "hr"), (s2, "s2")):
                out = model(x, m)
                loss = loss + (out["pooled"] - target).square().mean() + out["aux_loss"]
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        kernels.set_backend(None)
    if backend == "triton":
        assert all(calls.values()), f"some ops never ran through the kernels: {calls}"
    return losses


@pytest.mark.slow
def test_tiny_model_same_losses_with_and_without_kernels(interpret, monkeypatch):
    pytest.importorskip("deepspeed")
    for op in ("window_attention", "apm_merge", "moe_routing"):
        interpret(op)  # load the kernel modules under the interpreter (skips if they were loaded otherwise)
    ref = train("reference", monkeypatch)
    tri = train("triton", monkeypatch)
    print(f"losses reference {ref} kernels {tri}")
    assert ref[-1] < ref[0], f"the reference run does not learn: {ref}"
    for step, (a, b) in enumerate(zip(tri, ref)):
        assert abs(a - b) <= 1e-4 * abs(b) + 1e-5, f"step {step}: kernels {a:.6f} vs reference {b:.6f}"
