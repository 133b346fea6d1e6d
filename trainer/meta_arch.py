"""Student and EMA teacher in one module (one DeepSpeed engine, one checkpoint), returning a dict of losses."""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import RunConfig
from trainer.model import MODALITIES, build_model
from trainer.model.moe import SkyMoE, init_experts
from trainer.objectives import build_objectives
from trainer.objectives.centering import Centering
from trainer.objectives.contrastive import ContrastiveObjective, ProjectionHead
from trainer.objectives.dino import DINOHead
from trainer.objectives.koleo import koleo_loss

TERMS = (*MODALITIES, "fus")
FULL_VIEW = {"box": (0.0, 0.0, 1.0, 1.0), "flip_y": False, "flip_x": False, "rot": 0}


class SSLMetaArch(nn.Module):
    """`forward(batch, teacher_temp) -> {"total", "<level>/<term>", "moe_aux", ...}`; `step_objectives()` and
    `update_teacher(m)` once per optimizer step.

    The teacher is a frozen deepcopy of the student (backbone and every objective's heads), updated by EMA after each
    optimizer step, always in eval mode (no drop path, MoE at its eval capacity). It sees the global views; the
    student sees the global and the local views. Objectives come from `trainer.objectives` (a registry), each owning
    its state (centres); the total is the sum of each term times its recipe weight, so a term that a batch cannot
    have (an absent modality) adds zero instead of diluting the others.
    """

    def __init__(self, cfg: RunConfig, *, device=None):
        super().__init__()
        self.cfg = cfg
        backbone = build_model(cfg.model, device=device)
        # DeepSpeed's expert-parallel groups are consecutive ranks: ep_rank = rank % ep_size.
        self.ep_rank = (dist.get_rank() if dist.is_initialized() else 0) % cfg.model.moe.ep_size
        init_experts(backbone, cfg.train.seed, self.ep_rank)
        lc = cfg.loss
        head = {"out_dim": lc.head_out_dim, "hidden_dim": lc.head_hidden_dim,
                "bottleneck_dim": lc.head_bottleneck_dim, "device": device}
        dims = {"backbone": backbone.out_dim, "fusion": backbone.fusion_dim}
        self.objectives = nn.ModuleDict(build_objectives(cfg, TERMS, device=device))
        heads = {"head": DINOHead(dims["backbone"], **head), "fusion_head": DINOHead(dims["fusion"], **head)}
        if any(name in self.objectives for name in ("pixel", "object")):
            heads["pixel_head"] = DINOHead(dims["backbone"], **head)
            heads["fusion_pixel_head"] = DINOHead(dims["fusion"], **head)
        if "contrast" in self.objectives:
            proj = {"hidden_dim": lc.head_hidden_dim, "out_dim": lc.contrast_dim, "device": device}
            heads["contrast_head"] = ProjectionHead(dims["backbone"], **proj)
            heads["fusion_contrast_head"] = ProjectionHead(dims["fusion"], **proj)
        self.student = nn.ModuleDict({"backbone": backbone, **heads})
        # The student backbone's MoE layer names, the same on every rank (health()'s all-ranks balance gauge).
        self._moe_names = sorted(n for n, m in backbone.named_modules() if isinstance(m, SkyMoE))
        for moe in _moe_layers(self.student):  # the student's training calls feed the bias balancer, when on
            moe.deepspeed_moe.balancing = cfg.model.moe.balance_rate > 0
        self.teacher = copy.deepcopy(self.student)
        for moe in _moe_layers(self.teacher):
            moe.deepspeed_moe.balancing = False
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.teacher_autocast: torch.dtype | None = None
        # MoE routing summed over every call since the last `health()`: (network, modality, layer) -> [counts (E,),
        # dropped, tokens]. `count_moe` is off while trainer.metrics.step_flops runs its extra encodes.
        self._moe_counts: dict[tuple[str, str, str], list] = {}
        self.moe_step: dict[tuple[str, str, str], dict] = {}
        self.count_moe = True
        self._last: dict | None = None

    def train(self, mode: bool = True):
        """The student follows `mode`; the teacher stays in eval mode (DINO builds its teacher without drop path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    def keep_teacher_fp32(self, compute_dtype: torch.dtype) -> None:
        """Under bf16 training: hold the teacher in fp32 and run it under autocast.

        DeepSpeed casts every parameter to bf16; an EMA step of (1 - m) * (s - t) with m >= 0.994 is mostly below
        bf16's resolution (8 bits of mantissa), so a bf16 teacher would barely move.
        """
        self.teacher.float()
        self.teacher_autocast = compute_dtype

    def encode(self, net: nn.ModuleDict, view: dict) -> dict:
        """One view -> {"pooled": {term: (B, D)}, "maps": {term: (B, h, w, D)}, "geom": {...}, "aux": scalar}.

        view: hr (B, 3, h, w); s2 (B, T2, 10, s, s); s1 (B, T1, 2, s, s); s2_doy/s1_doy (B, T); has_* (B,); optional
        box (B, 4), flip_y, flip_x (B,), rot (B,) (trainer.geometry; the whole extent when absent). S2/S1 maps are
        averaged over dates. The backbone sees only the samples that have a modality: zero stand-ins would reach
        the MoE aux loss through LayerNorms of zero variance. When no sample has it, one zero row runs with weight
        0, so every rank runs the same ops (ZeRO reduces gradients in hook order) and every parameter gets a grad.
        """
        backbone = net["backbone"]
        pooled, maps, last_maps, aux = {}, {}, {}, 0.0
        for m in MODALITIES:
            x, has = view[m], view[f"has_{m}"]
            idx = has.nonzero().squeeze(1)
            scale = 1.0
            if idx.numel() == 0:
                idx, scale = idx.new_zeros(1), 0.0
            sub = x.index_select(0, idx)
            lead = sub.shape[:-3]  # (b,) or (b, T)
            for moe in _moe_layers(net):  # stand-in rows must not steer the routing balancer either
                moe.deepspeed_moe.balance_counting = bool(scale)
            f = backbone.forward_features(sub.reshape(-1, *sub.shape[-3:]), m)
            # The zero stand-in row's identical tokens would skew the load: not counted.
            self._count_experts("student" if net is self.student else "teacher", m, backbone, bool(scale))
            aux = aux + scale * f["aux_loss"]
            p = f["pooled"].reshape(*lead, -1)
            last = f["stages"][-1]
            last = last.reshape(*lead, *last.shape[1:])
            p, dense = (p, last) if m == "hr" else (p.mean(dim=1), last.mean(dim=1))
            # Scatter back to the full batch; absent samples hold zeros (masked out of every loss).
            pooled[m] = p.new_zeros(x.shape[0], *p.shape[1:]).index_copy(0, idx, p * scale)
            maps[m] = dense.new_zeros(x.shape[0], *dense.shape[1:]).index_copy(0, idx, dense * scale)
            last_maps[m] = last.new_zeros(x.shape[0], *last.shape[1:]).index_copy(0, idx, last * scale)
        # Absent modalities are left out of each sample's fusion sequence by key masks.
        t2, t1 = view["s2"].shape[1], view["s1"].shape[1]
        fused = backbone.fuse(last_maps["hr"], last_maps["s2"], view["s2_doy"], last_maps["s1"], view["s1_doy"],
                              hr_valid=view["has_hr"], s2_valid=view["has_s2"][:, None].expand(-1, t2),
                              s1_valid=view["has_s1"][:, None].expand(-1, t1))
        pooled["fus"], maps["fus"] = fused.mean(dim=(1, 2)), fused
        return {"pooled": pooled, "maps": maps, "geom": _geometry(view), "aux": aux}

    def _count_experts(self, network: str, modality: str, backbone: nn.Module, count: bool) -> None:
        # Each route is read once and cleared, so a layer that did not run in this call cannot be counted twice.
        for name, moe in backbone.named_modules():
            route = moe.deepspeed_moe.last_route if isinstance(moe, SkyMoE) else None
            if not route:
                continue
            if count and self.count_moe:
                acc = self._moe_counts.setdefault((network, modality, name), [0, 0, 0, 0])
                acc[0] = acc[0] + route["counts"].detach()
                acc[1] += route["dropped"]
                acc[2] += route["tokens"]
                acc[3] = acc[3] + route["kept_counts"]
            moe.deepspeed_moe.last_route = {}

    def forward(self, batch: dict, teacher_temp: float) -> dict[str, torch.Tensor]:
        globals_, locals_ = batch["views"], batch.get("local_views", [])
        student = [self.encode(self.student, v) for v in (*globals_, *locals_)]
        device = globals_[0]["hr"].device.type
        teacher_ctx = torch.autocast(device, dtype=self.teacher_autocast or torch.bfloat16,
                                     enabled=self.teacher_autocast is not None)
        with torch.no_grad(), teacher_ctx:
            teacher = [self.encode(self.teacher, v) for v in globals_]
        # A sample counts for a term when it has the modality (the views of one set share its modalities).
        weights = {m: globals_[0][f"has_{m}"].float() for m in MODALITIES}
        weights["fus"] = torch.ones_like(weights["hr"])
        lc = self.cfg.loss
        level_weight = {name: getattr(lc, f"{name}_weight") for name in self.objectives}
        losses: dict[str, torch.Tensor] = {}
        total = 0.0
        with teacher_ctx:
            for name, objective in self.objectives.items():
                terms = objective(student, teacher, self.student, self.teacher, weights, teacher_temp)
                losses.update(terms)
                total = total + level_weight[name] * sum(terms.values())
        if lc.koleo_weight > 0:  # DINOv2's KoLeo on the student's pooled global features, per present modality
            koleo = sum(koleo_loss(s["pooled"][t][weights[t] > 0]) if bool((weights[t] > 0).sum() > 1)
                        else 0.0 * s["pooled"][t].sum() for s in student[: len(globals_)] for t in TERMS)
            losses["koleo"] = koleo / len(globals_)
            total = total + lc.koleo_weight * losses["koleo"]
        losses["moe_aux"] = sum(s["aux"] for s in student) / len(student)
        losses["total"] = total + losses["moe_aux"]
        # Detached references only: the gauges are computed once per step in `health()`, not per micro-batch
        # (each reading is a host sync on CUDA).
        self._last = {"pooled": [{t: x["pooled"][t] for t in TERMS} for x in teacher], "weights": weights}
        return losses

    @torch.no_grad()
    def _learning_health(self) -> dict[str, float]:
        """Collapse gauges of the last forward: teacher output entropy, per-dimension std of normalised features
        (x sqrt(d): ~1 healthy, -> 0 collapsed), mean cosine between different images."""
        out = {}
        probs = self.objectives["image"].last_probs if "image" in self.objectives else None
        if probs is not None:
            ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
            out = {"teacher_entropy": float(ent.mean()), "teacher_max_entropy": math.log(probs.shape[-1]),
                   "teacher_distinct_argmax": float(probs.argmax(-1).unique().numel())}
        if self._last is None:
            return out
        teacher, weights = self._last["pooled"], self._last["weights"]
        term = next((t for t in TERMS if bool(weights[t].sum() > 1)), "fus")
        feats = torch.cat([t[term][weights[term] > 0] for t in teacher]).float()
        z = nn.functional.normalize(feats, dim=-1)
        out["feature_std"] = float(z.std(dim=0).mean() * z.shape[-1] ** 0.5) if len(z) > 1 else 0.0
        n = len(z) // len(teacher)
        if n > 1:
            sim = z[:n] @ z[:n].t()
            out["feature_cosine"] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
        return out

    def health(self) -> dict[str, float]:
        """Learning-health gauges of the last micro-batch plus MoE balance (max / mean expert load, worst layer) over
        every student MoE call since the last call of this method: `moe_max_over_mean` and `moe_load/<layer>` over all
        ranks summed (a collective: every rank calls this once per step), `moe_max_over_mean_rank` this rank's own.
        These count the router's first choice (before capacity). `moe_kept_max_over_mean` counts the tokens each
        expert processed (after capacity and re-routing), all ranks summed, worst layer.

        Also sets `moe_step`: {(network, modality, layer): {"expert_counts", "kept_counts", "dropped", "tokens"}}
        summed over every MoE call since the last call (student and teacher apart, every micro-batch), then resets the
        counts.
        """
        out = self._learning_health()
        self.moe_step = {key: {"expert_counts": [int(v) for v in c.tolist()],
                               "kept_counts": [int(v) for v in k.tolist()], "dropped": int(d), "tokens": int(n)}
                         for key, (c, d, n, k) in sorted(self._moe_counts.items())}
        per_layer: dict[str, torch.Tensor] = {}
        kept_layer: dict[str, torch.Tensor] = {}
        for (network, _, name), (c, _, _, k) in self._moe_counts.items():
            if network == "student":
                per_layer[name] = per_layer.get(name, 0) + c.float()
                kept_layer[name] = kept_layer.get(name, 0) + k.float()
        if per_layer:
            loads = {name: float(c.max() / c.mean().clamp_min(1e-9)) for name, c in per_layer.items()}
            out["moe_max_over_mean_rank"] = max(loads.values())
        names = self._moe_names
        if names and dist.is_initialized() and dist.get_world_size() > 1:
            # The job's load, all ranks summed (what an expert-parallel expert receives; DeepSeek-V3's MaxVio is
            # over the global batch too). Every rank holds every MoE layer name, counted or not, so the shapes agree.
            e = self.cfg.model.moe.num_experts
            device = next(self.student.parameters()).device
            stacked = torch.stack([d[n].to(device) if n in d else torch.zeros(e, device=device)
                                   for d in (per_layer, kept_layer) for n in names])
            dist.all_reduce(stacked)
            per_layer = {n: c for n, c in zip(names, stacked[:len(names)], strict=True) if float(c.sum()) > 0}
            kept_layer = {n: c for n, c in zip(names, stacked[len(names):], strict=True) if float(c.sum()) > 0}
        if per_layer:
            loads = {name: float(c.max() / c.mean().clamp_min(1e-9)) for name, c in per_layer.items()}
            out["moe_max_over_mean"] = max(loads.values())
            out.update({f"moe_load/{name}": v for name, v in loads.items()})
        if kept_layer:
            out["moe_kept_max_over_mean"] = max(float(c.max() / c.mean().clamp_min(1e-9)) for c in kept_layer.values())
        self._moe_counts = {}
        return out

    @torch.no_grad()
    def step_objectives(self) -> None:
        """Once per optimizer step: every objective folds its accumulated teacher statistics (centres, queues) in."""
        for module in self.objectives.modules():
            if isinstance(module, Centering | ContrastiveObjective):
                module.step()
        rate = self.cfg.model.moe.balance_rate
        if rate > 0:  # the teacher routes with the student's bias (routing state, not a learned weight)
            for s, t in zip(_moe_layers(self.student), _moe_layers(self.teacher), strict=True):
                s.deepspeed_moe.balance_step(rate)
                t.deepspeed_moe.route_bias.copy_(s.deepspeed_moe.route_bias)
                t.deepspeed_moe._bias_active = None

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        s_params = list(self.student.parameters())
        t_params = list(self.teacher.parameters())
        torch._foreach_mul_(t_params, momentum)
        torch._foreach_add_(t_params, [p.detach().to(t.dtype) for p, t in zip(s_params, t_params)],
                            alpha=1 - momentum)


def _moe_layers(net: nn.Module) -> list[SkyMoE]:
    return [m for m in net.modules() if isinstance(m, SkyMoE)]


def _geometry(view: dict) -> dict[str, torch.Tensor]:
    """The view's box / flips / rotation as (B, ...) tensors; the whole extent, unflipped, when the batch has none."""
    b, dev = view["hr"].shape[0], view["hr"].device
    out = {}
    for key, default in FULL_VIEW.items():
        if key in view:
            out[key] = view[key].to(dev)
        else:
            dtype = torch.float32 if key == "box" else (torch.bool if key.startswith("flip") else torch.long)
            out[key] = torch.tensor(default, dtype=dtype, device=dev).expand(b, *([4] if key == "box" else []))
    out["box"] = out["box"].float()
    return out
