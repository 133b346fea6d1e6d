"""Model configuration: one typed tree, recipes are functions (paper-scale values in `huge_model`)."""

from __future__ import annotations

from dataclasses import dataclass, field

MODALITIES = ("hr", "s2", "s1")
IN_CHANS = {"hr": 3, "s2": 10, "s1": 2}


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    """Top-1 mixture of experts replacing the FFN in the last `num_layers` blocks of the backbone."""

    enabled: bool = True
    num_experts: int = 8
    num_layers: int = 6
    top_k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    # Bias-based balancing (after DeepSeek-V3): after each optimizer step every expert's routing bias moves towards
    # the mean load by rate x (mean - load) / mean (the step's counts summed over ranks). 0 = off (aux loss only).
    balance_rate: float = 0.0
    # Rounds of overflow re-routing (ops.reroute_overflow): a token whose expert is full goes to its best expert with
    # a free slot instead of being dropped. 0 = drop, DeepSpeed's behaviour.
    reroute: int = 0
    ep_size: int = 1


@dataclass(kw_only=True, slots=True)
class FusionConfig:
    """Temporal fusion transformer over [cls, HR, S2 x T, S1 x T] tokens per output location."""

    dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The unified backbone (SwinV2 stages 1-2, APM, transformer stages 3-4 with prompts and MoE) and fusion."""

    embed_dim: int = 352
    depths: tuple[int, ...] = (2, 2, 18, 2)
    head_dim: int = 32
    window: int = 8
    mlp_ratio: float = 4.0
    patch_size: int = 4
    # Which modalities halve their resolution at each APM (HR) and which keep it (S2, S1).
    apm_reduce: dict[str, bool] = field(default_factory=lambda: {"hr": True, "s2": False, "s1": False})
    num_prompts: int = 4
    # Stages (0-based) with modality prompt tokens, and stages using global instead of windowed attention.
    prompt_stages: tuple[int, ...] = (2, 3)
    global_attn_stages: tuple[int, ...] = (2, 3)
    drop_path: float = 0.1
    activation_checkpointing: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)


def huge_model() -> ModelConfig:
    """Paper scale: C=352, head dim 32, window 8, depths (2, 2, 18, 2), MoE L=6 M=8 k=1, 4 prompts."""
    return ModelConfig()


def base_model() -> ModelConfig:
    """A mid-size model for single-node experiments."""
    return ModelConfig(
        embed_dim=128,
        depths=(2, 2, 6, 2),
        moe=MoEConfig(num_experts=8, num_layers=4),
        fusion=FusionConfig(dim=512, depth=4, num_heads=8),
    )


def tiny_model() -> ModelConfig:
    """CPU tests and the demo: seconds per step on 2 cores, every component present."""
    return ModelConfig(
        embed_dim=32,
        depths=(1, 1, 2, 1),
        head_dim=16,
        window=4,
        mlp_ratio=2.0,
        num_prompts=4,
        drop_path=0.0,
        moe=MoEConfig(num_experts=4, num_layers=2, capacity_factor=2.0),
        fusion=FusionConfig(dim=64, depth=1, num_heads=4, mlp_ratio=2.0),
    )
