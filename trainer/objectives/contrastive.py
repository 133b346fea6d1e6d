"""A MoCo-v2-style InfoNCE fallback for the image level (`loss.contrast_weight`), behind a recipe switch.

Not the paper's objective (MGCL is DINO-style): published small runs learn fastest early with a momentum-contrast
queue (papers/small-scale-ssl-notes.md), so the learning benchmark can weigh it against DINO. For each term (hr, s2,
s1, fus) and each pair (teacher global view j, student view i), i != j: the student's projected, normalised pooled
feature q must pick its own sample's teacher key k_j among the batch's other keys and a queue of past keys,
CE(softmax([q . k_j ; q . queue] / tau)). The queue is filled once per optimizer step with every rank's keys
(all-gathered), so every rank holds the same queue and a resumed run the same state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """MLP projection for the contrastive term. x: (N, in_dim) -> (N, out_dim) (not normalised)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, device=None):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim, device=device), nn.GELU(),
                                 nn.Linear(hidden_dim, out_dim, device=device))
        if self.mlp[0].weight.device.type != "meta":
            for layer in (self.mlp[0], self.mlp[2]):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, weight: torch.Tensor, temp: float
             ) -> torch.Tensor:
    """q, k: (B, D) normalised (k the positives, row b for sample b); queue (Q, D); weight (B,) -> weighted mean CE.

    Candidates of sample b: every key of the batch (its own at index b) and the queue.
    """
    logits = torch.cat([q @ k.t(), q @ queue.t()], dim=1).float() / temp
    ce = F.cross_entropy(logits, torch.arange(len(q), device=q.device), reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


class ContrastiveObjective(nn.Module):
    """InfoNCE with a key queue per term. Heads "contrast_head" / "fusion_contrast_head" live in the student and
    teacher ModuleDicts (the teacher's are EMA copies, MoCo's momentum encoder)."""

    name = "contrast"

    def __init__(self, terms: tuple[str, ...], dim: int, queue: int, temp: float, *, device=None):
        super().__init__()
        self.terms, self.temp, self.size = terms, temp, queue
        for t in terms:
            # Random unit keys to start, as MoCo: an empty queue would make the first steps in-batch only.
            self.register_buffer(f"queue_{t}", F.normalize(torch.randn(queue, dim, device=device), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device))
        self._pending: dict[str, list[torch.Tensor]] = {t: [] for t in terms}

    def forward(self, student: list[dict], teacher: list[dict], s_nets: nn.ModuleDict, t_nets: nn.ModuleDict,
                weights: dict[str, torch.Tensor], teacher_temp: float) -> dict[str, torch.Tensor]:
        out = {}
        for term in self.terms:
            head = "fusion_contrast_head" if term == "fus" else "contrast_head"
            w = weights[term]
            qs = [F.normalize(s_nets[head](s["pooled"][term]).float(), dim=-1) for s in student]
            with torch.no_grad():
                ks = [F.normalize(t_nets[head](t["pooled"][term]).float(), dim=-1) for t in teacher]
                self._pending[term].extend(ks)
            queue = getattr(self, f"queue_{term}")
            total, pairs = 0.0, 0
            for i, q in enumerate(qs):
                for j, k in enumerate(ks):
                    if i != j:
                        total, pairs = total + info_nce(q, k, queue, w, self.temp), pairs + 1
            out[f"contrast/{term}"] = total / pairs
        return out

    @torch.no_grad()
    def step(self) -> None:
        """Once per optimizer step: enqueue every rank's keys of the step (the oldest leave first)."""
        if not self._pending[self.terms[0]]:
            return
        ptr = int(self.queue_ptr)
        n = 0
        for term in self.terms:
            keys = torch.cat(self._pending[term])
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
                dist.all_gather(gathered, keys)
                keys = torch.cat(gathered)
            keys = keys[-self.size:]
            n = len(keys)
            queue = getattr(self, f"queue_{term}")
            idx = (ptr + torch.arange(n, device=queue.device)) % self.size
            queue[idx] = keys.to(queue.dtype)
            self._pending[term] = []
        self.queue_ptr.fill_((ptr + n) % self.size)
