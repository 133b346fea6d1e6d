"""Student and EMA teacher in one module (one DeepSpeed engine, one checkpoint), returning a dict of losses."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import RunConfig
from trainer.model import MODALITIES, build_model
from trainer.model.moe import init_experts
from trainer.objectives.dino import DINOHead, DINOLoss


class SSLMetaArch(nn.Module):
    """`forward(batch, teacher_temp) -> {"total", "image/<m>", "image/fus", "moe_aux"}`; `update_teacher(m)`.

    The teacher is a frozen deepcopy of the student updated by EMA after each optimizer step. It sees the same
    two global views as the student (local views and the other objectives arrive in later objectives/ files).
    """

    def __init__(self, cfg: RunConfig, *, device=None):
        super().__init__()
        self.cfg = cfg
        backbone = build_model(cfg.model, device=device)
        # DeepSpeed's expert-parallel groups are consecutive ranks: ep_rank = rank % ep_size.
        self.ep_rank = (dist.get_rank() if dist.is_initialized() else 0) % cfg.model.moe.ep_size
        init_experts(backbone, cfg.train.seed, self.ep_rank)
        lc = cfg.loss
        head = {"in_dim": backbone.out_dim, "out_dim": lc.head_out_dim, "hidden_dim": lc.head_hidden_dim,
                "bottleneck_dim": lc.head_bottleneck_dim, "device": device}
        self.student = nn.ModuleDict({
            "backbone": backbone,
            "head": DINOHead(**head),
            "fusion_head": DINOHead(**{**head, "in_dim": backbone.fusion_dim}),
        })
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)
        self.teacher_autocast: torch.dtype | None = None
        self.image_loss = DINOLoss(lc.head_out_dim, lc.student_temp, lc.center_momentum, device=device)
        self.fusion_loss = DINOLoss(lc.head_out_dim, lc.student_temp, lc.center_momentum, device=device)

    def keep_teacher_fp32(self, compute_dtype: torch.dtype) -> None:
        """Under bf16 training: hold the teacher in fp32 and run it under autocast.

        DeepSpeed casts every parameter to bf16; an EMA step of (1 - m) * (s - t) with m >= 0.994 is mostly below
        bf16's resolution (8 bits of mantissa), so a bf16 teacher would barely move.
        """
        self.teacher.float()
        self.teacher_autocast = compute_dtype

    def encode(self, net: nn.ModuleDict, view: dict) -> dict[str, torch.Tensor]:
        """One view -> pooled features per modality (B, D), F_fus pooled (B, Df), and the MoE aux loss.

        view: hr (B, 3, h, w); s2 (B, T2, 10, s, s); s1 (B, T1, 2, s, s); s2_doy/s1_doy (B, T); has_* (B,).
        The backbone sees only the samples that have a modality: zero stand-ins would reach the MoE aux loss
        through LayerNorms of zero variance. When no sample has it, one zero row runs with weight 0, so that every
        rank runs the same sequence of ops (ZeRO reduces gradients in hook order) and every parameter gets a grad.
        """
        backbone = net["backbone"]
        out, maps, aux = {}, {}, 0.0
        for m in MODALITIES:
            x, has = view[m], view[f"has_{m}"]
            idx = has.nonzero().squeeze(1)
            scale = 1.0
            if idx.numel() == 0:
                idx, scale = idx.new_zeros(1), 0.0
            sub = x.index_select(0, idx)
            lead = sub.shape[:-3]  # (b,) or (b, T)
            f = backbone.forward_features(sub.reshape(-1, *sub.shape[-3:]), m)
            aux = aux + scale * f["aux_loss"]
            pooled = f["pooled"].reshape(*lead, -1)
            pooled = pooled if m == "hr" else pooled.mean(dim=1)
            last = f["stages"][-1]
            last = last.reshape(*lead, *last.shape[1:])
            # Scatter back to the full batch; absent samples hold zeros (masked out of every loss).
            full_pooled = pooled.new_zeros(x.shape[0], *pooled.shape[1:])
            full_map = last.new_zeros(x.shape[0], *last.shape[1:])
            out[m] = full_pooled.index_copy(0, idx, pooled * scale)
            maps[m] = full_map.index_copy(0, idx, last * scale)
        # Absent modalities are left out of each sample's fusion sequence by key masks.
        t2, t1 = view["s2"].shape[1], view["s1"].shape[1]
        fused = backbone.fuse(maps["hr"], maps["s2"], view["s2_doy"], maps["s1"], view["s1_doy"],
                              hr_valid=view["has_hr"], s2_valid=view["has_s2"][:, None].expand(-1, t2),
                              s1_valid=view["has_s1"][:, None].expand(-1, t1))
        out["fus"] = fused.mean(dim=(1, 2))
        out["aux"] = aux
        return out

    def forward(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        views = batch["views"]
        student = [self.encode(self.student, v) for v in views]
        device = views[0]["hr"].device.type
        teacher_ctx = torch.autocast(device, dtype=self.teacher_autocast or torch.bfloat16,
                                     enabled=self.teacher_autocast is not None)
        with torch.no_grad(), teacher_ctx:
            teacher = [self.encode(self.teacher, v) for v in views]
        losses: dict[str, torch.Tensor] = {}
        ones = torch.ones_like(views[0]["has_hr"], dtype=torch.float32)
        for m in (*MODALITIES, "fus"):
            head, crit = ("fusion_head", self.fusion_loss) if m == "fus" else ("head", self.image_loss)
            # A sample counts when it has the modality in both views (always true within one set).
            weight = ones if m == "fus" else (views[0][f"has_{m}"] & views[1][f"has_{m}"]).float()
            s_logits = [self.student[head](s[m]) for s in student]
            with torch.no_grad(), teacher_ctx:
                t_logits = [self.teacher[head](t[m]) for t in teacher]
                t_probs = [crit.teacher_probs(t, teacher_temp) for t in t_logits]
            losses[f"image/{m}"] = crit(s_logits, t_probs, weight)
            crit.update_center(t_logits, weight)
        image = sum(losses[f"image/{m}"] for m in (*MODALITIES, "fus")) / (len(MODALITIES) + 1)
        losses["moe_aux"] = sum(s["aux"] for s in student) / len(student)
        losses["total"] = self.cfg.loss.image_weight * image + losses["moe_aux"]
        return losses

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        s_params = list(self.student.parameters())
        t_params = list(self.teacher.parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [p.detach().to(t.dtype) for p, t in zip(s_params, t_params)],
                            alpha=1 - momentum)
