"""Autograd wrappers of the Triton routing, dispatch and combine kernels (same signatures as reference.py)."""

from __future__ import annotations

import torch

from kernels.moe_routing import kernel
from kernels.moe_routing.reference import Route, route_losses


class RouteFunction(torch.autograd.Function):
    """(x, gate_weight) -> gate, probs_mean, lse (differentiable) and expert, position, kept, counts (integers)."""

    @staticmethod
    def forward(ctx, x, gate_weight, capacity: int, drop_tokens: bool):
        probs, expert, position, kept, gate, lse, counts, probs_mean = kernel.route_fwd(
            x, gate_weight, capacity, drop_tokens
        )
        ctx.save_for_backward(x, gate_weight, probs, expert)
        ctx.mark_non_differentiable(expert, position, kept, counts)
        return gate, probs_mean, lse, expert, position, kept, counts

    @staticmethod
    def backward(ctx, grad_gate, grad_probs_mean, grad_lse, *_):
        x, gate_weight, probs, expert = ctx.saved_tensors
        n, e = probs.shape
        zeros = probs.new_zeros
        grad_gate = grad_gate if grad_gate is not None else zeros(n)
        grad_probs_mean = grad_probs_mean if grad_probs_mean is not None else zeros(e)
        grad_lse = grad_lse if grad_lse is not None else zeros(n)
        dlogits = kernel.route_bwd(probs, expert, grad_gate, grad_probs_mean, grad_lse)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (dlogits @ gate_weight.float()).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = (dlogits.t() @ x.float()).to(gate_weight.dtype)
        return dx, dw, None, None


def top1_route(x: torch.Tensor, gate_weight: torch.Tensor, capacity: int, drop_tokens: bool = True) -> Route:
    """Triton top-1 routing. x: (N, D), gate_weight: (E, D) -> Route (see reference.py)."""
    gate, probs_mean, lse, expert, position, kept, counts = RouteFunction.apply(
        x, gate_weight, int(capacity), bool(drop_tokens)
    )
    n = x.shape[0]
    aux, z = route_losses(counts, probs_mean, lse, n)
    dropped = int(n - kept.sum()) if drop_tokens else 0
    return Route(expert, position, kept, gate, counts, aux, z, dropped)


def _slots(expert, position, kept, num_experts: int, capacity: int):
    """slot (N,) of each token (-1 if dropped) and token (E*capacity,) of each slot (-1 if empty)."""
    n = expert.shape[0]
    slot = torch.where(kept, expert * capacity + position, torch.full_like(expert, -1))
    # Dropped tokens scatter into one sink entry past the end, then cut off: no boolean indexing, no host sync.
    sink = torch.where(kept, slot, torch.full_like(slot, num_experts * capacity))
    token = torch.full((num_experts * capacity + 1,), -1, dtype=torch.int64, device=expert.device)
    token.scatter_(0, sink, torch.arange(n, device=expert.device))
    return slot, token[:-1]


class DispatchFunction(torch.autograd.Function):
    """buf[slot] = x[token of slot], zeros in empty slots; backward: dx[n] = dbuf[slot[n]] (0 if dropped)."""

    @staticmethod
    def forward(ctx, x, slot, token, num_experts: int, capacity: int):
        ctx.save_for_backward(slot)
        buf = kernel.gather_rows(x, token, num_experts * capacity)
        return buf.view(num_experts, capacity, x.shape[1])

    @staticmethod
    def backward(ctx, grad_buf):
        (slot,) = ctx.saved_tensors
        d = grad_buf.shape[-1]
        return kernel.gather_rows(grad_buf.reshape(-1, d), slot, slot.shape[0]), None, None, None, None


class CombineFunction(torch.autograd.Function):
    """out[n] = gate[n] * y[slot[n]] (0 if dropped); backward: dy[s] = gate * dout of the slot's token, dgate."""

    @staticmethod
    def forward(ctx, y, slot, token, gate):
        e, c, d = y.shape
        ctx.save_for_backward(y, slot, token, gate)
        return kernel.gather_rows(y.reshape(e * c, d), slot, slot.shape[0], scale=gate)

    @staticmethod
    def backward(ctx, grad_out):
        y, slot, token, gate = ctx.saved_tensors
        e, c, d = y.shape
        grad_y = grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_y = kernel.gather_rows(grad_out, token, e * c, scale=gate, scale_by_src=True, out_dtype=y.dtype)
            grad_y = grad_y.view(e, c, d)
        if ctx.needs_input_grad[3]:
            grad_gate = kernel.rowdot(grad_out, y.reshape(e * c, d), slot).to(gate.dtype)
        return grad_y, None, None, grad_gate


def moe_dispatch(
    x: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Triton dispatch. x: (N, D) -> (E, capacity, D), zeros in unused slots."""
    slot, token = _slots(expert, position, kept, int(num_experts), int(capacity))
    return DispatchFunction.apply(x, slot, token, int(num_experts), int(capacity))


def moe_combine(
    y: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """Triton combine. y: (E, capacity, D) -> (N, D) = gate * y[expert, position], 0 for dropped tokens."""
    e, c, _ = y.shape
    slot, token = _slots(expert, position, kept, e, c)
    return CombineFunction.apply(y, slot, token, gate)
