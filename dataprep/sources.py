"""Readers of raw files (GeoTIFF via rasterio, PNG/JPEG via Pillow, .npy/.npz via numpy, per-band folders)
and the checks that turn them into the stored dtypes and band orders. Every failure raises `Reject`."""

from __future__ import annotations

import glob
import os
import re
import warnings

import numpy as np

from .errors import Reject
from .manifest import FrameSpec
from .schema import DEFAULT_LAYOUT_BY_COUNT, S1_BANDS, S2_BANDS, S2_LAYOUTS, normalise_band_name

_TIF = (".tif", ".tiff")
_IMG = (".png", ".jpg", ".jpeg")


def _read_tif(path: str) -> np.ndarray:
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NotGeoreferencedWarning on plain tifs is not our problem
            with rasterio.open(path) as f:
                return f.read()
    except (RasterioError, OSError, ValueError) as e:
        raise Reject("corrupt_file", f"{path}: unreadable GeoTIFF: {e}", path) from None


def _read_img(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decodes now, so a truncated file fails here
            a = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise Reject("corrupt_file", f"{path}: unreadable image: {e}", path) from None
    return a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0)


_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (False|True), 'shape': \(([\d, ]*)\), \}"
)


def _fast_npy(path: str) -> np.ndarray | None:
    """Plain C-order .npy (what np.save writes) without numpy's literal_eval header parse, which cost more CPU
    than reading the data for 80 KB frames. None = not the simple case; np.load decides."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return None
    start = 10 if data[6] == 1 else 12
    hl = int.from_bytes(data[8:start], "little")
    m = _NPY_HEADER.match(data[start : start + hl])
    if m is None or m.group(2) == b"True":
        return None
    shape = tuple(int(x) for x in m.group(3).split(b",") if x.strip())
    dt = np.dtype(m.group(1).decode())
    body = data[start + hl :]
    if len(body) != dt.itemsize * int(np.prod(shape)):
        raise ValueError(f"truncated: {len(body)} data bytes for shape {shape} {dt}")
    return np.frombuffer(body, dtype=dt).reshape(shape)


def _read_npy(path: str, key: str | None = None) -> np.ndarray:
    try:
        if path.lower().endswith(".npy"):
            a = _fast_npy(path)
            if a is not None:
                return a
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                names = list(z.keys())
                if not names:
                    raise ValueError("empty .npz")
                return np.asarray(z[key if key in names else names[0]])
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise Reject("corrupt_file", f"{path}: unreadable array file: {e}", path) from None


def read_array(path: str, index: int | None = None, band_counts: tuple[int, ...] = ()) -> np.ndarray:
    """Any supported file -> (C, H, W) array in its own dtype.

    .npy/.npz arrays may be (H, W), (C, H, W), (H, W, C) (guessed from band_counts) or, with `index`, (T, ...).
    """
    if not os.path.exists(path):
        raise Reject("missing_file", f"{path}: file not found", path)
    low = path.lower()
    if low.endswith(_TIF):
        a = _read_tif(path)
    elif low.endswith(_IMG):
        a = _read_img(path)
    elif low.endswith((".npy", ".npz")):
        a = _read_npy(path)
        if index is not None:
            if a.ndim != 4 or not (0 <= index < a.shape[0]):
                raise Reject("wrong_size", f"{path}: time index {index} does not fit array of shape {a.shape}", path)
            a = a[index]
        if a.ndim == 2:
            a = a[None]
        elif a.ndim == 3 and a.shape[0] not in band_counts and a.shape[-1] in band_counts:
            a = np.moveaxis(a, -1, 0)  # channels-last (eo-learn style)
        elif a.ndim != 3:
            raise Reject("wrong_band_count", f"{path}: expected a (C, H, W) array, got shape {a.shape}", path)
    else:
        raise Reject("corrupt_file", f"{path}: unsupported file type", path)
    return np.ascontiguousarray(a)


def _fit(a: np.ndarray, size: int, crop: bool, path: str, what: str) -> np.ndarray:
    """Centre-crop (when allowed) or reject an array (C, H, W) whose H, W differ from size."""
    h, w = a.shape[-2:]
    if (h, w) == (size, size):
        return a
    if crop and h >= size and w >= size:
        y, x = (h - size) // 2, (w - size) // 2
        return a[..., y : y + size, x : x + size]
    raise Reject("wrong_size", f"{path}: {what} is {h}x{w}, dataset expects {size}x{size}", path)


def _check_finite(a: np.ndarray, path: str) -> None:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        n = int((~np.isfinite(a)).sum())
        raise Reject("nan_inf", f"{path}: {n} NaN/Inf values", path)


def _band_folder(path: str, names: tuple[str, ...]) -> np.ndarray:
    """A folder of one GeoTIFF per band (BigEarthNet): files ending in _<BAND>.tif; coarser bands are
    upsampled by pixel repetition to the finest grid (integer factors only)."""
    files = {}
    for f in glob.glob(os.path.join(path, "*.tif")) + glob.glob(os.path.join(path, "*.tiff")):
        stem = os.path.splitext(os.path.basename(f))[0]
        files[normalise_band_name(stem.rsplit("_", 1)[-1])] = f
    bands = []
    for n in names:
        if normalise_band_name(n) not in files:
            raise Reject("wrong_band_count", f"{path}: band folder has no file for band {n}", path)
        a = read_array(files[normalise_band_name(n)])
        if a.shape[0] != 1:
            raise Reject("wrong_band_count", f"{files[n]}: per-band file has {a.shape[0]} bands", files[n])
        bands.append(a[0])
    h = max(b.shape[0] for b in bands)
    w = max(b.shape[1] for b in bands)
    out = []
    for n, b in zip(names, bands):
        fy, fx = h // b.shape[0], w // b.shape[1]
        if fy * b.shape[0] != h or fx * b.shape[1] != w:
            raise Reject("wrong_size", f"{path}: band {n} is {b.shape}, not an integer divisor of {(h, w)}", path)
        out.append(np.repeat(np.repeat(b, fy, axis=0), fx, axis=1) if (fy, fx) != (1, 1) else b)
    if len({b.dtype for b in out}) != 1:
        raise Reject("wrong_dtype", f"{path}: bands have different dtypes {sorted({str(b.dtype) for b in out})}", path)
    return np.stack(out)


def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of area-average resampling along one axis: output pixel i covers input
    [i n_in / n_out, (i + 1) n_in / n_out); each weight is the overlap with input pixel j over the cover."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    j = np.arange(n_in)[None]
    return np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0, None) / (n_in / n_out)


def area_resize(a: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size) float64 by area averaging (any ratio, e.g. TreeSatAI's 304 px -> 192)."""
    wy, wx = _area_weights(a.shape[-2], size), _area_weights(a.shape[-1], size)
    return wy @ a.astype(np.float64) @ wx.T  # (size, H) @ (C, H, W) @ (W, size)


def load_hr(path: str, size: int, crop: bool = False, bands: list[int] | None = None,
            resample: bool = False) -> np.ndarray:  # fmt: skip
    """RGB image -> (3, size, size) uint8. RGBA drops alpha; `bands` picks R, G, B from other band orders (e.g.
    [1, 2, 3] of a NIR, R, G, B aerial image); anything else that is not 8-bit RGB is rejected. With `resample`, an
    image of another size is area-averaged to size x size."""
    a = read_array(path, band_counts=(3, 4))
    if a.dtype != np.uint8:
        raise Reject("wrong_dtype", f"{path}: HR image is {a.dtype}, expected uint8", path)
    if bands is not None:
        if not all(0 <= b < a.shape[0] for b in bands):
            raise Reject("wrong_band_count", f"{path}: hr_bands {bands} outside its {a.shape[0]} bands", path)
        a = a[list(bands)]
    elif a.shape[0] == 4:
        a = a[:3]
    if a.shape[0] != 3:
        raise Reject("wrong_band_count", f"{path}: HR image has {a.shape[0]} bands, expected 3 (RGB)", path)
    if resample and a.shape[-2:] != (size, size):
        return np.ascontiguousarray(np.clip(np.rint(area_resize(a, size)), 0, 255).astype(np.uint8))
    return np.ascontiguousarray(_fit(a, size, crop, path, "HR image"))


def load_osm(path: str, size: int, crop: bool = False) -> np.ndarray:
    """Label raster -> (size, size) uint8."""
    a = read_array(path, band_counts=(1,))
    if a.shape[0] != 1:
        raise Reject("wrong_band_count", f"{path}: label raster has {a.shape[0]} bands, expected 1", path)
    if a.dtype.kind not in "ui" or (a.size and (a.min() < 0 or a.max() > 255)):
        raise Reject("wrong_dtype", f"{path}: label raster must hold integers 0..255, got {a.dtype}", path)
    return np.ascontiguousarray(_fit(a, size, crop, path, "label raster")[0].astype(np.uint8))


def _s2_layout(fr: FrameSpec, count: int) -> tuple[str, ...]:
    if fr.bands is None:
        name = DEFAULT_LAYOUT_BY_COUNT.get(count)
        if name is None:
            raise Reject("wrong_band_count", f"{fr.path}: {count} bands; S2 needs 10, 12 or 13 (or 'bands')", fr.path)
        return S2_LAYOUTS[name]
    if isinstance(fr.bands, str):
        if fr.bands not in S2_LAYOUTS:
            raise Reject("malformed_row", f"{fr.path}: unknown band layout {fr.bands!r}", fr.path)
        return S2_LAYOUTS[fr.bands]
    return tuple(normalise_band_name(b) for b in fr.bands)


def load_s2(fr: FrameSpec, size: int, crop: bool = False, missing_bands: str = "reject",
            missing: list[str] | None = None) -> np.ndarray:  # fmt: skip
    """One S2 frame -> (10, size, size) uint16 in S2_BANDS order (reflectance x 1e4).

    A layout lacking SkySense bands is rejected, or with missing_bands="zero" those bands are zero-filled and
    their names appended to `missing`."""
    if os.path.isdir(fr.path):
        a = _band_folder(fr.path, S2_BANDS)
        layout = S2_BANDS
    else:
        a = read_array(fr.path, fr.index, band_counts=(10, 12, 13))
        layout = _s2_layout(fr, a.shape[0])
        if len(layout) != a.shape[0]:
            raise Reject("wrong_band_count", f"{fr.path}: {a.shape[0]} bands, layout names {len(layout)}", fr.path)
        lacking = [b for b in S2_BANDS if b not in layout]
        if lacking and missing_bands != "zero":
            raise Reject("wrong_band_count", f"{fr.path}: layout lacks bands {lacking}", fr.path)
        if lacking:
            if missing is not None:
                missing.extend(b for b in lacking if b not in missing)
            a = np.stack([a[layout.index(b)] if b in layout else np.zeros(a.shape[1:], a.dtype) for b in S2_BANDS])
        else:
            order = [layout.index(b) for b in S2_BANDS]
            if order != list(range(a.shape[0])):  # skip the copy when already in SkySense order
                a = a[order]
    a = _fit(a, size, crop, fr.path, "S2 frame")
    if a.dtype.kind == "f":
        _check_finite(a, fr.path)
        if fr.scale is None:
            raise Reject("wrong_dtype", f"{fr.path}: float S2 needs a 'scale' (e.g. 10000) in the manifest", fr.path)
        a = np.rint(a.astype(np.float64) * fr.scale)
    elif fr.scale is not None and fr.scale != 1:
        a = np.rint(a.astype(np.float64) * fr.scale)
    elif a.dtype.kind not in "ui":
        raise Reject("wrong_dtype", f"{fr.path}: S2 frame is {a.dtype}, expected integer reflectance", fr.path)
    if a.dtype != np.uint16 and a.size and (a.min() < 0 or a.max() > 65535):
        raise Reject("value_out_of_range", f"{fr.path}: S2 values {a.min()}..{a.max()} outside 0..65535", fr.path)
    return np.ascontiguousarray(a.astype("<u2", copy=False))


def load_s1(fr: FrameSpec, size: int, crop: bool = False) -> np.ndarray:
    """One S1 frame -> (2, size, size) float32 backscatter in dB, bands VV, VH."""
    if os.path.isdir(fr.path):
        a = _band_folder(fr.path, S1_BANDS)
    else:
        a = read_array(fr.path, fr.index, band_counts=(2,))
    if a.shape[0] != 2:
        raise Reject("wrong_band_count", f"{fr.path}: S1 frame has {a.shape[0]} bands, expected 2 (VV, VH)", fr.path)
    if a.dtype.kind != "f":
        raise Reject("wrong_dtype", f"{fr.path}: S1 frame is {a.dtype}, expected float backscatter in dB", fr.path)
    a = _fit(a, size, crop, fr.path, "S1 frame")
    _check_finite(a, fr.path)
    return np.ascontiguousarray(a.astype("<f4", copy=False))
