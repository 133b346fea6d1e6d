"""Multi-crop views: geo-alignment across modalities, the geometry convention, determinism, photometric ops, dates.

References are independent of trainer/views.py: torch's `F.interpolate(antialias=True)` / `grid_sample`, numpy
crop/flip/rot90, PIL's ImageEnhance and grayscale, Python's colorsys, a direct convolution, and an analytic
ground pattern sampled at `view_to_ground` of each view pixel.
"""

import colorsys
import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch.utils.data import default_collate

from tests.conftest import REPO
from trainer.config import DataConfig, tiny
from trainer.data import PretrainViews, day_of_year, to_device
from trainer.geometry import ground_to_view, view_to_ground
from trainer.views import (
    OpticalRecipe,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment_optical,
    db_to_power,
    frames,
    gaussian_blur,
    hsv_to_rgb,
    jitter_bands,
    orient,
    plan_cut,
    power_to_db,
    resample,
    rgb_to_hsv,
    sample_box,
    speckle,
)

EPOCH_2021 = 18628  # 2021-01-01 in days since 1970-01-01


def geometry_only(**kw) -> DataConfig:
    return dataclasses.replace(tiny().data, photometric=False, **kw)


def pixel_centres(n: int) -> torch.Tensor:
    """(n, n, 2) view coordinates (u, v) of an n x n view's pixel centres."""
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.stack(torch.meshgrid(t, t, indexing="ij"), dim=-1)


def view_ground(view: dict, n: int) -> torch.Tensor:
    """(n, n, 2) ground (y, x) of each pixel centre of a view, from its recorded geometry."""
    return view_to_ground(pixel_centres(n), torch.as_tensor(view["box"], dtype=torch.float64), bool(view["flip_y"]),
                          bool(view["flip_x"]), int(view["rot"]))


def sample_at(img: np.ndarray, ground: torch.Tensor) -> np.ndarray:
    """Bilinear samples of img (C, H, W) at ground points (..., 2) in [0, 1]^2 -> (C, ...), edges clamped."""
    grid = (2 * ground.flip(-1) - 1).reshape(1, -1, 1, 2).float()  # grid_sample wants (x, y) in [-1, 1]
    out = F.grid_sample(torch.from_numpy(np.ascontiguousarray(img, np.float32))[None], grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out[0, :, :, 0].reshape(img.shape[0], *ground.shape[:-1]).numpy()


# ---------------------------------------------------------------------------------------------------------------
# A DatasetReader stand-in: every modality samples one smooth ground pattern at its own pixel centres.


def pattern(y: np.ndarray, x: np.ndarray, c: int) -> np.ndarray:
    """Smooth, asymmetric (flips and turns change it) pattern in [-1.5, 1.5] over ground (y, x)."""
    return np.sin(2 * np.pi * (0.7 * y + 0.4 * x) + c) + 0.5 * np.cos(2 * np.pi * (0.3 * y - 0.9 * x) + 2 * c)


def hr_of(f):
    return 128 + 80 * f


def s2_of(f):
    return 2000 + 1000 * f


def s1_of(f):
    return -12 + 3 * f


class PatternReader:
    def __init__(self, n_sets=6, hr_size=128, s2_size=32, n_s2=6, n_s1=3, has_hr=True):
        self.hr_size, self.s2_size, self.n, self.has_hr = hr_size, s2_size, n_sets, has_hr
        self.n_dates = {"s2": n_s2, "s1": n_s1}
        self.stats = {m: {"mean": [0.0] * c, "std": [1.0] * c} for m, c in (("s2", 10), ("s1", 2))}
        if has_hr:
            self.stats["hr"] = {"mean": [0.0] * 3, "std": [1.0] * 3}

    def __len__(self):
        return self.n

    def meta(self, i):
        return {"label": i % 3, "has_hr": self.has_hr,
                "s2_dates": EPOCH_2021 + 10 + 50 * np.arange(self.n_dates["s2"], dtype=np.int32),
                "s1_dates": EPOCH_2021 + 5 + 90 * np.arange(self.n_dates["s1"], dtype=np.int32)}

    def image(self, modality):
        size = self.hr_size if modality == "hr" else self.s2_size
        t = (np.arange(size) + 0.5) / size
        y, x = np.meshgrid(t, t, indexing="ij")
        if modality == "hr":
            return np.rint(hr_of(np.stack([pattern(y, x, c) for c in range(3)]))).astype(np.uint8)
        if modality == "s2":
            return np.rint(s2_of(np.stack([pattern(y, x, b % 3) for b in range(10)]))).astype(np.uint16)
        return s1_of(np.stack([pattern(y, x, b) for b in range(2)])).astype(np.float32)

    def read(self, i, modality, box=None, frames=None):
        y0, x0, y1, x1 = box
        img = self.image(modality)[..., y0:y1, x0:x1]
        if modality == "hr":
            return img
        return np.stack([img] * len(frames))


# ---------------------------------------------------------------------------------------------------------------
# resampling and the geometry convention


@pytest.mark.parametrize("n_out", [16, 23, 50, 64, 101])
def test_full_box_resample_matches_torch_antialiased_interpolate(n_out):
    img = np.random.default_rng(0).random((3, 50, 50)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(img)[None], size=(n_out, n_out), mode="bilinear", antialias=True,
                        align_corners=False)[0].numpy()
    out = resample(img, plan_cut(np.array([0, 0, 1, 1], np.float32), 50, n_out))
    np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("flip_y, flip_x, rot", [(False, False, 0), (True, False, 1), (False, True, 2),
                                                 (True, True, 3), (True, False, 0)])
def test_pixel_aligned_native_scale_view_is_numpy_crop_flip_rot(skeleton_dataset, flip_y, flip_x, rot):
    from dataprep.reader import DatasetReader

    r = DatasetReader(skeleton_dataset)
    i = next(j for j in range(len(r)) if r.meta(j)["has_hr"])
    img = r.read(i, "hr")
    y0, x0, side = 40, 72, 64
    box = np.array([y0, x0, y0 + side, x0 + side], np.float32) / r.hr_size
    cut = plan_cut(box, r.hr_size, side)
    view = orient(resample(img, cut), flip_y, flip_x, rot)
    ref = img[:, y0 : y0 + side, x0 : x0 + side]
    ref = ref[:, ::-1] if flip_y else ref
    ref = ref[:, :, ::-1] if flip_x else ref
    np.testing.assert_array_equal(view, np.rot90(ref, rot, axes=(1, 2)).astype(np.float32))


def test_upsampled_views_equal_the_source_sampled_at_view_to_ground(skeleton_dataset):
    """Boxes smaller than the view: the resample is bilinear, so each modality's view pixel is exactly the source
    bilinearly sampled at `view_to_ground` of the pixel centre (grid_sample, an independent implementation)."""
    cfg = geometry_only(global_scale=(0.02, 0.04), local_crops=0)  # sides < 0.232: up-sampled
    ds = PretrainViews(str(skeleton_dataset), cfg)
    checked = set()
    for p in range(6):
        s = ds[p]
        i = s["index"]
        for v in s["views"]:
            if v["has_hr"]:
                mean, std = (np.asarray(ds.reader.stats["hr"][k], np.float32)[:, None, None] for k in ("mean", "std"))
                ref = sample_at(ds.reader.read(i, "hr").astype(np.float32), view_ground(v, cfg.hr_crop))
                np.testing.assert_allclose(v["hr"], (ref - mean) / (std + 1e-6), atol=2e-4)
                checked.add("hr")
            for m in ("s2", "s1"):
                if not v[f"has_{m}"]:
                    continue
                dates = ds.reader.meta(i)[f"{m}_dates"]
                idx = [int(np.flatnonzero(day_of_year(dates) == d)[0]) for d in v[f"{m}_doy"]]
                src = ds.reader.read(i, m, frames=idx).astype(np.float32)
                g = view_ground(v, v[m].shape[-1])
                if m == "s1":  # averaged as power, then back to dB
                    ref = np.stack([power_to_db(sample_at(db_to_power(a), g)) for a in src])
                else:
                    ref = np.stack([sample_at(a, g) for a in src])
                st = ds.reader.stats[m]
                ref = (ref - np.asarray(st["mean"])[:, None, None]) / (np.asarray(st["std"])[:, None, None] + 1e-6)
                np.testing.assert_allclose(v[m], ref, atol=2e-3)
                checked.add(m)
    assert checked == {"hr", "s2", "s1"}


def test_every_modality_shows_the_ground_pattern_at_view_to_ground():
    """Random boxes, flips and turns (down- and upsampled): HR, S2 and S1 view pixels all equal the one ground
    pattern evaluated at `view_to_ground` of their pixel centres, so a ground point sits at the same relative place
    in every modality's crop."""
    cfg = geometry_only(local_crops=4)
    ds = PretrainViews("", cfg, reader=PatternReader())
    rots, flips = set(), set()
    for p in range(8):
        s = ds[p]
        for v in s["views"] + s["local_views"]:
            rots.add(int(v["rot"]))
            flips.add((bool(v["flip_y"]), bool(v["flip_x"])))
            g = view_ground(v, v["hr"].shape[-1]).numpy()
            want = np.stack([pattern(g[..., 0], g[..., 1], c) for c in range(3)])
            np.testing.assert_allclose((v["hr"] - 128) / 80, want, atol=0.05)  # uint8 rounding + antialiasing
            g = view_ground(v, v["s2"].shape[-1]).numpy()
            want = np.stack([pattern(g[..., 0], g[..., 1], b % 3) for b in range(10)])
            np.testing.assert_allclose((v["s2"] - 2000) / 1000, np.broadcast_to(want, v["s2"].shape), atol=0.05)
            want = np.stack([pattern(g[..., 0], g[..., 1], b) for b in range(2)])
            np.testing.assert_allclose((v["s1"] + 12) / 3, np.broadcast_to(want, v["s1"].shape), atol=0.1)
    assert rots == {0, 1, 2, 3} and len(flips) == 4  # every orientation was exercised


def test_a_ground_point_has_the_same_value_in_the_hr_and_the_s2_view():
    ds = PretrainViews("", geometry_only(), reader=PatternReader())
    rng = np.random.default_rng(0)
    for p in range(6):
        v = ds[p]["views"][p % 2]
        box = v["box"].astype(np.float64)
        pts = torch.from_numpy(box[:2] + rng.uniform(0.1, 0.9, (50, 2)) * (box[2:] - box[:2]))
        uv = ground_to_view(pts, torch.from_numpy(box), bool(v["flip_y"]), bool(v["flip_x"]), int(v["rot"]))
        hr = (sample_at(v["hr"], uv) - 128) / 80  # sample_at treats (u, v) like ground coordinates of the view
        s2 = (sample_at(v["s2"][0, :3], uv) - 2000) / 1000
        np.testing.assert_allclose(hr, s2, atol=0.06)


def test_boxes_follow_the_scale_and_aspect_ranges():
    rng = np.random.default_rng(0)
    boxes = np.stack([sample_box(rng, (0.05, 0.32), (3 / 4, 4 / 3)) for _ in range(2000)])
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes >= 0).all() and (boxes <= 1).all()
    assert np.all((h * w > 0.05 - 1e-5) & (h * w < 0.32 + 1e-5))
    assert np.all((w / h > 3 / 4 - 1e-4) & (w / h < 4 / 3 + 1e-4))
    assert (h * w).min() < 0.07 and (h * w).max() > 0.30  # the whole range is used
    big = np.stack([sample_box(rng, (0.32, 1.0), (3 / 4, 4 / 3)) for _ in range(500)])
    assert ((big[:, 2:] - big[:, :2]) <= 1).all()


# ---------------------------------------------------------------------------------------------------------------
# the dataset: shapes, determinism, dates, missing modalities


def test_views_shapes_and_collate(skeleton_dataset):
    cfg = tiny().data
    ds = PretrainViews(str(skeleton_dataset), cfg)
    s = ds[3]
    assert len(s["views"]) == 2 and len(s["local_views"]) == cfg.local_crops
    g, loc = s["views"][0], s["local_views"][0]
    assert g["hr"].shape == (3, 64, 64) and g["s2"].shape == (4, 10, 16, 16) and g["s1"].shape == (2, 2, 16, 16)
    assert loc["hr"].shape == (3, 32, 32) and loc["s2"].shape == (4, 10, 8, 8) and loc["s1"].shape == (2, 2, 8, 8)
    assert g["box"].dtype == np.float32 and g["box"].shape == (4,) and g["rot"].dtype == np.int64
    b = default_collate([ds[p] for p in range(4)])
    assert b["views"][1]["hr"].shape == (4, 3, 64, 64) and b["local_views"][3]["s1"].shape == (4, 2, 2, 8, 8)
    assert b["views"][0]["box"].shape == (4, 4) and b["views"][0]["flip_y"].dtype == torch.bool
    assert b["views"][0]["rot"].dtype == torch.int64
    moved = to_device(b, torch.device("cpu"), torch.bfloat16)
    assert moved["views"][0]["hr"].dtype == torch.bfloat16 and moved["local_views"][0]["s2"].dtype == torch.bfloat16
    assert moved["views"][0]["box"].dtype == torch.float32 and moved["local_views"][2]["box"].dtype == torch.float32
    torch.testing.assert_close(moved["views"][1]["box"], b["views"][1]["box"], rtol=0, atol=0)
    two = default_collate([PretrainViews(str(skeleton_dataset), dataclasses.replace(cfg, local_crops=0))[0]])
    assert two["local_views"] == []


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                _assert_same(x, y)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_views_are_a_function_of_the_position_only(skeleton_dataset):
    cfg = tiny().data
    ds = PretrainViews(str(skeleton_dataset), cfg)
    first = ds[5]
    _ = ds[9]  # reading other positions in between changes nothing
    _assert_same(first, ds[5])
    _assert_same(first, PretrainViews(str(skeleton_dataset), cfg)[5])
    other = ds[6]
    assert not np.array_equal(first["views"][0]["box"], other["views"][0]["box"])
    a, b = first["views"]
    assert not np.array_equal(a["box"], b["box"]) and not np.array_equal(a["hr"], b["hr"])
    # Photometric ops drawn from their own stream: switching them off keeps every box, flip, turn and date.
    plain = PretrainViews(str(skeleton_dataset), dataclasses.replace(cfg, photometric=False))[5]
    for v, w in zip(first["views"] + first["local_views"], plain["views"] + plain["local_views"]):
        for k in ("box", "flip_y", "flip_x", "rot", "s2_doy", "s1_doy"):
            np.testing.assert_array_equal(v[k], w[k])
        assert not np.array_equal(v["hr"], w["hr"]) or not np.array_equal(v["s2"], w["s2"])
    # More local crops leave the global views and the first local views as they were.
    more = PretrainViews(str(skeleton_dataset), dataclasses.replace(cfg, local_crops=6))[5]
    _assert_same({"v": first["views"] + first["local_views"]}, {"v": more["views"] + more["local_views"][:4]})


@pytest.mark.parametrize("k2, k1", [(4, 2), (12, 8)])
def test_date_subsets_sorted_in_range_and_distinct_when_possible(skeleton_dataset, k2, k1):
    ds = PretrainViews(str(skeleton_dataset), dataclasses.replace(tiny().data, s2_frames=k2, s1_frames=k1))
    for p in range(8):
        s = ds[p]
        meta = ds.reader.meta(s["index"])
        for v in s["views"] + s["local_views"]:
            for m, k in (("s2", k2), ("s1", k1)):
                if not v[f"has_{m}"]:
                    continue
                have = day_of_year(meta[f"{m}_dates"])  # the sample's dates fall within one year
                doy = v[f"{m}_doy"]
                assert len(doy) == k and np.all(np.diff(doy) >= 0) and set(doy) <= set(have)
                if len(have) >= k:
                    assert len(set(doy)) == k  # without replacement
                else:
                    assert set(doy) == set(have)  # every date, then repeats


def test_frames_helper_sorts_by_date_not_index():
    dates = np.array([50, 10, 40, 20, 30])
    rng = np.random.default_rng(1)
    for _ in range(20):
        sel = frames(rng, dates, 3)
        assert len(set(sel)) == 3 and np.all(np.diff(dates[sel]) > 0)


@pytest.fixture(scope="module")
def missing_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("missing")
    py = sys.executable
    subprocess.run([py, "-m", "dataprep", "sample", "--out", str(root / "raw"), "--sets", "9", "--seed", "2",
                    "--hr-size", "128", "--s2-size", "32", "--missing-rate", "1.0"],
                   check=True, cwd=REPO, capture_output=True)
    subprocess.run([py, "-m", "dataprep", "convert", "--manifest", str(root / "raw" / "manifest.jsonl"), "--out",
                    str(root / "data"), "--shard-size", "9", "--hr-size", "128", "--s2-size", "32"],
                   check=True, cwd=REPO, capture_output=True)
    return root / "data"


def test_sets_missing_a_modality_get_zeros_and_flags(missing_dataset):
    ds = PretrainViews(str(missing_dataset), tiny().data)
    seen = set()
    for p in range(len(ds)):
        s = ds[p]
        meta = ds.reader.meta(s["index"])
        present = {"hr": meta["has_hr"], "s2": len(meta["s2_dates"]) > 0, "s1": len(meta["s1_dates"]) > 0}
        seen |= {m for m, ok in present.items() if not ok}
        for v in s["views"] + s["local_views"]:
            for m, ok in present.items():
                assert v[f"has_{m}"] == ok
                assert np.isfinite(v[m]).all() and (v[m].any() if ok else not v[m].any())
    assert seen == {"hr", "s2", "s1"}  # every kind of gap was exercised


@pytest.mark.parametrize("kind", ["hr_only", "no_hr"])
def test_hr_only_and_no_hr_datasets(kind):
    reader = PatternReader(n_s2=0, n_s1=0) if kind == "hr_only" else PatternReader(has_hr=False)
    ds = PretrainViews("", tiny().data, reader=reader)
    s = ds[0]
    for v in s["views"] + s["local_views"]:
        assert v["has_hr"] == (kind == "hr_only") and v["has_s2"] == v["has_s1"] == (kind == "no_hr")
        assert v["hr"].any() == v["has_hr"] and v["s2"].any() == v["has_s2"]
        assert v["s2"].shape[0] == 4 and v["s1_doy"].shape == (2,)


def test_crop_sizes_are_checked():
    with pytest.raises(ValueError, match="local_crop"):
        PretrainViews("", dataclasses.replace(tiny().data, local_crop=48), reader=PatternReader())
    with pytest.raises(ValueError, match="pixel ratio"):  # ratio 128 / 4 = 32 is fine, 128 / 2 = 64 is not
        PretrainViews("", tiny().data, reader=PatternReader(s2_size=2))


# ---------------------------------------------------------------------------------------------------------------
# photometric ops


def rgb_image(seed=0, n=24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, n, n)).astype(np.uint8)


def to_pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(x.transpose(1, 2, 0)))


def from_pil(im: Image.Image) -> np.ndarray:
    return np.asarray(im, np.float32).transpose(2, 0, 1) / 255


@pytest.mark.parametrize("f", [0.6, 1.3])
def test_colour_jitter_matches_pil_enhance(f):
    img = rgb_image()
    x = img.astype(np.float32) / 255
    tol = 2.01 / 255  # PIL rounds to uint8 (and its contrast pivot to an integer grey)
    np.testing.assert_allclose(adjust_brightness(x, f), from_pil(ImageEnhance.Brightness(to_pil(img)).enhance(f)),
                               atol=tol)
    np.testing.assert_allclose(adjust_contrast(x, f), from_pil(ImageEnhance.Contrast(to_pil(img)).enhance(f)),
                               atol=tol)
    np.testing.assert_allclose(adjust_saturation(x, f), from_pil(ImageEnhance.Color(to_pil(img)).enhance(f)),
                               atol=tol)


def test_hue_shift_matches_colorsys_and_keeps_value():
    x = rgb_image(1, 12).astype(np.float32) / 255
    x[:, 0, :3] = 0.4  # grey pixels: hue undefined, must stay grey
    for shift in (0.0, 0.07, -0.1, 0.5):
        out = adjust_hue(x, shift)
        ref = np.empty_like(x)
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                h, s, v = colorsys.rgb_to_hsv(*x[:, i, j])
                ref[:, i, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        np.testing.assert_allclose(out.max(axis=0), x.max(axis=0), atol=1e-6)  # value preserved
    np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-6)
    red = np.zeros((3, 1, 1), np.float32)
    red[0] = 1
    np.testing.assert_allclose(adjust_hue(red, 1 / 3)[:, 0, 0], [0, 1, 0], atol=1e-6)


def test_grayscale_solarize_and_blur_through_the_pipeline():
    img = rgb_image(2)
    x = img.astype(np.float32) / 255
    off = dict(jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    gray = augment_optical(x, np.random.default_rng(0), OpticalRecipe(**{**off, "grayscale_p": 1.0}))
    assert np.array_equal(gray[0], gray[1]) and np.array_equal(gray[1], gray[2])
    np.testing.assert_allclose(gray[0], np.asarray(to_pil(img).convert("L"), np.float32) / 255, atol=1.01 / 255)
    sol = augment_optical(x, np.random.default_rng(0), OpticalRecipe(**{**off, "solarize_p": 1.0}))
    hi = x >= 0.5
    np.testing.assert_allclose(sol[hi], 1 - x[hi], atol=1e-6)
    np.testing.assert_array_equal(sol[~hi], x[~hi])
    same = augment_optical(x, np.random.default_rng(0), OpticalRecipe(**off))
    np.testing.assert_array_equal(same, x)
    # Gaussian blur against a direct 2-D convolution with numpy's reflect padding.
    sigma = 1.3
    r = int(np.ceil(3 * sigma))
    d = np.arange(-r, r + 1)
    k1 = np.exp(-0.5 * (d / sigma) ** 2)
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    pad = np.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")
    n = x.shape[-1]
    ref = np.zeros_like(x)
    for a in range(2 * r + 1):
        for b in range(2 * r + 1):
            ref += k2[a, b] * pad[:, a : a + n, b : b + n]
    np.testing.assert_allclose(gaussian_blur(x, sigma), ref, atol=1e-5)


def test_view_kinds_get_dinos_blur_and_solarisation_probabilities(skeleton_dataset):
    """DINO's asymmetry: global view 1 always blurred, global view 2 the only one solarised."""
    cfg = dataclasses.replace(tiny().data, hr_jitter_p=0.0, hr_grayscale_p=0.0, hr_blur_p=(1.0, 0.0, 0.0),
                              hr_solarize_p=1.0)
    aug = PretrainViews(str(skeleton_dataset), cfg)
    plain = PretrainViews(str(skeleton_dataset), dataclasses.replace(cfg, photometric=False))
    a, b = aug[1], plain[1]
    if not a["views"][0]["has_hr"]:
        a, b = aug[2], plain[2]
    mean, std = (np.asarray(aug.reader.stats["hr"][k], np.float32)[:, None, None] for k in ("mean", "std"))
    raw = [(v["hr"] * (std + 1e-6) + mean) / 255 for v in (a["views"] + a["local_views"])]
    ref = [(v["hr"] * (std + 1e-6) + mean) / 255 for v in (b["views"] + b["local_views"])]
    assert not np.allclose(raw[0], ref[0], atol=1e-3)  # blurred
    np.testing.assert_allclose(raw[1], np.where(ref[1] >= 0.5, 1 - ref[1], ref[1]), atol=1e-4)  # solarised only
    for x, y in zip(raw[2:], ref[2:]):
        np.testing.assert_allclose(x, y, atol=1e-4)  # locals untouched


def test_s2_band_jitter_is_one_draw_per_view_for_all_dates():
    rng = np.random.default_rng(0)
    x = rng.uniform(100, 3000, (5, 10, 8, 8)).astype(np.float32)
    out = jitter_bands(x, np.random.default_rng(1), brightness=0.2, contrast=0.0)
    gain = out / x  # pure per-band gain with contrast off
    np.testing.assert_allclose(gain, np.broadcast_to(gain[:1, :, :1, :1], gain.shape), rtol=1e-5)
    assert np.all((gain > 0.8 - 1e-6) & (gain < 1.2 + 1e-6)) and np.unique(gain[0, :, 0, 0].round(6)).size == 10
    x = rng.uniform(1000, 2000, (5, 10, 8, 8)).astype(np.float32)  # no clamping at 0 in this range
    out = jitter_bands(x, np.random.default_rng(1), brightness=0.0, contrast=0.2)
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), x.mean(axis=(0, 2, 3)), rtol=1e-5)  # pivot: the band mean
    spread = (out - out.mean(axis=(0, 2, 3), keepdims=True)) / (x - x.mean(axis=(0, 2, 3), keepdims=True))
    np.testing.assert_allclose(spread, np.broadcast_to(spread[:1, :, :1, :1], spread.shape), rtol=1e-2)


def test_s1_speckle_keeps_mean_power_and_is_multiplicative():
    db = np.full((2, 2, 64, 64), -12.0, np.float32)
    db[:, 1] = -18.0
    p = db_to_power(db)
    rng = np.random.default_rng(0)
    draws = np.stack([speckle(p, rng, looks=4.0) for _ in range(50)])
    np.testing.assert_allclose(draws.mean(axis=(0, 1, 3, 4)) / p[0, :, 0, 0], 1.0, atol=0.01)
    ratio = draws / p
    assert abs(ratio.var() - 1 / 4) < 0.01  # gamma of 4 looks: unit mean, variance 1 / looks
    back = power_to_db(draws)
    assert back.mean() < db.mean()  # in dB the speckle term is additive with a negative mean (log of a gamma)
    np.testing.assert_allclose(power_to_db(p), db, atol=1e-4)
