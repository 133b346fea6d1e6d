"""MGCL image level: DINO cross-entropy between pooled teacher and student features, per modality and for F_fus."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.objectives.centering import Centering


def dino_cross_entropy(student: list[torch.Tensor], teacher_probs: list[torch.Tensor], weight: torch.Tensor,
                       student_temp: float) -> torch.Tensor:
    """Mean over pairs (teacher view j, student view i), i != j, of the weighted CE(teacher_j, student_i).

    student: list (all student views, globals first) of (N, K) logits; teacher_probs: list (global views) of (N, K)
    probabilities; weight (N,) 0/1. Student view i and teacher view j are the same view when i == j.
    """
    total, pairs = 0.0, 0
    denom = weight.sum().clamp_min(1.0)
    for i, s in enumerate(student):
        logp = F.log_softmax(s.float() / student_temp, dim=-1)
        for j, t in enumerate(teacher_probs):
            if i != j:
                total = total + ((-(t * logp).sum(-1)) * weight).sum() / denom
                pairs += 1
    return total / pairs


class ImageObjective(nn.Module):
    """Pooled features -> DINO head -> CE against the teacher's centred (or Sinkhorn) probabilities.

    One centre per term (hr, s2, s1, fus), updated once per optimizer step (`SSLMetaArch.step_objectives`). The
    heads ("head", "fusion_head") live in the student/teacher ModuleDicts, so the EMA teacher holds their copies.
    """

    name = "image"

    def __init__(self, terms: tuple[str, ...], out_dim: int, student_temp: float, center_momentum: float,
                 centering: str = "center", *, device=None):
        super().__init__()
        self.terms, self.student_temp = terms, student_temp
        self.centers = nn.ModuleDict({t: Centering(out_dim, center_momentum, mode=centering, device=device)
                                      for t in terms})
        self.last_probs: torch.Tensor | None = None  # (V * B, K) teacher targets of the first term, last forward

    def forward(self, student: list[dict], teacher: list[dict], s_heads: nn.ModuleDict, t_heads: nn.ModuleDict,
                weights: dict[str, torch.Tensor], teacher_temp: float) -> dict[str, torch.Tensor]:
        """student/teacher: per view {"pooled": {term: (B, D)}}; weights: term -> (B,) 0/1. -> {"image/<term>"}."""
        out = {}
        for term in self.terms:
            head = "fusion_head" if term == "fus" else "head"
            w = weights[term]
            s_logits = [s_heads[head](s["pooled"][term]) for s in student]
            with torch.no_grad():
                t_logits = [t_heads[head](t["pooled"][term]).float() for t in teacher]
                t_probs = [self.centers[term].teacher_probs(x, teacher_temp, w) for x in t_logits]
                for x in t_logits:
                    self.centers[term].accumulate(x, w)
                if term == self.terms[0]:  # kept for the learning-health gauges, read once per step
                    self.last_probs = torch.cat(t_probs)
            out[f"image/{term}"] = dino_cross_entropy(s_logits, t_probs, w, self.student_temp)
        return out
