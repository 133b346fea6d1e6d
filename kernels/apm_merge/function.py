"""Autograd wrapper of the Triton APM merging kernels (gradients for x, ln_weight, ln_bias)."""

from __future__ import annotations

import torch

from kernels.apm_merge import kernel


class ApmMergeFunction(torch.autograd.Function):
    """z = LayerNorm(gather2x2(x) or cat[x, x, x, x]); saves x and per-token (mean, rstd), not the merged input."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, reduce: bool, eps: float):
        z, mean, rstd = kernel.apm_merge_fwd(x, ln_weight, ln_bias, reduce, eps)
        ctx.save_for_backward(x, ln_weight, mean, rstd)
        ctx.reduce = reduce
        return z

    @staticmethod
    def backward(ctx, grad_z):
        x, ln_weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = kernel.apm_merge_bwd(x, ln_weight, mean, rstd, grad_z, ctx.reduce)
        return dx, dw, db, None, None


def apm_merge(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, reduce: bool, eps: float = 1e-5
) -> torch.Tensor:
    """Triton APM merge. x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 4C) if reduce else (B, H, W, 4C)."""
    return ApmMergeFunction.apply(x, ln_weight, ln_bias, bool(reduce), float(eps))


def supported(x: torch.Tensor) -> bool:
    """Whether the kernel handles this channel count (else the dispatch falls back to the reference)."""
    return x.shape[-1] <= kernel.MAX_CHANNELS
