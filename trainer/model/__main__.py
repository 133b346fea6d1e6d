"""Model summary: `python -m trainer.model --recipe huge --summary [--json]`.

Builds the recipe on the meta device (no memory), counts parameters per part and forward FLOPs per sample per
modality with `torch.utils.flop_counter.FlopCounterMode` (matmul/conv/SDPA FLOPs, 2 per multiply-add).
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.model import config as model_config
from trainer.model.backbone import SkySenseV2, build_model
from trainer.model.config import IN_CHANS, MODALITIES

RECIPES = {"tiny": model_config.tiny_model, "base": model_config.base_model, "huge": model_config.huge_model}


def _numel(params) -> int:
    return sum(p.numel() for p in params)


def param_breakdown(model: SkySenseV2) -> dict[str, int]:
    """Parameters per part; experts counted apart from their stages (every expert copy included)."""
    expert_ids = {id(p) for m in model.moe_layers().values() for p in m.deepspeed_moe.experts.parameters()}
    prompt_ids = {id(s.prompts) for s in model.stages if s.prompts is not None}
    parts: dict[str, int] = {"tokenizers": _numel(model.tokenizers.parameters())}
    for i, stage in enumerate(model.stages):
        parts[f"stage{i + 1}"] = _numel(
            p for p in stage.parameters() if id(p) not in expert_ids and id(p) not in prompt_ids
        )
        if i < len(model.apms):
            parts[f"apm{i + 1}"] = _numel(model.apms[i].parameters())
    parts["prompts"] = _numel(s.prompts for s in model.stages if s.prompts is not None)
    parts["experts"] = _numel(p for p in model.parameters() if id(p) in expert_ids)
    parts["out_norms"] = _numel(model.norms.parameters())
    parts["fusion"] = _numel(model.fusion.parameters())
    return parts


def summary(recipe: str, hr_size: int = 512, ms_size: int = 16, s2_dates: int = 10, s1_dates: int = 5) -> dict:
    """Params per part, totals (with/without fusion, all experts vs one active), FLOPs per sample per modality."""
    cfg = RECIPES[recipe]()
    model = build_model(cfg, device="meta")
    parts = param_breakdown(model)
    total = sum(parts.values())
    e = cfg.moe.num_experts if cfg.moe.enabled else 1
    active = total - parts["experts"] + parts["experts"] // e  # top-1: one expert copy per token
    flops = {}
    sizes = {"hr": hr_size, "s2": ms_size, "s1": ms_size}
    grids = {}
    with torch.no_grad():
        for m in MODALITIES:
            x = torch.empty(1, IN_CHANS[m], sizes[m], sizes[m], device="meta")
            with FlopCounterMode(display=False) as fc:
                out = model.forward_features(x, m)
            flops[m] = fc.get_total_flops()
            grids[m] = tuple(out["stages"][-1].shape[1:3])
        d = model.out_dim
        h, w = grids["hr"]
        ms_h, ms_w = grids["s2"]
        with FlopCounterMode(display=False) as fc:
            model.fuse(
                torch.empty(1, h, w, d, device="meta"),
                torch.empty(1, s2_dates, ms_h, ms_w, d, device="meta"),
                torch.zeros(1, s2_dates, dtype=torch.long, device="meta"),
                torch.empty(1, s1_dates, ms_h, ms_w, d, device="meta"),
                torch.zeros(1, s1_dates, dtype=torch.long, device="meta"),
            )
        flops["fusion"] = fc.get_total_flops()
    return {
        "recipe": recipe,
        "params": parts,
        "params_total": total,
        "params_active": active,
        "params_backbone": total - parts["fusion"],
        "params_backbone_dense": total - parts["fusion"] - parts["experts"] + parts["experts"] // e,
        "flops_per_sample": flops,
        "flops_inputs": {
            "hr_px": hr_size,
            "s2_s1_px_per_date": ms_size,
            "fusion_dates": [s2_dates, s1_dates],
            "fusion_grid": [h, w],
        },
        "out_dim": model.out_dim,
        "fusion_dim": model.fusion_dim,
    }


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="tiny")
    ap.add_argument("--summary", action="store_true", help="print params per part and FLOPs (the default)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--hr-size", type=int, default=512)
    ap.add_argument("--ms-size", type=int, default=16, help="S2/S1 crop size in pixels")
    args = ap.parse_args(argv)
    s = summary(args.recipe, args.hr_size, args.ms_size)
    if args.json:
        print(json.dumps(s, indent=2))
        return
    print(f"recipe {s['recipe']}: out_dim {s['out_dim']}, fusion_dim {s['fusion_dim']}")
    for k, v in s["params"].items():
        print(f"  {k:<12} {v:>15,d}  ({_fmt(v)})")
    for k in ("params_total", "params_active", "params_backbone", "params_backbone_dense"):
        print(f"{k:<22} {s[k]:>15,d}  ({_fmt(s[k])})")
    fi = s["flops_inputs"]
    print(f"forward FLOPs per sample (HR {fi['hr_px']} px, S2/S1 {fi['s2_s1_px_per_date']} px per date):")
    for k, v in s["flops_per_sample"].items():
        print(f"  {k:<8} {_fmt(v)}FLOP")


if __name__ == "__main__":
    main()
