"""Autograd wrapper of the Triton window-attention kernels (gradients for q, k, v, logit_scale, bias_table)."""

from __future__ import annotations

import torch

from kernels.window_attention import kernel


class WindowAttentionFunction(torch.autograd.Function):
    """out = window_attention(q, k, v, logit_scale, bias_table, window, shift); the backward recomputes the
    probabilities from q, k, v (nothing of size N x N is saved)."""

    @staticmethod
    def forward(ctx, q, k, v, logit_scale, bias_table, window: int, shift: int):
        out = kernel.window_attention_fwd(q, k, v, logit_scale, bias_table, window, shift)
        ctx.save_for_backward(q, k, v, logit_scale, bias_table)
        ctx.window, ctx.shift = window, shift
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, logit_scale, bias_table = ctx.saved_tensors
        dq, dk, dv, dls, dbias = kernel.window_attention_bwd(
            q, k, v, logit_scale, bias_table, grad_out, ctx.window, ctx.shift
        )
        return dq, dk, dv, dls, dbias, None, None


def supported(q: torch.Tensor, window: int) -> bool:
    """Whether the kernel handles this head dim and window (else the dispatch falls back to the reference)."""
    return window <= kernel.MAX_WINDOW and q.shape[-1] <= kernel.MAX_HEAD_DIM


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    bias_table: torch.Tensor,
    window: int,
    shift: int,
) -> torch.Tensor:
    """Triton SwinV2 window attention. q, k, v: (B, H, W, nh, d) -> (B, H, W, nh, d); see reference.py."""
    return WindowAttentionFunction.apply(q, k, v, logit_scale, bias_table, int(window), int(shift))
