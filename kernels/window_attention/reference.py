"""Pure-PyTorch SwinV2 window attention, the semantic reference for the Triton kernel (same signature).

The padded grid is rolled by (-shift, -shift) and cut into window x window windows; a query sees the keys of its
window that lie in its shift region and are not padding (Swin's construction, regions per axis in rolled
coordinates [0, P-window), [P-window, P-shift), [P-shift, P)). Everything after the projections runs in fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812

LOGIT_SCALE_MAX = math.log(100.0)


def relative_position_index(window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(window**2, window**2) int64: query (i1, j1), key (i2, j2) -> (i1-i2+w-1)*(2w-1) + (j1-j2+w-1)."""
    i, j = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    di = i[:, None] - i[None, :] + window - 1
    dj = j[:, None] - j[None, :] + window - 1
    return (di * (2 * window - 1) + dj).to(device)


def allowed_mask(h: int, w: int, window: int, shift: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(nW, N, N) bool, N = window**2, windows in row-major order of the rolled padded grid: may query attend key."""
    hp, wp = -(-h // window) * window, -(-w // window) * window

    def axis(p: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.arange(p)  # rolled coordinate
        region = (r >= p - window).long() + (r >= p - shift).long() if shift > 0 else torch.zeros(p, dtype=torch.long)
        valid = (r + shift) % p < n  # the original (unrolled) coordinate lies inside the grid
        return region, valid

    rh, vh = axis(hp, h)
    rw, vw = axis(wp, w)
    region = (rh[:, None] * 3 + rw[None, :]).view(hp // window, window, wp // window, window)
    valid = (vh[:, None] & vw[None, :]).view(hp // window, window, wp // window, window)
    region = region.permute(0, 2, 1, 3).reshape(-1, window * window)
    valid = valid.permute(0, 2, 1, 3).reshape(-1, window * window)
    mask = (region[:, :, None] == region[:, None, :]) & valid[:, None, :]
    mask |= torch.eye(window * window, dtype=torch.bool)  # a padded query sees itself: no empty softmax row
    return mask.to(device)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    bias_table: torch.Tensor,
    window: int,
    shift: int,
) -> torch.Tensor:
    """Scaled cosine attention in (shifted) windows. q, k, v: (B, H, W, nh, d) -> (B, H, W, nh, d) in q's dtype.

    logit_scale: (nh,), effective scale exp(min(logit_scale, log 100)); bias_table: (nh, (2*window-1)**2).
    """
    b, h, w, nh, d = q.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    n = window * window

    def partition(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t.float(), (0, 0, 0, 0, 0, wp - w, 0, hp - h))
        if shift > 0:
            t = torch.roll(t, shifts=(-shift, -shift), dims=(1, 2))
        t = t.view(b, hp // window, window, wp // window, window, nh, d).permute(0, 1, 3, 5, 2, 4, 6)
        return t.reshape(b, -1, nh, n, d)  # (B, nW, nh, N, d)

    qw = F.normalize(partition(q), dim=-1, eps=1e-12)
    kw = F.normalize(partition(k), dim=-1, eps=1e-12)
    vw = partition(v)
    scale = torch.exp(torch.clamp(logit_scale.float(), max=LOGIT_SCALE_MAX)).view(1, 1, nh, 1, 1)
    bias = bias_table.float()[:, relative_position_index(window, q.device).view(-1)].view(1, 1, nh, n, n)
    logits = scale * (qw @ kw.transpose(-1, -2)) + bias
    mask = allowed_mask(h, w, window, shift, q.device).view(1, -1, 1, n, n)
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ vw  # (B, nW, nh, N, d)
    out = out.view(b, hp // window, wp // window, nh, window, window, d).permute(0, 1, 4, 2, 5, 3, 6)
    out = out.reshape(b, hp, wp, nh, d)
    if shift > 0:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    return out[:, :h, :w].to(q.dtype).contiguous()
