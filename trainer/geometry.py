"""Where a view's pixels lie on the ground: the one convention shared by view cutting and the pixel-level terms.

Ground coordinates are normalised to the image set's extent: (y, x) in [0, 1]^2, y down, x right; every modality
of a set covers the same ground, so a ground point is one place in every modality. A view is

    pixels = rot90(flip(resize(crop(box))), k)

- `box` (y0, x0, y1, x1) in ground coordinates;
- flip: `flip_y` reverses rows, then `flip_x` reverses columns;
- `rot` = k quarter turns counterclockwise, as `np.rot90(a, k, axes=(-2, -1))` / `torch.rot90(a, k, (-2, -1))`.

View coordinates (u, v) are normalised to the view, [0, 1]^2 with pixel i covering [i/n, (i+1)/n]: the convention
of `grid_sample(align_corners=False)` after `grid = 2 * uv - 1`. Both functions broadcast: points (..., 2) and view
parameters of shape (...,) (or scalars), e.g. points (B, P, 2) with box (B, 1, 4).
"""

from __future__ import annotations

import torch


def _as(t, like: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.as_tensor(t, device=like.device, dtype=dtype or like.dtype)


def ground_to_view(points: torch.Tensor, box, flip_y, flip_x, rot) -> torch.Tensor:
    """points (..., 2) ground (y, x) -> (..., 2) view (u, v); outside [0, 1] means the point is not in the view."""
    box = _as(box, points)
    a = (points[..., 0] - box[..., 0]) / (box[..., 2] - box[..., 0])
    b = (points[..., 1] - box[..., 1]) / (box[..., 3] - box[..., 1])
    a = torch.where(_as(flip_y, points, torch.bool), 1 - a, a)
    b = torch.where(_as(flip_x, points, torch.bool), 1 - b, b)
    k = _as(rot, points, torch.long) % 4
    for turn in range(1, 4):  # one quarter turn counterclockwise maps (a, b) -> (1 - b, a)
        a, b = torch.where(k >= turn, 1 - b, a), torch.where(k >= turn, a, b)
    return torch.stack([a, b], dim=-1)


def view_to_ground(uv: torch.Tensor, box, flip_y, flip_x, rot) -> torch.Tensor:
    """The inverse of `ground_to_view`: uv (..., 2) view coordinates -> (..., 2) ground (y, x)."""
    a, b = uv[..., 0], uv[..., 1]
    k = _as(rot, uv, torch.long) % 4
    for turn in range(1, 4):  # undo a quarter turn: (a', b') = (1 - b, a)  =>  (a, b) = (b', 1 - a')
        a, b = torch.where(k >= turn, b, a), torch.where(k >= turn, 1 - a, b)
    a = torch.where(_as(flip_y, uv, torch.bool), 1 - a, a)
    b = torch.where(_as(flip_x, uv, torch.bool), 1 - b, b)
    box = _as(box, uv)
    y = box[..., 0] + a * (box[..., 2] - box[..., 0])
    x = box[..., 1] + b * (box[..., 3] - box[..., 1])
    return torch.stack([y, x], dim=-1)


def overlap(box_a: torch.Tensor, box_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 4) boxes -> their intersection (..., 4) and whether it is non-empty (...,) bool."""
    lo = torch.maximum(box_a[..., :2], box_b[..., :2])
    hi = torch.minimum(box_a[..., 2:], box_b[..., 2:])
    return torch.cat([lo, hi], dim=-1), (hi > lo).all(dim=-1)


def grid_in_box(box: torch.Tensor, n: int) -> torch.Tensor:
    """(..., 4) boxes -> (..., n*n, 2) ground points at the centres of an n x n grid over each box."""
    t = (torch.arange(n, device=box.device, dtype=box.dtype) + 0.5) / n
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    unit = torch.stack([gy.reshape(-1), gx.reshape(-1)], dim=-1)  # (n*n, 2)
    lo, size = box[..., None, :2], (box[..., 2:] - box[..., :2])[..., None, :]
    return lo + unit * size
