"""Labelled imagery for evaluation: ImageFolder trees, BigEarthNet-style multi-label folders, dataprep datasets.

    data = load_folder("eurosat100/tif", size=64)   # data.images (N, 10, 64, 64) float32, data.labels (N,)

Three layouts are recognised, in this order:
- a dataprep dataset (`dataset.json` + `index.parquet`): rows with `label >= 0`, HR image or the first S2 frame;
- a folder of per-sample directories each holding a `*_labels_metadata.json` with "labels" (BigEarthNet): one
  GeoTIFF per band (`*_B02.tif`, ..., `*_VV.tif`) or a single image per directory; labels become multi-hot;
- an ImageFolder tree: one sub-folder per class holding GeoTIFF / PNG / JPEG files.

Pixels stay in their stored units (HR 0..255, S2 reflectance x 1e4, S1 dB) as float32; normalisation is the
caller's. An unreadable file is skipped and listed with its path and reason; the rest are kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from dataprep.errors import Reject
from dataprep.schema import S1_BANDS, S2_BANDS, S2_LAYOUTS, normalise_band_name
from dataprep.sources import _band_folder, read_array

IMAGE_EXTS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
RESIZE_MODES = ("resize", "crop")
# Band counts each modality accepts from a file (RGBA drops alpha; S2 10 / 12 / 13 are reduced to S2_BANDS).
BAND_COUNTS = {"hr": (3, 4), "s2": (10, 12, 13), "s1": (2,)}
_MODALITY_BY_COUNT = {3: "hr", 4: "hr", 10: "s2", 12: "s2", 13: "s2", 2: "s1"}
_LABELS_JSON = "_labels_metadata.json"


class LabelledDataError(ValueError):
    """Input the evaluation cannot use (missing path, no images, wrong band count); the message says which."""


@dataclass(kw_only=True, slots=True)
class LabelledImages:
    """Images (N, C, size, size) float32 in stored units; labels (N,) int64 or (N, K) uint8 multi-hot."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    modality: str
    paths: list[str]
    bands: tuple[str, ...]  # the model's band order of `images`
    source_bands: tuple[str, ...] = ()  # the files' band order they were selected from
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"} per file left out
    source: str = ""

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> LabelledImages:
        """The samples at `idx` (same classes, modality and skipped list)."""
        idx = np.asarray(idx, dtype=np.int64)
        return LabelledImages(images=self.images[idx], labels=self.labels[idx], classes=self.classes,
                              modality=self.modality, paths=[self.paths[i] for i in idx], bands=self.bands,
                              source_bands=self.source_bands, skipped=self.skipped, source=self.source)


# ---------------------------------------------------------------------------------------------------------------
# band selection


def s2_layout_for(count: int, cirrus_index: int | None = None) -> tuple[str, ...]:
    """The source band names of an S2 file with `count` bands.

    13 bands come in two orders: ESA L1C (B1..B8, B8A, B9, B10, B11, B12) and EuroSAT's GeoTIFFs, which put B8A
    last (B1..B8, B9, B10, B11, B12, B8A). `cirrus_index` (the position of the darkest band, B10 cirrus, over the
    folder) tells them apart: 9 -> EuroSAT, otherwise L1C.
    """
    if count == 10:
        return S2_LAYOUTS["skysense10"]
    if count == 12:
        return S2_LAYOUTS["l2a12"]
    if count == 13:
        return S2_LAYOUTS["eurosat13"] if cirrus_index == 9 else S2_LAYOUTS["l1c13"]
    raise LabelledDataError(f"an S2 image needs 10, 12 or 13 bands, got {count}")


def parse_bands(spec: str | None) -> tuple[str, ...] | None:
    """`--bands`: a layout name of dataprep.schema.S2_LAYOUTS or comma-separated source band names; None = guess."""
    if not spec:
        return None
    if spec in S2_LAYOUTS:
        return S2_LAYOUTS[spec]
    names = tuple(normalise_band_name(b) for b in spec.split(",") if b.strip())
    if not names:
        raise LabelledDataError(f"--bands {spec!r} names no band")
    return names


def select_s2(a: np.ndarray, layout: tuple[str, ...], path: str) -> np.ndarray:
    """(C_src, H, W) in `layout` order -> (10, H, W) in the model's S2_BANDS order."""
    if len(layout) != a.shape[0]:
        raise Reject("wrong_band_count", f"{path}: {a.shape[0]} bands but the layout names {len(layout)}", path)
    missing = [b for b in S2_BANDS if b not in layout]
    if missing:
        raise Reject("wrong_band_count", f"{path}: band layout lacks {missing}", path)
    return a[[layout.index(b) for b in S2_BANDS]]


# ---------------------------------------------------------------------------------------------------------------
# resizing


def fit_size(a: np.ndarray, size: int, mode: str, path: str) -> np.ndarray:
    """(C, H, W) any dtype -> (C, size, size) float32: bilinear antialiased resize, or a centre crop."""
    out = fit_many([a], size, mode, [path])[0]
    if isinstance(out, Reject):
        raise out
    return out


def _check_fit(a: np.ndarray, size: int, mode: str, path: str) -> np.ndarray:
    if mode not in RESIZE_MODES:
        raise LabelledDataError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    x = a.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise Reject("nan_inf", f"{path}: {int((~np.isfinite(x)).sum())} NaN/Inf pixels", path)
    h, w = x.shape[-2:]
    if mode == "crop" and (h, w) != (size, size):
        if h < size or w < size:
            raise Reject("wrong_size", f"{path}: {h}x{w} is smaller than --size {size}; use --resize-mode resize "
                         "or a smaller --size", path)
        y0, x0 = (h - size) // 2, (w - size) // 2
        x = x[:, y0 : y0 + size, x0 : x0 + size]
    return np.ascontiguousarray(x)


def fit_many(arrays: list[np.ndarray], size: int, mode: str, paths: list[str],
             chunk: int = 64) -> list[np.ndarray | Reject]:
    """`fit_size` over many (C, H, W) arrays; an array that cannot be fitted comes back as its Reject.

    Same-shaped arrays are resized together: one batched interpolate costs a tenth of per-image calls on CPU.
    """
    out: list[np.ndarray | Reject] = []
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (a, p) in enumerate(zip(arrays, paths)):
        try:
            out.append(_check_fit(a, size, mode, p))
        except Reject as e:
            out.append(e)
            continue
        if out[-1].shape[-2:] != (size, size):
            groups.setdefault(out[-1].shape, []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), chunk):
            part = idx[s : s + chunk]
            t = torch.from_numpy(np.stack([out[i] for i in part]))
            # antialias only matters when shrinking; enlarging is plain bilinear.
            r = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True).numpy()
            for j, i in enumerate(part):
                out[i] = r[j]
    return out


# ---------------------------------------------------------------------------------------------------------------
# readers


def _read_file(path: str) -> np.ndarray:
    a = read_array(path, band_counts=(3, 4))
    if a.dtype.kind not in "uif":
        raise Reject("wrong_dtype", f"{path}: pixel type {a.dtype} is not numeric", path)
    return a


def _is_band_folder(d: Path) -> str | None:
    """'s2' / 's1' when the directory holds one GeoTIFF per band named *_<BAND>.tif, else None."""
    tifs = [p for p in d.iterdir() if p.suffix.lower() in (".tif", ".tiff")]
    names = {normalise_band_name(p.stem.rsplit("_", 1)[-1]) for p in tifs}
    if set(S2_BANDS) <= names:
        return "s2"
    if set(S1_BANDS) <= names:
        return "s1"
    return None


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTS)


def _check_modality(modality: str | None) -> None:
    if modality is not None and modality not in BAND_COUNTS:
        raise LabelledDataError(f"--modality must be one of {tuple(BAND_COUNTS)}, got {modality!r}")


class _Converter:
    """Turns raw (C, H, W) arrays into the model's bands for one modality, fixed by a reference file."""

    def __init__(self, modality: str | None, bands: tuple[str, ...] | None) -> None:
        self.modality = modality
        self.bands = bands
        self.count: int | None = None

    def start(self, first: np.ndarray, path: str, cirrus_index: int | None) -> None:
        c = first.shape[0]
        m = self.modality or _MODALITY_BY_COUNT.get(c)
        if m is None:
            raise LabelledDataError(f"{path}: {c} band(s); the model takes 3 (RGB -> hr), 10/12/13 (Sentinel-2 -> "
                                    "s2) or 2 (VV, VH -> s1)")
        if c not in BAND_COUNTS[m] and not (m == "s2" and self.bands is not None):
            raise LabelledDataError(f"{path}: {c} band(s) cannot feed modality {m!r}, which takes "
                                    f"{' or '.join(map(str, BAND_COUNTS[m]))}")
        self.modality, self.count = m, c
        if m == "s2" and self.bands is None:
            self.bands = s2_layout_for(c, cirrus_index)

    def __call__(self, a: np.ndarray, path: str) -> np.ndarray:
        if a.shape[0] != self.count:
            raise Reject("wrong_band_count", f"{path}: {a.shape[0]} bands, the folder's other images have "
                         f"{self.count}", path)
        if self.modality == "hr":
            return a[:3]
        if self.modality == "s2":
            return select_s2(a, self.bands, path)
        return a

    @property
    def out_bands(self) -> tuple[str, ...]:
        return {"hr": ("R", "G", "B"), "s2": S2_BANDS, "s1": S1_BANDS}[self.modality]

    @property
    def in_bands(self) -> tuple[str, ...]:
        if self.modality == "s2":
            return tuple(self.bands)
        return ("R", "G", "B", "A")[: self.count] if self.modality == "hr" else S1_BANDS


def _cirrus_index(arrays: list[np.ndarray]) -> int | None:
    """Position of the darkest band (B10 cirrus in 13-band L1C) over all 13-band arrays."""
    a13 = [a for a in arrays if a.shape[0] == 13]
    if not a13:
        return None
    means = np.mean([a.reshape(13, -1).mean(axis=1) for a in a13], axis=0)
    return int(np.argmin(means))


def _assemble(items: list[tuple[str, object]], modality, bands, size, resize_mode, reader) -> tuple:
    """items: (path, label) -> (images, labels, paths, skipped, converter) reading each path with `reader`."""
    conv = _Converter(modality, bands)
    raw, skipped = [], []
    for path, label in items:
        try:
            raw.append((path, label, reader(path)))
        except Reject as e:
            skipped.append({"path": path, "reason": e.message})
    if not raw:
        return None, skipped, conv
    # The band count most files share fixes the modality, so one odd file is skipped, not fatal.
    counts = [a.shape[0] for _, _, a in raw]
    ref = counts.index(max(set(counts), key=lambda c: (counts.count(c), -counts.index(c))))
    conv.start(raw[ref][2], raw[ref][0], _cirrus_index([a for _, _, a in raw]))
    kept = []
    for path, label, a in raw:
        try:
            kept.append((path, label, conv(a, path)))
        except Reject as e:
            skipped.append({"path": path, "reason": e.message})
    fitted = fit_many([a for _, _, a in kept], size, resize_mode, [p for p, _, _ in kept])
    images, labels, paths = [], [], []
    for (path, label, _), f in zip(kept, fitted):
        if isinstance(f, Reject):
            skipped.append({"path": path, "reason": f.message})
            continue
        images.append(f)
        labels.append(label)
        paths.append(path)
    return (images, labels, paths), skipped, conv


def _image_folder(root: Path, modality, bands, size, resize_mode) -> LabelledImages:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _images_in(d))
    if not class_dirs:
        raise LabelledDataError(f"{root}: no images found (expected one sub-folder per class holding "
                                f".tif/.png/.jpg files, a BigEarthNet-style folder or a dataprep dataset)")
    items = [(str(p), ci) for ci, d in enumerate(class_dirs) for p in _images_in(d)]
    got, skipped, conv = _assemble(items, modality, bands, size, resize_mode, _read_file)
    if got is None or not got[0]:
        raise LabelledDataError(f"{root}: none of its {len(items)} images could be used; first: "
                                f"{skipped[0]['reason']}")
    images, labels, paths = got
    # Classes whose every image was skipped keep their index so labels stay comparable across folders.
    return LabelledImages(images=np.stack(images), labels=np.asarray(labels, dtype=np.int64),
                          classes=[d.name for d in class_dirs], modality=conv.modality, paths=paths,
                          bands=conv.out_bands, source_bands=conv.in_bands, skipped=skipped, source="imagefolder")


def _sample_dirs(root: Path) -> list[tuple[Path, Path]]:
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        js = sorted(d.glob("*" + _LABELS_JSON))
        if js:
            out.append((d, js[0]))
    return out


def _read_sample_dir(path: str) -> np.ndarray:
    d = Path(path)
    kind = _is_band_folder(d)
    if kind is not None:
        return _band_folder(path, S2_BANDS if kind == "s2" else S1_BANDS)
    files = _images_in(d)
    if len(files) != 1:
        raise Reject("wrong_band_count", f"{path}: expected one GeoTIFF per band (*_B02.tif ... or *_VV.tif) or "
                     f"a single image, found {len(files)} image files", path)
    return _read_file(str(files[0]))


def _multilabel_folder(root: Path, samples, modality, bands, size, resize_mode) -> LabelledImages:
    items, skipped = [], []
    for d, js in samples:
        try:
            with open(js) as f:
                names = json.load(f)["labels"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError('"labels" is not a list of strings')
        except (OSError, ValueError, KeyError, TypeError) as e:
            skipped.append({"path": str(js), "reason": f"{js}: unreadable labels: {e}"})
            continue
        items.append((str(d), tuple(names)))
    if bands is None and modality in (None, "s2"):
        bands = S2_BANDS  # band folders are read in the model's order already
    got, more, conv = _assemble(items, modality, bands if modality != "s1" else None, size, resize_mode,
                                _read_sample_dir)
    skipped += more
    if got is None or not got[0]:
        raise LabelledDataError(f"{root}: none of its {len(samples)} labelled samples could be used")
    images, label_sets, paths = got
    classes = sorted({n for s in label_sets for n in s})
    hot = np.zeros((len(label_sets), len(classes)), dtype=np.uint8)
    for i, s in enumerate(label_sets):
        hot[i, [classes.index(n) for n in s]] = 1
    return LabelledImages(images=np.stack(images), labels=hot, classes=classes, modality=conv.modality,
                          paths=paths, bands=conv.out_bands, source_bands=conv.in_bands, skipped=skipped,
                          source="multilabel")


def _dataprep_dataset(root: Path, modality, size, resize_mode) -> LabelledImages:
    from dataprep.reader import DatasetReader

    # The hand-written reader, not tensorstore: this runs in the trainer's main process (InTrainingEval) before
    # the training loader forks its workers, and a process forked after tensorstore ran cannot use tensorstore.
    r = DatasetReader(root, backend="direct")
    meta = [r.meta(i) for i in range(len(r))]
    rows = [i for i, m in enumerate(meta) if m["label"] >= 0]
    if not rows:
        raise LabelledDataError(f"{root}: dataprep dataset has no rows with a label >= 0")
    if modality is None:
        modality = "hr" if any(meta[i]["has_hr"] for i in rows) else "s2"
    if modality not in ("hr", "s2"):
        raise LabelledDataError(f"{root}: dataprep datasets are evaluated on hr or s2, not {modality!r}")
    values = sorted({meta[i]["label"] for i in rows})
    names = r.info.get("classes")
    images, labels, paths, skipped = [], [], [], []
    for i in rows:
        sid = f"{root}#{meta[i]['id']}"
        if modality == "hr" and not meta[i]["has_hr"]:
            skipped.append({"path": sid, "reason": f"{sid}: no HR image"})
            continue
        if modality == "s2" and len(meta[i]["s2_dates"]) == 0:
            skipped.append({"path": sid, "reason": f"{sid}: no S2 frame"})
            continue
        # One image per set: the HR image, or the set's first S2 frame (a fixed, documented choice).
        try:
            try:
                a = r.read(i, "hr") if modality == "hr" else r.read(i, "s2", frames=[0])[0]
            except (OSError, ValueError, RuntimeError) as e:  # a corrupt chunk fails its checksum here
                raise Reject("corrupt_file", f"{sid}: unreadable: {e}", sid) from None
            images.append(fit_size(a, size, resize_mode, sid))
        except Reject as e:
            skipped.append({"path": sid, "reason": e.message})
            continue
        labels.append(values.index(meta[i]["label"]))
        paths.append(sid)
    if not images:
        raise LabelledDataError(f"{root}: none of its {len(rows)} labelled sets could be used")
    classes = [str(names[v]) if isinstance(names, list) and v < len(names) else str(v) for v in values]
    bands = {"hr": ("R", "G", "B"), "s2": S2_BANDS}[modality]
    return LabelledImages(images=np.stack(images), labels=np.asarray(labels, dtype=np.int64), classes=classes,
                          modality=modality, paths=paths, bands=bands, source_bands=bands, skipped=skipped,
                          source="dataprep")


def load_folder(path: str | os.PathLike, *, modality: str | None = None, size: int = 128,
                resize_mode: str = "resize", bands: str | tuple[str, ...] | None = None) -> LabelledImages:
    """A labelled folder -> images (N, C, size, size) float32 (stored units), labels, classes, modality, skipped.

    `modality` None guesses from the band count (3 -> hr, 10/12/13 -> s2, 2 -> s1); `bands` names the source band
    order of S2 files (a dataprep.schema.S2_LAYOUTS name or a tuple of names) when the guess would be wrong.
    Raises LabelledDataError for a missing path, a folder without usable images, or an unusable band count.
    """
    _check_modality(modality)
    if resize_mode not in RESIZE_MODES:
        raise LabelledDataError(f"--resize-mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if size < 1:
        raise LabelledDataError(f"--size must be positive, got {size}")
    root = Path(path)
    if not root.exists():
        raise LabelledDataError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise LabelledDataError(f"{root}: not a directory (expected a labelled folder or a dataprep dataset)")
    if isinstance(bands, str):
        bands = parse_bands(bands)
    if (root / "dataset.json").is_file() and (root / "index.parquet").is_file():
        return _dataprep_dataset(root, modality, size, resize_mode)
    samples = _sample_dirs(root)
    if samples:
        return _multilabel_folder(root, samples, modality, bands, size, resize_mode)
    return _image_folder(root, modality, bands, size, resize_mode)
