"""The DINO projection head shared by every MGCL level (the cross-entropy is in image.py, centring in centering.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> prototypes with unit-norm rows. x: (N, in_dim) -> (N, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, *, device=None, dtype=None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim, **kw), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim, **kw), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim, **kw))
        # Row-normalising in forward is weight_norm with g fixed to 1 (DINO), and survives deepcopy and meta builds.
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim, **kw))
        if self.prototypes.device.type != "meta":
            nn.init.trunc_normal_(self.prototypes, std=0.02)
            for layer in self.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.02)
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t()
