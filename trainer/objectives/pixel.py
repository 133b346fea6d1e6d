"""MGCL pixel level: DINO cross-entropy between teacher and student features at the same ground points.

For a (teacher view j, student view i) pair, the ground overlap of the two views' boxes gets a grid x grid set of
points (cell centres, `geometry.grid_in_box`); each view's last-stage map is sampled there bilinearly (RoIAlign-style:
`grid_sample`, align_corners=False, border padding) after `geometry.ground_to_view`, so whatever the crop, flip and
rotation of each view, point g of both views is the same ground. Works down to 1 x 1 maps (every point reads the cell).

Pairs run over teacher (global) views j and student views i != j (indices < 2 name the same global view). The loss
is a weighted mean over (pair, sample) with mask weight * valid, each term the mean over points of the CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.geometry import grid_in_box, ground_to_view, overlap
from trainer.objectives.centering import Centering, fp32


def _sample(fmap: torch.Tensor, points: torch.Tensor, geom: dict) -> torch.Tensor:
    """fmap (B, h, w, C), points (B, G, 2) ground (y, x) -> (B, G, C) bilinear samples."""
    col = {k: torch.as_tensor(geom[k], device=points.device)[:, None] for k in ("box", "flip_y", "flip_x", "rot")}
    uv = ground_to_view(points, col["box"], col["flip_y"], col["flip_x"], col["rot"])  # (B, G, 2) as (row, column)
    grid = (2 * uv.flip(-1) - 1).to(fmap.dtype)[:, None]  # (B, 1, G, 2) as grid_sample's (x, y)
    out = F.grid_sample(fmap.permute(0, 3, 1, 2), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, :, 0].transpose(1, 2)


def pixel_targets(student_map: torch.Tensor, s_geom: dict, teacher_map: torch.Tensor, t_geom: dict,
                  grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features of both views at grid x grid ground points of their overlap.

    student_map (B, h, w, C), teacher_map (B, h', w', C), geoms {box (B, 4), flip_y, flip_x (B,) bool, rot (B,)}
    -> s_feats (B, G, C), t_feats (B, G, C) (detached), valid (B,) bool (False: the boxes do not overlap, and the
    features there are meaningless), G = grid * grid.
    """
    dev = student_map.device
    box, valid = overlap(torch.as_tensor(s_geom["box"], device=dev), torch.as_tensor(t_geom["box"], device=dev))
    points = grid_in_box(box, grid)  # (B, G, 2)
    return _sample(student_map, points, s_geom), _sample(teacher_map.detach(), points, t_geom), valid


def aligned_pairs(student_maps: list[torch.Tensor], student_geoms: list[dict], teacher_maps: list[torch.Tensor],
                  teacher_geoms: list[dict], grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pixel_targets` of every pair (teacher j outer, student i != j inner) -> s (P, B, G, C), t (P, B, G, C),
    valid (P, B)."""
    pairs = [pixel_targets(student_maps[i], student_geoms[i], teacher_maps[j], teacher_geoms[j], grid)
             for j in range(len(teacher_maps)) for i in range(len(student_maps)) if i != j]
    s, t, valid = (torch.stack(x) for x in zip(*pairs))
    return s, t, valid


def distill(s_feats: torch.Tensor, t_feats: torch.Tensor, mask: torch.Tensor, student_head: nn.Module,
            teacher_head: nn.Module, centering: Centering, teacher_temp: float, student_temp: float) -> torch.Tensor:
    """s_feats, t_feats (P, B, X, C), mask (P, B) -> scalar weighted mean over (P, B) of the CE averaged over X.

    The teacher head runs under no_grad and its logits are accumulated into `centering` (weight mask per item). Every
    item goes through both heads whatever the mask, so all ranks run the same ops and a fully masked batch returns a
    graph-connected 0 that gives every student head parameter a (zero) gradient.
    """
    p, b, x, c = s_feats.shape
    s_logits = student_head(s_feats.reshape(-1, c))
    with torch.no_grad():
        t_logits = teacher_head(t_feats.reshape(-1, c))
        w = mask[..., None].expand(p, b, x).reshape(-1)
        centering.accumulate(t_logits, w)
        t_probs = centering.teacher_probs(t_logits, teacher_temp, w)
    log_p = F.log_softmax(fp32(s_logits) / student_temp, dim=-1)
    ce = -(t_probs * log_p).sum(dim=-1).reshape(p, b, x).mean(dim=-1)  # (P, B)
    return (ce * mask).sum() / mask.sum().clamp_min(torch.finfo(mask.dtype).tiny)


class PixelLoss(nn.Module):
    """MGCL pixel level with its own centring (mode "center" | "sinkhorn")."""

    def __init__(self, out_dim: int, student_temp: float, center_momentum: float, grid: int = 2,
                 mode: str = "center", *, device=None):
        super().__init__()
        self.student_temp, self.grid = student_temp, grid
        self.centering = Centering(out_dim, center_momentum, mode, device=device)

    def forward(self, student_maps: list[torch.Tensor], student_geoms: list[dict], teacher_maps: list[torch.Tensor],
                teacher_geoms: list[dict], student_head: nn.Module, teacher_head: nn.Module, teacher_temp: float,
                weight: torch.Tensor) -> torch.Tensor:
        """student_maps: all student views (B, h, w, C); teacher_maps: the global views; weight (B,) -> scalar."""
        s, t, valid = aligned_pairs(student_maps, student_geoms, teacher_maps, teacher_geoms, self.grid)
        mask = weight.to(device=valid.device, dtype=torch.float32)[None] * valid
        return distill(s, t, mask, student_head, teacher_head, self.centering, teacher_temp, self.student_temp)
