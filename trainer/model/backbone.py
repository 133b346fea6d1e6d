"""The SkySense V2 unified backbone (paper section 3.1, DESIGN.md section 4) and its builder.

tokenizer[m] -> stage 1 (SwinV2) -> APM -> stage 2 (SwinV2) -> APM -> stage 3 ([prompts] + global attention)
-> APM -> stage 4 ([prompts] + global attention); MoE replaces the FFN of the last `moe.num_layers` blocks.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.model import ops
from trainer.model.blocks import SwinV2Block, TransformerBlock, make_ffn
from trainer.model.config import IN_CHANS, MODALITIES, ModelConfig
from trainer.model.fusion import TemporalFusion
from trainer.model.moe import SkyMoE


class PatchEmbed(nn.Module):
    """4x4 patches -> linear -> LayerNorm. x: (B, C_m, H, W) -> (B, ceil(H/4), ceil(W/4), C); zero-pads edges."""

    def __init__(self, in_chans: int, dim: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        if x.shape[-1] % p or x.shape[-2] % p:
            x = F.pad(x, (0, -x.shape[-1] % p, 0, -x.shape[-2] % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class AdaptivePatchMerging(nn.Module):
    """APM: one LayerNorm(4C) + Linear(4C -> 2C) that halves the grid (reduce) or keeps it (keep).

    reduce: 2x2 neighbourhood concatenation, as Swin's patch merging. keep: each token fills all four slots and
    the projection is scaled by 1/4, i.e. the weight averaged over the four slots applied to the token
    ("a linear projection with averaging the weights across the input dimensions"). x: (B, H, W, C) ->
    (B, ceil(H/2), ceil(W/2), 2C) or (B, H, W, 2C).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, reduce: bool) -> torch.Tensor:
        z = ops.apm_merge(x, self.norm.weight, self.norm.bias, reduce, self.norm.eps)
        y = self.reduction(z)
        return y if reduce else 0.25 * y


class Stage(nn.Module):
    """A run of blocks at one width; global-attention stages may carry modality prompt tokens.

    x: (B, H, W, C) -> ((B, H, W, C), aux loss). Prompts (num_modalities, N, C) are prepended before the first
    block and dropped after the last.
    """

    def __init__(self, blocks: list[nn.Module], dim: int, windowed: bool, num_prompts: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.windowed = windowed
        self.prompts = nn.Parameter(torch.zeros(len(MODALITIES), num_prompts, dim)) if num_prompts else None
        self.activation_checkpointing = False

    def _run(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward(self, x: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        aux = x.new_zeros((), dtype=torch.float32)
        b, h, w, c = x.shape
        if not self.windowed:
            x = x.reshape(b, h * w, c)
            if self.prompts is not None:
                p = self.prompts[MODALITIES.index(modality)].to(x.dtype)
                x = torch.cat([p.expand(b, -1, -1), x], dim=1)
        for block in self.blocks:
            x, a = self._run(block, x)
            aux = aux + a
        if not self.windowed:
            x = x[:, x.shape[1] - h * w :].reshape(b, h, w, c)
        return x, aux


class SkySenseV2(nn.Module):
    """Unified backbone for HR / S2 / S1 plus temporal fusion. See `forward_features` and `fuse`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        c = cfg.embed_dim
        dims = [c * 2**i for i in range(len(cfg.depths))]
        self.dims = dims
        self.out_dim = dims[-1]
        self.fusion_dim = cfg.fusion.dim
        self.tokenizers = nn.ModuleDict({m: PatchEmbed(IN_CHANS[m], c, cfg.patch_size) for m in MODALITIES})
        total = sum(cfg.depths)
        n_moe = cfg.moe.num_layers if cfg.moe.enabled else 0
        dpr = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
        stages, idx = [], 0
        for s, (depth, dim) in enumerate(zip(cfg.depths, dims)):
            windowed = s not in cfg.global_attn_stages
            heads = max(dim // cfg.head_dim, 1)
            blocks = []
            for j in range(depth):
                ffn = make_ffn(dim, cfg.mlp_ratio, cfg.moe if idx >= total - n_moe else None)
                if windowed:
                    blocks.append(SwinV2Block(dim, heads, cfg.window, j % 2 == 1, ffn, dpr[idx]))
                else:
                    blocks.append(TransformerBlock(dim, heads, ffn, dpr[idx]))
                idx += 1
            prompts = cfg.num_prompts if s in cfg.prompt_stages else 0
            stages.append(Stage(blocks, dim, windowed, prompts))
        self.stages = nn.ModuleList(stages)
        self.apms = nn.ModuleList([AdaptivePatchMerging(d) for d in dims[:-1]])
        self.norms = nn.ModuleList([nn.LayerNorm(d) for d in dims])
        f = cfg.fusion
        self.fusion = TemporalFusion(self.out_dim, f.dim, f.depth, f.num_heads, f.mlp_ratio)
        # Experts are left to `moe.init_experts` (seeded by global expert id): drawing them here would make the RNG
        # stream, and so every later initialisation, depend on how many experts are local (ep_size).
        for name, module in self.named_modules():
            if ".deepspeed_experts." not in name:
                _init_weights(module)
        for stage in self.stages:
            if stage.prompts is not None:
                nn.init.trunc_normal_(stage.prompts, std=0.02)
        nn.init.trunc_normal_(self.fusion.cls_token, std=0.02)
        nn.init.trunc_normal_(self.fusion.modality_embed, std=0.02)
        self.set_activation_checkpointing(cfg.activation_checkpointing)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Checkpoint every backbone block and fusion layer (same outputs and gradients, less memory)."""
        for stage in self.stages:
            stage.activation_checkpointing = enabled
        self.fusion.activation_checkpointing = enabled

    def forward_features(self, x: torch.Tensor, modality: str) -> dict[str, object]:
        """x: (B, C_m, H, W) -> {"stages": [(B, h_i, w_i, C_i)], "pooled": (B, out_dim), "aux_loss": scalar}."""
        if modality not in self.tokenizers:
            raise ValueError(f"unknown modality {modality!r}, expected one of {MODALITIES}")
        reduce = self.cfg.apm_reduce[modality]
        x = self.tokenizers[modality](x)
        feats = []
        aux = x.new_zeros((), dtype=torch.float32)
        for s, stage in enumerate(self.stages):
            if s > 0:
                x = self.apms[s - 1](x, reduce)
            x, a = stage(x, modality)
            aux = aux + a
            feats.append(self.norms[s](x))
        return {"stages": feats, "pooled": feats[-1].mean(dim=(1, 2)), "aux_loss": aux}

    def forward(self, x: torch.Tensor, modality: str) -> dict[str, object]:
        return self.forward_features(x, modality)

    def fuse(self, hr, s2, s2_doy, s1, s1_doy, *, hr_valid=None, s2_valid=None, s1_valid=None) -> torch.Tensor:
        """F_fus (B, h, w, fusion_dim) on HR's grid (largest present without HR) from last-stage features.

        hr: (B, h, w, out_dim) | None; s2, s1: (B, T, h', w', out_dim) | None; s2_doy, s1_doy: (B, T) long 0..365.
        Optional hr_valid (B,), s2_valid (B, T2), s1_valid (B, T1) bool: False drops that image / date from the
        sample's fusion (absent modality, padded date).
        """
        return self.fusion(hr, s2, s2_doy, s1, s1_doy, hr_valid=hr_valid, s2_valid=s2_valid, s1_valid=s1_valid)

    def moe_layers(self) -> dict[str, SkyMoE]:
        return {name: m for name, m in self.named_modules() if isinstance(m, SkyMoE)}

    def moe_stats(self) -> dict[str, dict[str, object]]:
        """Per MoE layer (by module name): expert_counts, kept_counts, dropped, tokens, capacity of its last forward."""
        return {name: m.stats() for name, m in self.moe_layers().items()}


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.trunc_normal_(m.weight, std=0.02)


def validate(cfg: ModelConfig) -> None:
    """Reject configurations the model cannot honour."""
    for s in cfg.prompt_stages:
        if cfg.num_prompts and s not in cfg.global_attn_stages:
            raise ValueError(f"prompts in stage {s} need global attention there (windowed ablation: no prompts)")
    if cfg.moe.enabled and cfg.moe.num_layers > sum(cfg.depths):
        raise ValueError("moe.num_layers exceeds the number of blocks")
    if cfg.moe.enabled and cfg.moe.top_k != 1:
        raise ValueError("only top-1 routing is implemented")
    if cfg.moe.enabled and cfg.moe.num_experts % cfg.moe.ep_size:
        raise ValueError("moe.num_experts must be divisible by moe.ep_size")
    if set(cfg.apm_reduce) != set(MODALITIES):
        raise ValueError(f"apm_reduce must name every modality {MODALITIES}")
    if any(cfg.embed_dim * 2**i % cfg.head_dim for i in range(len(cfg.depths))):
        raise ValueError("stage widths must be multiples of head_dim")
    if not math.isfinite(cfg.drop_path) or not 0 <= cfg.drop_path < 1:
        raise ValueError("drop_path must lie in [0, 1)")


def build_model(cfg: ModelConfig, *, device=None, dtype=None) -> SkySenseV2:
    """Build the model directly on `device` ("meta" for paper-scale inspection) in `dtype`."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = SkySenseV2(cfg)
    if dtype is not None:
        model = model.to(dtype)
    return model
