"""Triton APM merging (interpreter on CPU; bf16 on CUDA only) against the reference: z, dx, dweight, dbias."""

from __future__ import annotations

import pytest
import torch

from kernels.apm_merge import reference as apm_ref
from tests.kernels.kernel_helpers import assert_close, grads


def check(fn, shape, reduce, dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    c = shape[-1]
    x = torch.randn(shape, generator=g).to(dtype).to(device).requires_grad_()
    wt = (1 + 0.2 * torch.randn(4 * c, generator=g)).to(device).requires_grad_()
    bs = (0.2 * torch.randn(4 * c, generator=g)).to(device).requires_grad_()
    z = fn.apm_merge(x, wt, bs, reduce, 1e-5)
    expected = apm_ref.apm_merge(x, wt, bs, reduce, 1e-5)
    assert_close(z, expected, dtype, "z")
    go = torch.randn(z.shape, generator=g).to(dtype).to(device)
    for name, a, e in zip(("x", "weight", "bias"), grads(z, [x, wt, bs], go), grads(expected, [x, wt, bs], go)):
        assert_close(a, e, dtype, f"d{name}")


# (B, H, W, C): even grid, odd H and W (zero-padded row/column), odd C, a single token, one row.
CASES = [((2, 4, 6, 8), True), ((2, 5, 7, 6), True), ((1, 3, 5, 5), True), ((1, 1, 1, 3), True),
         ((1, 4, 4, 5), False), ((2, 3, 1, 7), False), ((1, 1, 5, 4), True)]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,reduce", CASES, ids=lambda c: str(c))
def test_apm_merge(interpret, shape, reduce, dtype):
    check(interpret("apm_merge"), shape, reduce, dtype)


def test_apm_merge_many_rows_per_program(interpret):
    # 4 backward programs on CPU: 25 rows -> 7, 7, 7, 4 per program: the per-program loop and the partial sums.
    check(interpret("apm_merge"), (1, 10, 9, 3), True, torch.float32)


def test_apm_merge_rejects_bad_inputs(interpret):
    fn = interpret("apm_merge")
    x = torch.randn(1, 4, 4, 3)
    with pytest.raises(ValueError):
        fn.apm_merge(x, torch.ones(8), torch.zeros(12), True)
    with pytest.raises(ValueError):
        fn.apm_merge(x[0], torch.ones(12), torch.zeros(12), True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape,reduce", [((2, 33, 31, 352), True), ((4, 16, 16, 704), False), ((1, 9, 9, 1408), True)])
def test_apm_merge_cuda(cuda_kernels, shape, reduce, dtype):
    check(cuda_kernels("apm_merge"), shape, reduce, dtype, device="cuda")
