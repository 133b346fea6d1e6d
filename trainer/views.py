"""Geo-aligned multi-crop views: random ground boxes, exact per-modality resampling, per-modality augmentations.

A view follows `trainer/geometry.py`: pixels = rot90(flip(resize(crop(box))), k) with `box` in ground coordinates
(normalised to the set's extent). The crop is cut from every modality at its own resolution by one separable
resampling matrix per axis (`resample_weights`), so a ground point lands at the same relative place in the HR, S2
and S1 crops, sub-pixel offsets included. Flips and quarter turns are then applied alike to every modality;
photometric operations differ per modality (optical colour ops on HR, band gains on S2, speckle on S1).

Why on the CPU, per sample, in the DataLoader workers (and not batched on the GPU, kornia-style):
- the crop has to happen at read time anyway (only the box's chunks are read), and resampling each modality from
  its native pixels is the only way to keep sub-pixel geo-alignment; a GPU pipeline would have to ship whole sets
  (an HR image is 2048^2 at paper scale) to the device first;
- every random draw is seeded by the stream position, per view, so a sample is cut identically on any world size
  and after a resume; batched GPU randomness would depend on batch layout and device count;
- the operations are O(pixels) and cheap next to the model's step, and workers overlap them with it;
- kornia is not installed and torchvision cannot be used on these machines; the dev machines have no GPU.
All arrays here are numpy float32; random draws come from the numpy Generator handed in (no global RNG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

GRAY = np.array([0.2989, 0.587, 0.114], np.float32)  # torchvision's rgb_to_grayscale weights
SOLARIZE_THRESHOLD = 0.5  # PIL / torchvision: pixels >= 128 (of 255) are inverted


# ---------------------------------------------------------------------------------------------------------------
# geometry


def sample_box(rng: np.random.Generator, scale: tuple[float, float], aspect: tuple[float, float],
               attempts: int = 10) -> np.ndarray:
    """A random resized crop box (4,) float32 (y0, x0, y1, x1) in the unit square: area fraction in `scale`,
    width / height log-uniform in `aspect` (torchvision's RandomResizedCrop on a continuous extent)."""
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(attempts):
        area = rng.uniform(*scale)
        ratio = math.exp(rng.uniform(lo, hi))
        h, w = math.sqrt(area / ratio), math.sqrt(area * ratio)
        if h <= 1 and w <= 1:
            y0, x0 = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
            return np.clip(np.array([y0, x0, y0 + h, x0 + w], np.float32), 0, 1)
    return np.array([0, 0, 1, 1], np.float32)  # as torchvision's fallback: the whole (square) extent


def resample_weights(lo: float, hi: float, n_in: int, n_out: int) -> tuple[int, np.ndarray]:
    """Triangle-filter weights resampling source span [lo, hi) (pixel units, pixel i covers [i, i+1]) to n_out
    pixels: returns (first, W) with W (n_out, k) so that out = W @ src[first:first + k].

    Bilinear when upsampling; when downsampling the triangle widens by the scale (antialiasing), as PIL and
    `F.interpolate(antialias=True)` do. Taps outside [0, n_in) are dropped and the rest renormalised (edge clamp).
    """
    scale = (hi - lo) / n_out
    support = max(scale, 1.0)
    centres = lo + (np.arange(n_out) + 0.5) * scale
    first = max(int(math.floor(centres[0] - support - 0.5)) + 1, 0)
    stop = min(int(math.ceil(centres[-1] + support - 0.5)), n_in)
    taps = np.arange(first, stop) + 0.5
    w = np.clip(1 - np.abs(taps[None, :] - centres[:, None]) / support, 0, None)
    w /= w.sum(axis=1, keepdims=True)
    return first, w.astype(np.float32)


@dataclass(slots=True)
class Cut:
    """Where one modality's view pixels come from: rows `y0:y0+wy.shape[1]`, columns `x0:x0+wx.shape[1]`."""

    y0: int
    x0: int
    wy: np.ndarray  # (n, ky)
    wx: np.ndarray  # (n, kx)

    @property
    def span(self) -> tuple[int, int, int, int]:
        return self.y0, self.x0, self.y0 + self.wy.shape[1], self.x0 + self.wx.shape[1]


def plan_cut(box: np.ndarray, size: int, n_out: int) -> Cut:
    """Resampling plan for a ground box (4,) on a size x size image -> an n_out x n_out crop."""
    b = box.astype(np.float64) * size
    y0, wy = resample_weights(b[0], b[2], size, n_out)
    x0, wx = resample_weights(b[1], b[3], size, n_out)
    return Cut(y0, x0, wy, wx)


def _matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # torch, not numpy: DataLoader workers pin torch to one thread, while OpenBLAS under numpy starts its own
    # threads in every worker; on a busy 2-core machine those spin against the trainer (measured 8x slower).
    return torch.matmul(torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(np.ascontiguousarray(b))).numpy()


def resample(src: np.ndarray, cut: Cut, origin: tuple[int, int] = (0, 0), index: np.ndarray | None = None
             ) -> np.ndarray:
    """src (..., H, W) holding image rows/columns from `origin` on -> (..., n, n) float32 crop; `index` picks
    entries of src's first axis (dates) before resampling."""
    ky, kx = cut.wy.shape[1], cut.wx.shape[1]
    y, x = cut.y0 - origin[0], cut.x0 - origin[1]
    lead = (index,) if index is not None else ()
    a = src[(*lead, ..., slice(y, y + ky), slice(x, x + kx))].astype(np.float32, copy=False)
    return _matmul(_matmul(cut.wy, a), cut.wx.T)


def orient(a: np.ndarray, flip_y: bool, flip_x: bool, rot: int) -> np.ndarray:
    """(..., n, n) -> flip rows, flip columns, then `rot` counterclockwise quarter turns (trainer/geometry.py)."""
    if flip_y:
        a = a[..., ::-1, :]
    if flip_x:
        a = a[..., ::-1]
    return np.ascontiguousarray(np.rot90(a, rot, axes=(-2, -1)))


# ---------------------------------------------------------------------------------------------------------------
# optical (HR) photometric ops, on (3, H, W) RGB in [0, 1], torchvision's float semantics


def grayscale(x: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (H, W) luma."""
    return np.tensordot(GRAY, x, axes=1)


def adjust_brightness(x: np.ndarray, f: float) -> np.ndarray:
    return np.clip(x * f, 0, 1)


def adjust_contrast(x: np.ndarray, f: float) -> np.ndarray:
    m = grayscale(x).mean()
    return np.clip(f * x + (1 - f) * m, 0, 1)


def adjust_saturation(x: np.ndarray, f: float) -> np.ndarray:
    return np.clip(f * x + (1 - f) * grayscale(x)[None], 0, 1)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in [0, 1] -> (3, H, W) HSV, hue in [0, 1)."""
    r, g, b = x
    maxc, minc = x.max(axis=0), x.min(axis=0)
    gray = maxc == minc
    cr = maxc - minc
    s = cr / np.where(gray, 1, maxc)
    d = np.where(gray, 1, cr)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = np.where(maxc == r, bc - gc, np.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    h = np.where(gray, 0, (h / 6) % 1.0)
    return np.stack([h, s, maxc]).astype(np.float32)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    """(3, H, W) HSV -> (3, H, W) RGB."""
    h, s, v = x
    i = np.floor(h * 6)
    f = h * 6 - i
    i = i.astype(np.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sextants = np.stack([np.stack(c) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))])
    return np.take_along_axis(sextants, i[None, None], axis=1)[:, 0].astype(np.float32)


def adjust_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """Rotate hue by `shift` (fraction of a turn, torchvision's hue_factor); value and saturation unchanged."""
    hsv = rgb_to_hsv(x)
    hsv[0] = (hsv[0] + shift) % 1.0
    return hsv_to_rgb(hsv)


def blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis, reflect padding (numpy 'reflect', torchvision's blur padding)."""
    r = min(int(math.ceil(3 * sigma)), n - 1)
    d = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (d / sigma) ** 2)
    k /= k.sum()
    cols = np.arange(n)[:, None] + d[None, :]
    cols = np.abs(cols)
    cols = np.where(cols > n - 1, 2 * (n - 1) - cols, cols)
    m = np.zeros((n, n), np.float64)
    np.add.at(m, (np.repeat(np.arange(n), d.size), cols.reshape(-1)), np.tile(k, n))
    return m.astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """(..., H, W) separable Gaussian blur with standard deviation `sigma` pixels."""
    return _matmul(_matmul(blur_matrix(x.shape[-2], sigma), x), blur_matrix(x.shape[-1], sigma).T)


def solarize(x: np.ndarray) -> np.ndarray:
    return np.where(x >= SOLARIZE_THRESHOLD, 1 - x, x).astype(np.float32)


@dataclass(kw_only=True, slots=True)
class OpticalRecipe:
    """HR photometric settings for one kind of view (DINO's pipeline: jitter, grayscale, blur, solarisation)."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


def augment_optical(x: np.ndarray, rng: np.random.Generator, r: OpticalRecipe) -> np.ndarray:
    """(3, H, W) RGB in [0, 1] -> augmented, same shape. Colour jitter in a random order, as torchvision does."""
    draws = rng.random(4)  # one draw per op whether applied or not: the stream layout does not depend on outcomes
    if draws[0] < r.jitter_p:
        ops = (lambda a: adjust_brightness(a, rng.uniform(1 - r.brightness, 1 + r.brightness)),
               lambda a: adjust_contrast(a, rng.uniform(1 - r.contrast, 1 + r.contrast)),
               lambda a: adjust_saturation(a, rng.uniform(1 - r.saturation, 1 + r.saturation)),
               lambda a: adjust_hue(a, rng.uniform(-r.hue, r.hue)))
        for k in rng.permutation(4):
            x = ops[k](x)
    if draws[1] < r.grayscale_p:
        x = np.broadcast_to(grayscale(x), x.shape).copy()
    if draws[2] < r.blur_p:
        x = gaussian_blur(x, rng.uniform(*r.blur_sigma))
    if draws[3] < r.solarize_p:
        x = solarize(x)
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# multispectral (S2) and SAR (S1)


def jitter_bands(x: np.ndarray, rng: np.random.Generator, brightness: float, contrast: float) -> np.ndarray:
    """(T, C, H, W) reflectance -> per-band contrast about the band's view mean, then per-band gain; one draw per
    band for all dates, so the date-to-date changes the temporal fusion learns from stay intact."""
    c = x.shape[1]
    gain = rng.uniform(1 - brightness, 1 + brightness, c).astype(np.float32)[:, None, None]
    con = rng.uniform(1 - contrast, 1 + contrast, c).astype(np.float32)[:, None, None]
    mean = x.mean(axis=(0, 2, 3), keepdims=True)[0]
    return np.maximum((mean + con * (x - mean)) * gain, 0).astype(np.float32)


def speckle(power: np.ndarray, rng: np.random.Generator, looks: float) -> np.ndarray:
    """Linear backscatter power (...) times unit-mean gamma noise of `looks` looks: E[out] = E[power]."""
    return (power * rng.gamma(looks, 1.0 / looks, power.shape)).astype(np.float32)


def db_to_power(db: np.ndarray) -> np.ndarray:
    return np.power(np.float32(10), db / np.float32(10)).astype(np.float32)


def power_to_db(p: np.ndarray) -> np.ndarray:
    return (10 * np.log10(np.maximum(p, 1e-10))).astype(np.float32)  # floor -100 dB: no -inf from a zero pixel


def frames(rng: np.random.Generator, dates: np.ndarray, k: int) -> np.ndarray:
    """(k,) indices into a series with `dates` (n,): k distinct dates when n >= k, else every date once plus
    random repeats; sorted by date (stable, so repeats sit together)."""
    n = len(dates)
    sel = rng.choice(n, size=k, replace=False) if n >= k else np.concatenate([np.arange(n), rng.choice(n, k - n)])
    return sel[np.argsort(np.asarray(dates)[sel], kind="stable")].astype(np.int64)
