"""`python -m dataprep sample`: synthetic co-registered image sets with structure worth learning.

Each set has a land-cover class map shared by all modalities (smooth random field, the set's label class
dominant), class spectra for S2 with a seasonal vegetation cycle, class backscatter for S1 with multiplicative
gamma speckle, class colours and textures for HR, and the class map as an OSM-like label raster.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import numpy as np

CLASSES = ("water", "forest", "cropland", "grassland", "urban", "bare")
# S2 reflectance x 1e4 in band order B2,B3,B4,B5,B6,B7,B8,B8A,B11,B12 (rough textbook spectra)
S2_SPECTRA = np.array([
    [600, 500, 350, 300, 250, 200, 150, 150, 100, 80],
    [300, 500, 300, 700, 1800, 2200, 2500, 2600, 1300, 600],
    [400, 700, 500, 900, 2000, 2600, 3000, 3100, 2000, 1100],
    [450, 750, 650, 1000, 1800, 2200, 2500, 2600, 2200, 1400],
    [1000, 1100, 1200, 1300, 1400, 1500, 1600, 1650, 1900, 1700],
    [1200, 1400, 1700, 1900, 2100, 2200, 2300, 2400, 3000, 2600],
], dtype=np.float64)  # fmt: skip
SEASONAL = np.array([0.0, 0.25, 0.9, 0.5, 0.0, 0.0])  # amplitude of the vegetation cycle per class
S1_DB = np.array([[-20, -26], [-8, -14], [-10, -16], [-11, -17], [-2, -8], [-13, -20]], dtype=np.float64)
RGB = np.array([[30, 60, 90], [30, 70, 35], [150, 160, 80], [110, 150, 70], [150, 140, 135], [180, 160, 120]],
               dtype=np.float64)  # fmt: skip
REGIONS = ((10.0, 48.0), (-95.0, 38.0), (115.0, 32.0), (20.0, 0.0))  # lon, lat centres
YEAR0 = _dt.date(2021, 1, 1)


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights (smooth upsampling of a coarse random field)."""
    pos = (np.arange(n_out) + 0.5) / n_out * n_in - 0.5
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.clip(lo + 1, 0, n_in - 1)
    w = np.clip(pos - lo, 0, 1)
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] += 1 - w
    m[np.arange(n_out), hi] += w
    return m


def class_map(rng: np.random.Generator, label: int, size: int, coarse: int = 6) -> np.ndarray:
    """(size, size) uint8 land-cover map, class `label` dominant."""
    z = rng.normal(size=(len(CLASSES), coarse, coarse))
    z[label] += 1.2
    m = _interp_matrix(size, coarse)
    scores = np.einsum("ij,cjk,lk->cil", m, z, m)
    return scores.argmax(0).astype(np.uint8)


def _season(doy: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.sin(2 * np.pi * (doy - 100) / 365.0)


def make_set(rng: np.random.Generator, label: int, hr_size: int, s2_size: int, n_s2: int, n_s1: int) -> dict:
    """Arrays of one synthetic set: hr (3,H,H) uint8, osm (H,H), s2 (T,10,h,h) uint16, s1 (T,2,h,h) float32."""
    cmap = class_map(rng, label, hr_size)
    f = hr_size // s2_size
    low = cmap[f // 2 :: f, f // 2 :: f][:s2_size, :s2_size]  # co-registered: the same ground at 1/f resolution
    # HR: class colour + per-class texture + noise
    yy, xx = np.mgrid[0:hr_size, 0:hr_size]
    tex = np.zeros((hr_size, hr_size))
    tex[cmap == 2] = 25 * np.sign(np.sin(xx[cmap == 2] * 0.8))  # crop rows
    tex[cmap == 4] = 30 * (((yy[cmap == 4] // 6) % 3 == 0) | ((xx[cmap == 4] // 6) % 3 == 0))  # streets
    hr = RGB[cmap].transpose(2, 0, 1) + tex[None] + rng.normal(0, 8, (3, hr_size, hr_size))
    hr = np.clip(hr, 0, 255).astype(np.uint8)
    s2_days = np.sort(rng.choice(365, size=n_s2, replace=False))
    s1_days = np.sort(rng.choice(365, size=n_s1, replace=False))
    base = S2_SPECTRA[low].transpose(2, 0, 1)  # (10, h, w)
    amp = SEASONAL[low]
    s2 = []
    for d in s2_days:
        v = (_season(d) - 0.5) * amp  # vegetation up in summer, down in winter
        fr = base.copy()
        fr[3:8] *= 1 + 0.8 * v
        fr[:3] *= 1 - 0.4 * v
        fr *= rng.uniform(0.9, 1.1)  # illumination / atmosphere
        fr += rng.normal(0, 40, fr.shape)
        s2.append(np.clip(np.rint(fr), 0, 65535).astype(np.uint16))
    s1 = []
    for d in s1_days:
        db = S1_DB[low].transpose(2, 0, 1).copy()
        db += 2.0 * ((_season(d) - 0.5) * SEASONAL[low])[None]
        speckle = rng.gamma(4.0, 0.25, db.shape)  # 4-look intensity speckle, mean 1
        s1.append((db + 10 * np.log10(speckle)).astype(np.float32))
    return {"hr": hr, "osm": cmap, "s2": s2, "s1": s1, "s2_days": s2_days, "s1_days": s1_days}


def _iso(day: int) -> str:
    return (YEAR0 + _dt.timedelta(days=int(day))).isoformat()


def write_sample(out: str | os.PathLike, n_sets: int, seed: int = 0, hr_size: int = 256, s2_size: int = 64,
                 missing_rate: float = 0.1) -> Path:  # fmt: skip
    """Write n_sets synthetic sets and OUT/manifest.jsonl (relative paths); deterministic in seed."""
    from PIL import Image

    if hr_size % s2_size:
        raise ValueError(f"hr_size {hr_size} must be a multiple of s2_size {s2_size}")
    out = Path(out)
    for d in ("hr", "osm", "s2", "s1"):
        (out / d).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_sets):
        rng = np.random.default_rng([seed, i])
        label = int(rng.integers(len(CLASSES)))
        n_s2, n_s1 = int(rng.integers(6, 11)), int(rng.integers(3, 7))
        s = make_set(rng, label, hr_size, s2_size, n_s2, n_s1)
        lon0, lat0 = REGIONS[int(rng.integers(len(REGIONS)))]
        sid = f"syn{seed:03d}-{i:06d}"
        row = {"id": sid, "lon": round(lon0 + rng.uniform(-3, 3), 6), "lat": round(lat0 + rng.uniform(-3, 3), 6),
               "label": label, "class_name": CLASSES[label]}  # fmt: skip
        drop = str(rng.choice(["hr", "s2", "s1"])) if rng.random() < missing_rate else None
        if drop != "hr":
            Image.fromarray(s["hr"].transpose(1, 2, 0)).save(out / "hr" / f"{sid}.png")
            row["hr"] = f"hr/{sid}.png"
        Image.fromarray(s["osm"]).save(out / "osm" / f"{sid}.png")
        row["osm"] = f"osm/{sid}.png"
        for m in ("s2", "s1"):
            if drop == m:
                row[m] = None
                continue
            frames = []
            for t, (a, day) in enumerate(zip(s[m], s[f"{m}_days"])):
                np.save(out / m / f"{sid}_{t:02d}.npy", a)
                frames.append({"path": f"{m}/{sid}_{t:02d}.npy", "date": _iso(day)})
            row[m] = frames
        lines.append(json.dumps(row))
    man = out / "manifest.jsonl"
    man.write_text("\n".join(lines) + "\n")
    (out / "classes.json").write_text(json.dumps(list(CLASSES)))
    return man
