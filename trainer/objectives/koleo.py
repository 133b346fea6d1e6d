"""KoLeo regulariser (DINOv2; Sablayrolles et al. 2018): spread features by pushing each from its nearest neighbour."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.objectives.centering import fp32


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x (N, D) -> scalar -mean_i log(min_{j != i} ||z_i - z_j|| + eps), z = L2-normalised rows, at least fp32.

    Local to the rank (as DINOv2). With N < 2 there is no neighbour: returns a graph-connected 0.
    """
    n = x.shape[0]
    if n < 2:
        return x.sum() * 0
    z = F.normalize(fp32(x), dim=-1, eps=eps)
    with torch.no_grad():
        dots = (z @ z.t()).fill_diagonal_(float("-inf"))
        nearest = dots.argmax(dim=1)  # max inner product = min distance on the sphere
    # pairwise_distance adds eps to the difference, so duplicates give a finite gradient.
    d = F.pairwise_distance(z, z[nearest], eps=eps)
    return -torch.log(d + eps).mean()
