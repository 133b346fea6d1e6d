"""Pure-PyTorch top-1 routing, dispatch and combine: the reference of the Triton kernels (same signatures)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Route(NamedTuple):
    """Top-1 routing decision for N tokens over E experts (see `top1_route`)."""

    expert: torch.Tensor  # (N,) int64
    position: torch.Tensor  # (N,) int64: number of earlier tokens routed to the same expert
    kept: torch.Tensor  # (N,) bool: position < capacity (all True without dropping)
    gate: torch.Tensor  # (N,) fp32, differentiable: probs[n, expert[n]]
    counts: torch.Tensor  # (E,) int64, tokens per expert before dropping
    aux_loss: torch.Tensor  # scalar fp32: E * sum_e counts_e / N * mean_n probs[n, e]
    z_loss: torch.Tensor  # scalar fp32: mean_n logsumexp(logits[n]) ** 2
    dropped: int


def route_losses(counts: torch.Tensor, probs_mean: torch.Tensor, lse: torch.Tensor, n: int) -> tuple:
    """(aux_loss, z_loss) from counts (E,), mean gate probabilities (E,) and per-token logsumexp (N,)."""
    e = counts.shape[0]
    aux = e * torch.sum(counts.to(torch.float32) / max(n, 1) * probs_mean)
    return aux, lse.square().mean()


def top1_route(x: torch.Tensor, gate_weight: torch.Tensor, capacity: int, drop_tokens: bool = True) -> Route:
    """x: (N, D) tokens, gate_weight: (E, D) -> Route. Gate logits and softmax in fp32, argmax lowest index on ties."""
    n, e = x.shape[0], gate_weight.shape[0]
    logits = x.float() @ gate_weight.float().t()  # (N, E)
    probs = torch.softmax(logits, dim=-1)
    expert = torch.argmax(probs, dim=-1)
    gate = probs.gather(1, expert[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(expert, e)  # (N, E)
    position = ((torch.cumsum(onehot, dim=0) - onehot) * onehot).sum(1)
    counts = onehot.sum(0)
    kept = position < capacity if drop_tokens else torch.ones(n, dtype=torch.bool, device=x.device)
    aux, z = route_losses(counts, probs.mean(0), torch.logsumexp(logits, dim=-1), n)
    dropped = 0 if x.is_meta or not drop_tokens else int(n - kept.sum())  # the int() is a host sync: skip if 0
    return Route(expert, position, kept, gate, counts, aux, z, dropped)


def moe_dispatch(
    x: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """x: (N, D) -> buf (E, capacity, D): buf[expert[n], position[n]] = x[n] for kept tokens, zeros elsewhere."""
    slot = torch.where(kept, expert * capacity + position, torch.full_like(expert, num_experts * capacity))
    buf = x.new_zeros(num_experts * capacity + 1, x.shape[1])  # last row: sink for dropped tokens
    buf = buf.index_put((slot,), x)  # slots of kept tokens are distinct: no accumulation needed
    return buf[:-1].view(num_experts, capacity, x.shape[1])


def moe_combine(
    y: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """y: (E, capacity, D) -> out (N, D) = gate[n] * y[expert[n], position[n]] for kept tokens, 0 for dropped ones."""
    e, c, d = y.shape
    slot = torch.where(kept, expert * c + position, torch.full_like(expert, e * c))
    routed = torch.cat([y.reshape(e * c, d), y.new_zeros(1, d)]).index_select(0, slot)  # last row: dropped tokens
    weight = torch.where(kept, gate.float(), torch.zeros_like(gate, dtype=torch.float32))
    return (routed.float() * weight[:, None]).to(y.dtype)
