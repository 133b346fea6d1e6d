"""DINO-style self-distillation: projection head and the teacher-centred cross-entropy (MGCL image level)."""

from __future__ import annotations

import torch
import torch.distributed as dist
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


class DINOLoss(nn.Module):
    """Cross-entropy between centred, sharpened teacher and student distributions, with masked samples.

    The centre is an EMA of the teacher's batch mean, averaged over all ranks, so every rank holds the same one.
    """

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float, *, device=None):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim, device=device))

    @torch.no_grad()
    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(N, K) logits -> (N, K) fp32 probabilities, centred and sharpened."""
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    def forward(self, student: list[torch.Tensor], teacher_probs: list[torch.Tensor],
                weight: torch.Tensor) -> torch.Tensor:
        """Mean over view pairs i != j of the weighted CE(teacher_j, student_i).

        student, teacher_probs: lists (views) of (N, K); weight: (N,) 0/1 (samples that have this modality).
        Returns a scalar that is 0 (with a graph) when no sample has weight.
        """
        total, pairs = 0.0, 0
        denom = weight.sum().clamp_min(1.0)
        for i, s in enumerate(student):
            logp = F.log_softmax(s.float() / self.student_temp, dim=-1)
            for j, t in enumerate(teacher_probs):
                if i != j:
                    total = total + ((-(t * logp).sum(-1)) * weight).sum() / denom
                    pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_logits: list[torch.Tensor], weight: torch.Tensor) -> None:
        """EMA of the weighted teacher mean over views, samples and ranks."""
        stacked = torch.stack([t.float() for t in teacher_logits])  # (V, N, K)
        w = weight.float()[None, :, None]
        stats = torch.cat([(stacked * w).sum(dim=(0, 1)), (w.sum() * stacked.shape[0]).reshape(1)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        if stats[-1] > 0:
            mean = stats[:-1] / stats[-1]
            self.center.mul_(self.center_momentum).add_(mean[None], alpha=1 - self.center_momentum)
