"""`auto` smoke-launches the kernels before its first Triton call and falls back to the PyTorch path, with one
warning, when a launch fails (simulated: "device kernel image is invalid") or returns garbage. CUDA is simulated by
treating CPU tensors as eligible and running the kernels through Triton's interpreter."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import kernels
from trainer.model import ops


@pytest.fixture
def fake_cuda(interpret, monkeypatch):
    """`auto` sees CPU tensors as CUDA ones; fresh smoke cache and fallback state; interpreter kernels loaded."""
    for op in ("window_attention", "apm_merge", "moe_routing"):
        interpret(op)
    monkeypatch.setattr(kernels, "_cuda_ok", lambda t: t.device.type == "cpu")
    monkeypatch.setattr(kernels, "_smoke", {})
    monkeypatch.setattr(kernels, "_fallback", None)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


def wa_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 6, 2, 8, generator=g).requires_grad_() for _ in range(3))
    ls = torch.full((2,), math.log(10.0), requires_grad=True)
    bt = torch.rand(2, 49, generator=g).requires_grad_()
    return q, k, v, ls, bt


def invalid_image(*args, **kwargs):
    raise RuntimeError("CUDA error: device kernel image is invalid")


def test_working_kernels_are_used_after_the_smoke(fake_cuda):
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernels.KernelFallbackWarning)
        out = ops.window_attention(*wa_inputs(), 4, 2)
    assert "WindowAttention" in type(out.grad_fn).__name__, "auto did not pick the kernel"
    assert kernels.fallback_reason() is None
    assert kernels.check_kernels("cpu", torch.float32) == dict.fromkeys(
        ("window_attention", "apm_merge", "moe_routing")
    )


def test_failing_launch_falls_back_with_one_warning(fake_cuda, monkeypatch):
    from kernels.window_attention import kernel as wa_kernel

    monkeypatch.setattr(wa_kernel, "window_attention_fwd", invalid_image)
    args = wa_inputs()
    with pytest.warns(kernels.KernelFallbackWarning, match="device kernel image is invalid") as rec:
        out = ops.window_attention(*args, 4, 2)
        x = torch.randn(1, 4, 4, 8, requires_grad=True)
        z = ops.apm_merge(x, torch.ones(32), torch.zeros(32), True)  # the whole process falls back, not one op
        out2 = ops.window_attention(*args, 4, 2)
    assert len([w for w in rec if issubclass(w.category, kernels.KernelFallbackWarning)]) == 1
    assert "WindowAttention" not in type(out.grad_fn).__name__
    assert "ApmMerge" not in type(z.grad_fn).__name__
    assert "window_attention" in kernels.fallback_reason()
    kernels.set_backend("reference")
    torch.testing.assert_close(out, ops.window_attention(*args, 4, 2), rtol=0, atol=0)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    out.sum().backward()  # the run goes on: backward through the PyTorch path
    assert torch.isfinite(args[0].grad).all()


def test_garbage_results_fall_back(fake_cuda, monkeypatch):
    from kernels.apm_merge import kernel as apm_kernel

    real = apm_kernel.apm_merge_fwd

    def wrong(*a, **kw):
        z, mean, rstd = real(*a, **kw)
        return z * 2.0, mean, rstd

    monkeypatch.setattr(apm_kernel, "apm_merge_fwd", wrong)
    x = torch.randn(1, 4, 4, 8)
    with pytest.warns(kernels.KernelFallbackWarning, match="apm_merge.*differs from the reference"):
        assert not kernels.use_triton(x)
    result = kernels.check_kernels("cpu", torch.float32)
    assert result["apm_merge"] is not None and result["window_attention"] is None


def test_smoke_is_isolated_from_the_callers_context(fake_cuda):
    """Started inside a no-grad, checkpointed (saved-tensor hooks), seeded forward: still runs, RNG untouched."""

    def pack(t):
        raise AssertionError("the smoke's autograd graph went through the caller's saved-tensor hooks")

    torch.manual_seed(123)
    state = torch.get_rng_state()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        assert kernels.use_triton(torch.zeros(2))
    assert kernels.fallback_reason() is None
    assert torch.equal(torch.get_rng_state(), state), "the smoke consumed the global RNG"


def test_reference_and_triton_backends_never_smoke(fake_cuda, monkeypatch):
    monkeypatch.setattr(kernels, "check_kernels", lambda *a: pytest.fail("smoke launched outside auto"))
    kernels.set_backend("reference")
    assert not kernels.use_triton(torch.zeros(2))
    kernels.set_backend("triton")
    assert kernels.use_triton(torch.zeros(2))
