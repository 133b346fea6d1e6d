"""SkySense V2 model: unified backbone (SwinV2 + APM + prompts + MoE) and temporal fusion.

from trainer.model import ModelConfig, build_model, tiny_model, base_model, huge_model
model = build_model(tiny_model(), device="cpu")
out = model.forward_features(x, "hr")  # {"stages": [...], "pooled": ..., "aux_loss": ...}
"""

import os

import torch

if not torch.cuda.is_available():
    # Before anything imports DeepSpeed: its accelerator probe otherwise prints a warning on stdout (which broke
    # `python -m trainer.plan --json | jq`); CPU is what it would pick anyway.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from trainer.model.backbone import SkySenseV2, build_model  # noqa: E402
from trainer.model.config import (  # noqa: E402
    IN_CHANS,
    MODALITIES,
    FusionConfig,
    ModelConfig,
    MoEConfig,
    base_model,
    huge_model,
    tiny_model,
)
from trainer.model.moe import SkyMoE  # noqa: E402

__all__ = [
    "IN_CHANS",
    "MODALITIES",
    "FusionConfig",
    "ModelConfig",
    "MoEConfig",
    "SkyMoE",
    "SkySenseV2",
    "base_model",
    "build_model",
    "huge_model",
    "tiny_model",
]
