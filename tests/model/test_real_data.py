"""The tiny model on real imagery: an eo-learn Sentinel-2 time series (S2) and a LEVIR-CD RGB tile (HR stand-in).

Not a co-registered set (none exists at SkySense's scale ratio in ../shared/data): this checks that real value
ranges and real grids run through backbone + fusion with finite gradients, and that MoE accounting holds on
real tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.model import build_model, tiny_model

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
S2_SERIES = DATA / "eolearn" / "REFERENCE_SCENES.npy"
HR_DIR = DATA / "levir-cd" / "A"
# B01..B12 with B8A after B08 -> the 10 bands the model takes (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12).
S2_BANDS = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12]


@pytest.fixture(scope="module")
def real_inputs():
    if not S2_SERIES.exists() or not HR_DIR.exists():
        pytest.skip(f"real sample data not found under {DATA} (only present on the development machines)")
    from PIL import Image

    series = np.load(S2_SERIES)[:, 20:36, 30:46, S2_BANDS]  # (T=5, 16, 16, 10) reflectance 0..1
    s2 = torch.from_numpy(series).permute(0, 3, 1, 2).float()
    s2 = (s2 - s2.mean(dim=(0, 2, 3), keepdim=True)) / s2.std(dim=(0, 2, 3), keepdim=True)
    tiles = sorted(HR_DIR.glob("*.png"))[:2]
    hr = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))[:64, :64]) for p in tiles])
    hr = (hr.permute(0, 3, 1, 2).float() / 255.0 - 0.45) / 0.25
    return s2, hr


def test_real_s2_series_and_hr_through_backbone_and_fusion(real_inputs):
    s2, hr = real_inputs  # s2 (5, 10, 16, 16): one location, 5 dates; hr (2, 3, 64, 64)
    torch.manual_seed(0)
    model = build_model(tiny_model())
    f_s2 = model.forward_features(s2, "s2")
    f_hr = model.forward_features(hr, "hr")
    last_s2 = f_s2["stages"][-1]  # (5, 4, 4, 256)
    assert last_s2.shape == (5, 4, 4, model.out_dim) and f_hr["stages"][-1].shape == (2, 2, 2, model.out_dim)
    doy = torch.tensor([[10, 60, 120, 200, 300]])
    fused = model.fuse(f_hr["stages"][-1][:1], last_s2.unsqueeze(0), doy, None, None)
    assert fused.shape == (1, 2, 2, model.fusion_dim) and torch.isfinite(fused).all()
    (fused.square().mean() + f_s2["aux_loss"] + f_hr["aux_loss"]).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.forward_features(s2, "s2")
    for name, st in model.moe_stats().items():  # 5 dates x (16 tokens + 4 prompts)
        assert sum(st["expert_counts"]) == st["tokens"] == 5 * 20, name
        assert st["dropped"] == sum(max(0, c - st["capacity"]) for c in st["expert_counts"]), name
