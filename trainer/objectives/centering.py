"""Teacher targets for DINO-style terms: the EMA centre (DINO) or Sinkhorn-Knopp (DINOv2), in fp32.

The centre moves once per optimizer step: `accumulate` adds each teacher forward's weighted sums to a pending buffer
(no communication), `step` all-reduces the pending (sum, count) once and applies the EMA. So the centre's dynamics do
not depend on the number of ranks or micro-batches. `step` and `sinkhorn_knopp` are collectives: every rank calls them
the same number of times.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

MODES = ("center", "sinkhorn")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def fp32(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 -> fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _weights(logits: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return logits.new_ones(logits.shape[0])
    return weight.to(device=logits.device, dtype=logits.dtype)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iters: int = 3,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """DINOv2's teacher Sinkhorn-Knopp. logits (N, K), weight (N,) or None -> (N, K) fp32 assignments.

    Each prototype gets 1/K of the mass of all ranks' samples, each sample a share proportional to its weight; sums
    over samples are all-reduced so every rank computes the same marginals. Rows sum to 1; weight-0 rows are 0.
    """
    x = fp32(logits)
    n, k = x.shape
    w = _weights(x, weight)
    keep = (w > 0)[:, None]
    # One global shift cancels in the first normalisation and keeps exp in range for sharp temperatures.
    shift = torch.cat([x.masked_fill(~keep, float("-inf")).flatten(), x.new_full((1,), float("-inf"))]).amax()
    if _dist():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    q = torch.where(keep, torch.exp((x - shift) / temp), torch.zeros_like(x))
    totals = torch.stack([q.sum(), w.sum()])
    if _dist():
        dist.all_reduce(totals)
    tiny = torch.finfo(x.dtype).tiny
    q = q / totals[0].clamp_min(tiny)
    share = (w / totals[1].clamp_min(tiny))[:, None]  # (N, 1) sample marginals, summing to 1 over all ranks
    for _ in range(n_iters):
        cols = q.sum(dim=0, keepdim=True)
        if _dist():
            dist.all_reduce(cols)
        q = q / cols.clamp_min(tiny) / k
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny) * share
    return q / q.sum(dim=1, keepdim=True).clamp_min(tiny)


class Centering(nn.Module):
    """The DINO centre (1, K) with per-step all-reduced updates, and the teacher-target mode switch.

    mode "center": softmax((logits - center) / temp); mode "sinkhorn": `sinkhorn_knopp` (the centre is still
    tracked, so switching modes or logging it costs nothing). All buffers are persistent (checkpointed).
    """

    def __init__(self, out_dim: int, momentum: float, mode: str = "center", sinkhorn_iters: int = 3, *, device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.momentum, self.mode, self.sinkhorn_iters = momentum, mode, sinkhorn_iters
        self.register_buffer("center", torch.zeros(1, out_dim, device=device))
        self.register_buffer("pending_sum", torch.zeros(out_dim, device=device))
        self.register_buffer("pending_count", torch.zeros((), device=device))

    @torch.no_grad()
    def probs(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        """logits (N, K) -> (N, K) softmax((logits - center) / temp), at least fp32."""
        return F.softmax((fp32(logits) - self.center) / temp, dim=-1)

    @torch.no_grad()
    def teacher_probs(self, logits: torch.Tensor, temp: float, weight: torch.Tensor | None = None) -> torch.Tensor:
        """logits (N, K), weight (N,) or None -> (N, K) teacher targets in the chosen mode."""
        if self.mode == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.sinkhorn_iters, weight)
        return self.probs(logits, temp)

    @torch.no_grad()
    def accumulate(self, logits: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add sum_n weight_n * logits_n (K,) and sum_n weight_n to the pending statistics. logits (N, K)."""
        x = fp32(logits)
        w = _weights(x, weight)
        self.pending_sum += (x * w[:, None]).sum(dim=0).to(self.pending_sum.dtype)
        self.pending_count += w.sum().to(self.pending_count.dtype)

    @torch.no_grad()
    def step(self) -> None:
        """center <- m * center + (1 - m) * mean of everything pending on all ranks (unchanged if nothing); clear."""
        stats = torch.cat([self.pending_sum, self.pending_count.reshape(1)])
        if _dist():
            dist.all_reduce(stats)
        count = stats[-1]
        mean = stats[:-1] / count.clamp_min(torch.finfo(stats.dtype).tiny)
        moved = self.center * self.momentum + mean[None] * (1 - self.momentum)
        self.center.copy_(torch.where(count > 0, moved, self.center))  # no host sync
        self.pending_sum.zero_()
        self.pending_count.zero_()
