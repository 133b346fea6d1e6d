"""SkySense V2 model: unified backbone (SwinV2 + APM + prompts + MoE) and temporal fusion.

from trainer.model import ModelConfig, build_model, tiny_model, base_model, huge_model
model = build_model(tiny_model(), device="cpu")
out = model.forward_features(x, "hr")  # {"stages": [...], "pooled": ..., "aux_loss": ...}
"""

from trainer.model.backbone import SkySenseV2, build_model
from trainer.model.config import (
    IN_CHANS,
    MODALITIES,
    FusionConfig,
    ModelConfig,
    MoEConfig,
    base_model,
    huge_model,
    tiny_model,
)
from trainer.model.moe import SkyMoE

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
