"""The pretraining objectives, one per file (paper section 3.2), and the registry the meta-architecture iterates.

An objective is an `nn.Module` called as `objective(student, teacher, student_nets, teacher_nets, weights,
teacher_temp) -> {"<level>/<term>": scalar}`: `student` / `teacher` are per-view encodings from
`SSLMetaArch.encode` (globals first; the teacher has the globals only), the nets are the student / teacher
ModuleDicts holding the heads, `weights` maps a term (hr, s2, s1, fus) to (B,) 0/1. Its state (centres, queues) is
its own and is stepped once per optimizer step. To add one (GCPL, ITA, QSACL): write its file, add a builder below
and a `<name>_weight` field to `LossConfig`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from trainer.objectives.contrastive import ContrastiveObjective
from trainer.objectives.image import ImageObjective
from trainer.objectives.object import ObjectLoss
from trainer.objectives.pixel import PixelLoss


class DenseObjective(nn.Module):
    """A pixel-level or object-level MGCL term per modality and for F_fus, on the views' last-stage maps."""

    def __init__(self, name: str, terms: tuple[str, ...], make: Callable[[], nn.Module]):
        super().__init__()
        self.name, self.terms = name, terms
        self.losses = nn.ModuleDict({t: make() for t in terms})

    def forward(self, student: list[dict], teacher: list[dict], s_nets: nn.ModuleDict, t_nets: nn.ModuleDict,
                weights: dict[str, torch.Tensor], teacher_temp: float) -> dict[str, torch.Tensor]:
        out = {}
        for term in self.terms:
            head = "fusion_pixel_head" if term == "fus" else "pixel_head"
            out[f"{self.name}/{term}"] = self.losses[term](
                [s["maps"][term] for s in student], [s["geom"] for s in student],
                [t["maps"][term] for t in teacher], [t["geom"] for t in teacher],
                s_nets[head], t_nets[head], teacher_temp, weights[term])
        return out


def _image(cfg, terms, device):
    lc = cfg.loss
    return ImageObjective(terms, lc.head_out_dim, lc.student_temp, lc.center_momentum, lc.centering, device=device)


def _pixel(cfg, terms, device):
    lc = cfg.loss
    return DenseObjective("pixel", terms, lambda: PixelLoss(lc.head_out_dim, lc.student_temp, lc.center_momentum,
                                                            lc.pixel_grid, lc.centering, device=device))


def _object(cfg, terms, device):
    lc = cfg.loss
    return DenseObjective("object", terms, lambda: ObjectLoss(lc.head_out_dim, lc.student_temp, lc.center_momentum,
                                                              lc.object_clusters, mode=lc.centering, device=device))


def _contrast(cfg, terms, device):
    lc = cfg.loss
    return ContrastiveObjective(terms, lc.contrast_dim, lc.contrast_queue, lc.contrast_temp, device=device)


OBJECTIVES: dict[str, Callable] = {"image": _image, "pixel": _pixel, "object": _object, "contrast": _contrast}


def build_objectives(cfg, terms: tuple[str, ...], *, device=None) -> dict[str, nn.Module]:
    """Every objective whose `loss.<name>_weight` is > 0, in registry order (the same on every rank)."""
    return {name: make(cfg, terms, device) for name, make in OBJECTIVES.items()
            if getattr(cfg.loss, f"{name}_weight") > 0}
