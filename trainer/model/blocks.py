"""Backbone blocks: SwinV2 windowed block (stages 1-2) and global-attention transformer block (stages 3-4).

Both take their FFN from `make_ffn` (dense `Mlp` or `SkyMoE`) and return (x, aux_loss) so the MoE loss flows
out of activation-checkpointed blocks as a regular output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from trainer.model import ops
from trainer.model.moe import Mlp, SkyMoE


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample. x: (B, ...)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def ffn_forward(ffn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a dense or MoE FFN. x: (..., D) -> ((..., D), weighted aux loss scalar)."""
    if isinstance(ffn, SkyMoE):
        return ffn.forward_with_loss(x)
    return ffn(x), x.new_zeros((), dtype=torch.float32)


def cpb_coords(window: int, ref_window: int, device: torch.device | None = None) -> torch.Tensor:
    """((2w-1)**2, 2) SwinV2 log-spaced relative coordinates, normalised by the configured window size.

    Normalising by `ref_window` (not the clamped one) keeps a given offset at the same input of the CPB MLP when a
    small grid clamps the window, as SwinV2 does when changing window size.
    """
    r = torch.arange(-(window - 1), window, dtype=torch.float32, device=device)
    table = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)
    table = table / max(ref_window - 1, 1) * 8.0
    return torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8.0)


class WindowAttention(nn.Module):
    """SwinV2 scaled cosine attention with log-CPB in (shifted) windows. x: (B, H, W, C) -> (B, H, W, C)."""

    def __init__(self, dim: int, num_heads: int, window: int, cpb_hidden: int = 512) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.logit_scale = nn.Parameter(torch.full((num_heads,), math.log(10.0)))
        self.cpb_mlp = nn.Sequential(
            nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True), nn.Linear(cpb_hidden, num_heads, bias=False)
        )
        self.proj = nn.Linear(dim, dim)

    def bias_table(self, window: int, device: torch.device) -> torch.Tensor:
        """(nh, (2*window-1)**2): 16 * sigmoid(cpb_mlp(coords))."""
        coords = cpb_coords(window, self.window, device).to(self.cpb_mlp[0].weight.dtype)
        return 16.0 * torch.sigmoid(self.cpb_mlp(coords).t().float())

    def forward(self, x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).view(b, h, w, 3, self.num_heads, c // self.num_heads).unbind(3)
        out = ops.window_attention(q, k, v, self.logit_scale, self.bias_table(window, x.device), window, shift)
        return self.proj(out.reshape(b, h, w, c))


class SwinV2Block(nn.Module):
    """Res-post-norm SwinV2 block: x + DP(LN(attn(x))), then x + DP(LN(ffn(x))). x: (B, H, W, C).

    The window is clamped to the grid (min(H, W, window)); odd blocks shift by window // 2 only when the grid is
    larger than the window (a shift on a one-window grid would only split it into regions).
    """

    def __init__(self, dim: int, num_heads: int, window: int, shifted: bool, ffn: nn.Module, drop_path: float) -> None:
        super().__init__()
        self.window = window
        self.shifted = shifted
        self.attn = WindowAttention(dim, num_heads, window)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.norm2 = nn.LayerNorm(dim)
        self.drop_path = drop_path

    def window_shift(self, h: int, w: int) -> tuple[int, int]:
        window = min(h, w, self.window)
        shift = window // 2 if self.shifted and min(h, w) > window else 0
        return window, shift

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        window, shift = self.window_shift(x.shape[1], x.shape[2])
        x = x + drop_path(self.norm1(self.attn(x, window, shift)), self.drop_path, self.training)
        y, aux = ffn_forward(self.ffn, x)
        x = x + drop_path(self.norm2(y), self.drop_path, self.training)
        return x, aux


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens with SDPA. x: (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attn_mask: optional bool, broadcastable to (B, heads, L, L), True = may attend."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + DP(attn(LN(x))), then x + DP(ffn(LN(x))). x: (B, L, C)."""

    def __init__(self, dim: int, num_heads: int, ffn: nn.Module, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GlobalAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = ffn
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        y, aux = ffn_forward(self.ffn, self.norm2(x))
        x = x + drop_path(y, self.drop_path, self.training)
        return x, aux


def make_ffn(dim: int, mlp_ratio: float, moe_cfg=None) -> nn.Module:
    """Dense `Mlp`, or a `SkyMoE` built from a `MoEConfig` when given one."""
    hidden = int(dim * mlp_ratio)
    if moe_cfg is None:
        return Mlp(dim, hidden)
    return SkyMoE(
        dim,
        hidden,
        num_experts=moe_cfg.num_experts,
        ep_size=moe_cfg.ep_size,
        capacity_factor=moe_cfg.capacity_factor,
        eval_capacity_factor=moe_cfg.eval_capacity_factor,
        min_capacity=moe_cfg.min_capacity,
        drop_tokens=moe_cfg.drop_tokens,
        aux_loss_weight=moe_cfg.aux_loss_weight,
        z_loss_weight=moe_cfg.z_loss_weight,
        reroute=moe_cfg.reroute,
    )
