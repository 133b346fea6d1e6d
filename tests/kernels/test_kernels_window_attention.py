"""Triton window attention (interpreter on CPU; bf16 on CUDA only) against the reference: output and 5 gradients."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.window_attention import reference as wa_ref
from tests.kernels.kernel_helpers import assert_close, grads

NAMES = ("q", "k", "v", "logit_scale", "bias_table")


def make_inputs(b, h, w, nh, d, window, dtype, device="cpu", seed=0, qkv_view=False):
    g = torch.Generator().manual_seed(seed)
    if qkv_view:  # the model's layout: q, k, v are strided views of one projection
        qkv = torch.randn(b, h, w, 3, nh, d, generator=g).to(dtype).to(device).requires_grad_()
        q, k, v = qkv.unbind(3)
        leaves = [qkv]
    else:
        q, k, v = (torch.randn(b, h, w, nh, d, generator=g).to(dtype).to(device).requires_grad_() for _ in range(3))
        leaves = [q, k, v]
    scales = [math.log(10.0), 5.0, 1.5]  # 5.0 > log(100): clamped, no gradient
    ls = torch.tensor([scales[i % 3] for i in range(nh)], device=device).requires_grad_()
    bt = (16 * torch.sigmoid(torch.randn(nh, (2 * window - 1) ** 2, generator=g))).to(device).requires_grad_()
    return (q, k, v, ls, bt), leaves + [ls, bt]


def check(fn, b, h, w, nh, d, window, shift, dtype, device="cpu", qkv_view=False):
    args, leaves = make_inputs(b, h, w, nh, d, window, dtype, device, qkv_view=qkv_view)
    out = fn.window_attention(*args, window, shift)
    expected = wa_ref.window_attention(*args, window, shift)
    assert out.is_contiguous()
    assert_close(out, expected, dtype, "out")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    names = ("qkv",) + NAMES[3:] if qkv_view else NAMES
    for name, a, e in zip(names, grads(out, leaves, go), grads(expected, leaves, go)):
        # The shared parameters' gradients sum ~B*H*W*N cancelling terms; the kernel's half-precision matmuls
        # (tensor cores, like flash-attention) put a few 1e-2 of relative error on such sums; the fp32 reference none.
        factor = 4.0 if dtype != torch.float32 and name in NAMES[3:] else 1.0
        assert_close(a, e, dtype, f"d{name}", factor)


# (B, H, W, nh, d, window, shift): divisible grid, padding + shift, odd head dim, window 3 (N = 9 < block 16),
# window 2, a grid smaller than one window in one axis.
CASES = [
    (1, 8, 8, 2, 8, 4, 0),
    (2, 5, 7, 2, 8, 4, 2),
    (1, 9, 9, 1, 5, 4, 2),
    (1, 7, 5, 2, 12, 3, 1),
    (1, 4, 6, 2, 8, 2, 1),
    (1, 3, 9, 1, 16, 4, 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_window_attention_fp32(interpret, case):
    check(interpret("window_attention"), *case, torch.float32)


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=lambda c: "x".join(map(str, c)))
def test_window_attention_fp16(interpret, case):
    check(interpret("window_attention"), *case, torch.float16)


def test_window_attention_strided_qkv_views(interpret):
    check(interpret("window_attention"), 1, 6, 5, 2, 8, 4, 2, torch.float32, qkv_view=True)


def test_window_attention_rejects_bad_inputs(interpret):
    fn = interpret("window_attention")
    (q, k, v, ls, bt), _ = make_inputs(1, 4, 4, 2, 8, 4, torch.float32)
    with pytest.raises(ValueError):
        fn.window_attention(q, k[:, :2], v, ls, bt, 4, 0)
    with pytest.raises(ValueError):
        fn.window_attention(q, k, v, ls, bt[:, :10], 4, 0)
    with pytest.raises(TypeError):
        fn.window_attention(q, k.half(), v, ls, bt, 4, 0)


def test_window_attention_dispatch_forced_triton(interpret, monkeypatch):
    import kernels

    interpret("window_attention")
    monkeypatch.setenv(kernels.ENV_VAR, "triton")
    (q, k, v, ls, bt), _ = make_inputs(1, 5, 5, 1, 8, 4, torch.float32)
    out = kernels.window_attention(q, k, v, ls, bt, 4, 2)
    assert out.grad_fn is not None and "WindowAttention" in type(out.grad_fn).__name__
    assert_close(out, wa_ref.window_attention(q, k, v, ls, bt, 4, 2), torch.float32, "out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", [(2, 13, 11, 4, 32, 8, 4), (2, 16, 16, 3, 32, 8, 0), (1, 7, 9, 2, 24, 7, 3)])
def test_window_attention_cuda(cuda_kernels, case, dtype):
    check(cuda_kernels("window_attention"), *case, dtype, device="cuda", qkv_view=True)


@pytest.mark.gpu
def test_auto_dispatch_picks_triton_on_cuda(cuda_kernels, monkeypatch):
    import kernels

    cuda_kernels("window_attention")
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    (q, k, v, ls, bt), _ = make_inputs(1, 9, 9, 2, 32, 8, torch.bfloat16, "cuda")
    assert kernels.use_triton(q, k, v, ls, bt)
    out = kernels.window_attention(q, k, v, ls, bt, 8, 4)
    assert "WindowAttention" in type(out.grad_fn).__name__
    kernels.set_backend("reference")
    try:
        assert "WindowAttention" not in type(kernels.window_attention(q, k, v, ls, bt, 8, 4).grad_fn).__name__
    finally:
        kernels.set_backend(None)
