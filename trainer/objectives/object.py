"""MGCL object level: the teacher's point features grouped into N_C clusters by Sinkhorn-Knopp, centres contrasted.

SkySense says only "pixel features grouped into N_C clusters by Sinkhorn-Knopp, cluster centres contrasted"; the
rest is our own design, chosen to be simple and deterministic given the inputs:
- points: for each (teacher j, student i) pair, the grid x grid ground points of the two views' overlap
  (`pixel.aligned_pairs`), so point g of the teacher and point g of the student are the same ground;
- clusters, per sample and pair: spherical k-means on the teacher's L2-normalised point features whose assignment
  step is a Sinkhorn plan (uniform marginals: equal-mass clusters, none empty) on cosine similarity to N_C anchors.
  The anchors start at the points of evenly spaced grid indices (no randomness, spatially spread) and move to the
  normalised assignment-weighted mean for `kmeans_iters` steps; the last plan gives the assignments (no gradient);
- centres: assignment-weighted means of the teacher's point features and, with the SAME assignments, of the
  student's, so student cluster c covers the same ground as teacher cluster c;
- loss: the pixel level's DINO CE on the centres (heads, centring, masks as there), averaged over clusters.
On a 1 x 1 map every point holds the same feature: the plan is uniform and every centre is the overlap's mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.objectives.centering import Centering, fp32
from trainer.objectives.pixel import aligned_pairs, distill
from trainer.objectives.sinkhorn import sinkhorn


@torch.no_grad()
def cluster_assignments(feats: torch.Tensor, num_clusters: int, eps: float = 0.05, n_iters: int = 3,
                        kmeans_iters: int = 2) -> torch.Tensor:
    """feats (B, G, C) -> soft assignments (B, G, N_C), fp32, each point's row summing to 1."""
    f = F.normalize(fp32(feats), dim=-1)
    g = f.shape[1]
    idx = torch.linspace(0, g - 1, num_clusters, device=f.device).round().long()
    anchors = f[:, idx]  # (B, N_C, C)
    for it in range(kmeans_iters + 1):
        assign = sinkhorn(f @ anchors.transpose(1, 2), eps, n_iters) * g
        if it < kmeans_iters:
            anchors = F.normalize(assign.transpose(1, 2) @ f, dim=-1)
    return assign


def cluster_centres(feats: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
    """feats (B, G, C), assign (B, G, N_C) -> (B, N_C, C) assignment-weighted means (differentiable in feats)."""
    a = assign.to(feats.dtype)
    mass = a.sum(dim=1)[..., None].clamp_min(torch.finfo(a.dtype).tiny)  # (B, N_C, 1)
    return (a.transpose(1, 2) @ feats) / mass


class ObjectLoss(nn.Module):
    """MGCL object level with its own centring (mode "center" | "sinkhorn")."""

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float, num_clusters: int = 4,
                 grid: int = 4, mode: str = "center", sinkhorn_eps: float = 0.05, sinkhorn_iters: int = 3,
                 kmeans_iters: int = 2, *, device=None):
        super().__init__()
        self.student_temp, self.num_clusters, self.grid = student_temp, num_clusters, grid
        self.sinkhorn_eps, self.sinkhorn_iters, self.kmeans_iters = sinkhorn_eps, sinkhorn_iters, kmeans_iters
        self.centering = Centering(out_dim, center_momentum, mode, device=device)

    def assignments(self, t_feats: torch.Tensor) -> torch.Tensor:
        """t_feats (..., G, C) -> (..., G, N_C) with this loss's clustering settings."""
        lead, (g, c) = t_feats.shape[:-2], t_feats.shape[-2:]
        a = cluster_assignments(t_feats.reshape(-1, g, c), self.num_clusters, self.sinkhorn_eps,
                                self.sinkhorn_iters, self.kmeans_iters)
        return a.reshape(*lead, g, self.num_clusters)

    def forward(self, student_maps: list[torch.Tensor], student_geoms: list[dict], teacher_maps: list[torch.Tensor],
                teacher_geoms: list[dict], student_head: nn.Module, teacher_head: nn.Module, teacher_temp: float,
                weight: torch.Tensor) -> torch.Tensor:
        """student_maps: all student views (B, h, w, C); teacher_maps: the global views; weight (B,) -> scalar."""
        s, t, valid = aligned_pairs(student_maps, student_geoms, teacher_maps, teacher_geoms, self.grid)
        p, b, g, c = s.shape
        assign = self.assignments(t).reshape(p * b, g, self.num_clusters)
        s_cent = cluster_centres(s.reshape(p * b, g, c), assign).reshape(p, b, self.num_clusters, c)
        t_cent = cluster_centres(t.reshape(p * b, g, c), assign).reshape(p, b, self.num_clusters, c)
        mask = weight.to(device=valid.device, dtype=torch.float32)[None] * valid
        return distill(s_cent, t_cent, mask, student_head, teacher_head, self.centering, teacher_temp,
                       self.student_temp)
