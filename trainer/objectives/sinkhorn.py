"""Entropic optimal transport with uniform marginals (Sinkhorn-Knopp in the log domain), fp32, local to a rank.

Used to assign points to clusters (object level) and features to prototypes (GCPL). The teacher-target variant
with all-reduced marginals is `centering.sinkhorn_knopp`.
"""

from __future__ import annotations

import math

import torch

from trainer.objectives.centering import fp32


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float, n_iters: int) -> torch.Tensor:
    """scores (..., N, K) -> transport plan (..., N, K) of exp(scores / eps) with rows summing to 1/N, columns to 1/K.

    Each iteration normalises columns then rows, so row sums are exact and column sums converge; N * plan is a soft
    assignment of each of the N items (rows sum to 1). Batched over leading dimensions; at least fp32.
    """
    n, k = scores.shape[-2:]
    log_p = fp32(scores) / eps
    log_p = log_p - torch.logsumexp(log_p.flatten(-2), dim=-1)[..., None, None]
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True) - math.log(k)
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True) - math.log(n)
    return log_p.exp()
