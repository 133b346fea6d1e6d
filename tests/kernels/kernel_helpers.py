"""Comparison helpers shared by the kernel tests."""

from __future__ import annotations

import torch

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}  # max |error| / max |expected|


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0):
    """Max abs error relative to the largest expected magnitude, within factor x the tolerance of the dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    if e.numel() == 0:
        return
    err = (a - e).abs().max().item()
    ref = max(e.abs().max().item(), 1e-3)
    tol = TOL[dtype] * factor
    assert err <= tol * ref, f"{what}: max error {err:.3g} > {tol:.0e} x {ref:.3g} ({dtype})"


def grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs, grad_out, allow_unused=False))
