"""Temporal multi-modal fusion (SkySense V1, reused by V2): one transformer per output location.

Per location the sequence is [cls, HR, S2 x T2, S1 x T1]; every token is projected from the backbone width to
the fusion width, gets a modality embedding, and dated tokens (S2, S1) a day-of-year embedding. The cls output
is F_fus.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.model.blocks import GlobalAttention
from trainer.model.moe import Mlp

NUM_DOY = 366


class FusionLayer(nn.Module):
    """Pre-norm transformer layer. x: (S, L, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GlobalAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling of a feature grid, antialiased when shrinking. x: (N, h, w, D) -> (N, H, W, D)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    shrink = size[0] < x.shape[1] or size[1] < x.shape[2]
    # fp32: the antialiased CPU kernel has no bf16 version, and the result is cast back anyway.
    y = F.interpolate(x.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return y.permute(0, 2, 3, 1).to(x.dtype)


def _valid(mask: torch.Tensor | None, shape: tuple[int, int], device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return mask.reshape(shape).to(device=device, dtype=torch.bool)


class TemporalFusion(nn.Module):
    """F_fus from last-stage features. Inputs as `SkySenseV2.fuse`; output (B, h, w, dim).

    Optional validity masks (hr_valid (B,), s2_valid (B, T2), s1_valid (B, T1), True = present) exclude absent
    images / padded dates as attention keys at every location; the cls token is always a valid key.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.modality_embed = nn.Parameter(torch.zeros(3, dim))  # hr, s2, s1
        self.date_embed = nn.Embedding(NUM_DOY, dim)
        self.layers = nn.ModuleList([FusionLayer(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.activation_checkpointing = False

    def forward(
        self,
        hr: torch.Tensor | None,
        s2: torch.Tensor | None,
        s2_doy: torch.Tensor | None,
        s1: torch.Tensor | None,
        s1_doy: torch.Tensor | None,
        *,
        hr_valid: torch.Tensor | None = None,
        s2_valid: torch.Tensor | None = None,
        s1_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        present = [t for t in (hr, s2, s1) if t is not None]
        if not present:
            raise ValueError("fuse() needs at least one modality")
        if hr is not None:
            b, h, w = hr.shape[:3]
        else:  # the largest grid present
            grids = [t.shape[-3:-1] for t in present]
            h, w = max(grids, key=lambda g: g[0] * g[1])
            b = present[0].shape[0]
        parts, valid = [], [torch.ones(b, 1, dtype=torch.bool, device=present[0].device)]  # cls: always valid
        if hr is not None:
            parts.append(self.proj(hr).unsqueeze(3) + self.modality_embed[0])  # (B, h, w, 1, D)
            valid.append(_valid(hr_valid, (b, 1), hr.device))
        for idx, seq, doy, ok in ((1, s2, s2_doy, s2_valid), (2, s1, s1_doy, s1_valid)):
            if seq is None:
                continue
            t = seq.shape[1]
            valid.append(_valid(ok, (b, t), seq.device))
            if doy is None or doy.shape != (b, t):
                raise ValueError(f"day-of-year tensor of shape ({b}, {t}) required with a time series")
            grid = resample(seq.flatten(0, 1), (h, w)).view(b, t, h, w, -1)
            tok = self.proj(grid) + self.modality_embed[idx] + self.date_embed(doy)[:, :, None, None]
            parts.append(tok.permute(0, 2, 3, 1, 4))  # (B, h, w, T, D)
        x = torch.cat(parts, dim=3).flatten(0, 2)  # (B*h*w, L, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        key_mask = None  # without masks: plain attention, SDPA picks its fastest kernel
        if any(m is not None for m in (hr_valid, s2_valid, s1_valid)):
            key_mask = torch.cat(valid, dim=1)[:, None, :].expand(b, h * w, -1).reshape(b * h * w, 1, 1, -1)
        for layer in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x = layer(x, key_mask)
        return self.norm(x[:, 0]).view(b, h, w, self.dim)
