"""Manifest loading (JSONL, CSV, Parquet) and row-level validation into `SetSpec`s."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .datacube import CubeSpec, parse_cube
from .errors import Reject
from .schema import check_lonlat, parse_date


@dataclass(kw_only=True, slots=True)
class FrameSpec:
    """One S2/S1 acquisition: a file (or per-band folder), its date, and how to read it."""

    path: str
    date: int  # days since 1970-01-01
    bands: str | list[str] | None = None  # layout name or source band names (S2)
    scale: float | None = None  # float reflectance -> uint16 multiplier (S2)
    index: int | None = None  # time index into a 4-D (T, ...) array file


@dataclass(kw_only=True, slots=True)
class SetSpec:
    """One validated manifest row; `row` is its 0-based position in the manifest."""

    row: int
    id: str
    lon: float
    lat: float
    label: int = -1
    hr: str | None = None
    osm: str | None = None
    s2: list[FrameSpec] | CubeSpec | None = None
    s1: list[FrameSpec] | CubeSpec | None = None
    hr_bands: list[int] | None = None  # which HR bands are R, G, B (0-based), for non-RGB band orders
    lonlat_from_raster: bool = False  # lon/lat absent from the manifest: taken from the first georeferenced raster


@dataclass(kw_only=True, slots=True)
class RawRow:
    """A manifest row as read: the dict, or the error that made it unreadable."""

    row: int
    data: dict | None
    error: str | None = None
    id_hint: str = ""
    extra: dict = field(default_factory=dict)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | os.PathLike) -> Iterator[RawRow]:
    """Yield every row in order (streaming: a 21M-row manifest is never held whole); malformed lines become
    RawRow(data=None, error=...) instead of raising."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(path, encoding="utf-8", errors="replace") as f:
            n = 0
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    if not isinstance(d, dict):
                        raise ValueError("not a JSON object")
                    yield RawRow(row=n, data=d)
                except ValueError as e:
                    yield RawRow(row=n, data=None, error=f"{path.name} line {lineno}: {e}")
                n += 1
    elif suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            reader = csv.DictReader(f)
            for n, d in enumerate(reader):
                if None in d or any(v is None for v in d.values()):
                    yield RawRow(row=n, data=None, error=f"{path.name} line {reader.line_num}: wrong column count")
                    continue
                yield RawRow(row=n, data={k: (v if v != "" else None) for k, v in d.items()})
    elif suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for d in batch.to_pylist():
                yield RawRow(row=n, data=d)
                n += 1
    else:
        raise ValueError(f"manifest {path}: unknown format {suffix!r} (use .jsonl, .csv or .parquet)")


def _resolve(p, base: str, root: str | None, what: str) -> str:
    if not isinstance(p, str) or not p:
        raise Reject("malformed_row", f"{what}: path must be a non-empty string, got {p!r}")
    full = os.path.normpath(os.path.join(base, p))  # string ops: pathlib cost 3 us a path, x 65 frames x 21M sets
    if root is not None:
        real = os.path.realpath(full)
        if real != root and not real.startswith(root + os.sep):
            raise Reject("path_escapes_root", f"{what}: {p} resolves to {real}, outside --root {root}", p)
    return full


def _frames(value, base: str, root: str | None, mod: str, row_scale) -> list[FrameSpec] | CubeSpec | None:
    if value is None:
        return None
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except ValueError as e:
            raise Reject("malformed_row", f"{mod}: not a JSON list of frames: {e}") from None
        if value is None:
            return None
    if isinstance(value, dict) and "cube" in value:  # the whole series in one NetCDF/HDF5 datacube
        cube = parse_cube(value, _resolve(value["cube"], base, root, f"{mod}.cube"), mod)
        if mod == "s2" and cube.scale is None and row_scale is not None:
            cube.scale = row_scale
        return cube
    if not isinstance(value, list | tuple):
        raise Reject("malformed_row", f"{mod}: expected a list of {{path, date}}, got {type(value).__name__}")
    if len(value) == 0:  # [] means "none", like null or an omitted key
        return None
    frames = []
    for j, fr in enumerate(value):
        if not isinstance(fr, dict) or "path" not in fr or "date" not in fr:
            raise Reject("malformed_row", f"{mod}[{j}]: expected an object with 'path' and 'date', got {fr!r}")
        path = _resolve(fr["path"], base, root, f"{mod}[{j}]")
        try:
            date = parse_date(fr["date"])
        except ValueError as e:
            raise Reject("bad_date", f"{mod}[{j}] {fr['path']}: {e}", fr["path"]) from None
        scale = fr.get("scale", row_scale)
        index = fr.get("index")
        if scale is not None and not isinstance(scale, int | float):
            raise Reject("malformed_row", f"{mod}[{j}]: scale must be a number, got {scale!r}")
        if index is not None and not isinstance(index, int):
            raise Reject("malformed_row", f"{mod}[{j}]: index must be an int, got {index!r}")
        frames.append(FrameSpec(path=path, date=date, bands=fr.get("bands"), scale=scale, index=index))
    dates = [f.date for f in frames]
    if len(set(dates)) != len(dates):
        dup = sorted({d for d in dates if dates.count(d) > 1})
        raise Reject("duplicate_date", f"{mod}: duplicate dates (days since epoch) {dup}")
    return sorted(frames, key=lambda f: f.date)  # stored in date order


def parse_row(raw: RawRow, base: str, root: str | None) -> SetSpec:
    """Row-level checks (no file I/O). Raises Reject."""
    if raw.data is None:
        raise Reject("malformed_row", raw.error or "unreadable row")
    d = raw.data
    # lon and lat both absent: taken from the rasters' georeferencing at load time (one absent is an error).
    from_raster = d.get("lon") is None and d.get("lat") is None
    for k in ("id",) if from_raster else ("id", "lon", "lat"):
        if d.get(k) is None:
            raise Reject("missing_field", f"row {raw.row}: field {k!r} is missing")
    sid = str(d["id"])
    lon = lat = math.nan
    if not from_raster:
        try:
            lon, lat = float(d["lon"]), float(d["lat"])
        except (TypeError, ValueError):
            raise Reject("malformed_row", f"id {sid}: lon/lat not numbers: {d['lon']!r}, {d['lat']!r}") from None
        try:
            check_lonlat(lon, lat)
        except ValueError as e:
            raise Reject("lonlat_out_of_range", f"id {sid}: {e}") from None
    label = d.get("label")
    try:
        label = -1 if label is None or (isinstance(label, float) and math.isnan(label)) else int(label)
    except (TypeError, ValueError):
        raise Reject("malformed_row", f"id {sid}: label not an int: {label!r}") from None
    hr = _resolve(d["hr"], base, root, "hr") if d.get("hr") is not None else None
    osm = _resolve(d["osm"], base, root, "osm") if d.get("osm") is not None else None
    s2 = _frames(d.get("s2"), base, root, "s2", d.get("s2_scale"))
    s1 = _frames(d.get("s1"), base, root, "s1", None)
    if hr is None and s2 is None and s1 is None:
        raise Reject("empty_set", f"id {sid}: no hr, s2 or s1 data")
    hr_bands = d.get("hr_bands")
    if isinstance(hr_bands, str):  # CSV cell
        try:
            hr_bands = json.loads(hr_bands)
        except ValueError:
            hr_bands = "?"
    if hr_bands is not None and not (isinstance(hr_bands, list) and len(hr_bands) == 3
                                     and all(isinstance(b, int) for b in hr_bands)):  # fmt: skip
        raise Reject("malformed_row", f"id {sid}: hr_bands must be 3 band indices (R, G, B), got {d['hr_bands']!r}")
    return SetSpec(row=raw.row, id=sid, lon=lon, lat=lat, label=label, hr=hr, osm=osm, s2=s2, s1=s1,
                   hr_bands=hr_bands, lonlat_from_raster=from_raster)


def plan(
    manifest: str | os.PathLike,
    root: str | os.PathLike | None = None,
    keep: Callable[[int], bool] | None = None,
    info: dict | None = None,
) -> list[SetSpec | Reject | None]:
    """Parse and row-check a whole manifest: one SetSpec or Reject per row, in manifest order.

    Duplicate ids: the first occurrence is kept, later ones are rejected. Rejects carry `.row` and `.id`.
    Rows for which keep(row) is False are checked (so every rank agrees on duplicates) but stored as None:
    a rank holds full specs only for its own shards, plus the id of every row (~100 B a row).
    `info`, when given, receives dataset-wide facts every rank must agree on: {"has_osm": bool}.
    """
    manifest = Path(manifest)
    base = str(manifest.resolve().parent)
    root_p = os.path.realpath(root) if root is not None else None
    out: list[SetSpec | Reject | None] = []
    seen: dict[str, int] = {}
    has_osm = False
    for raw in read_manifest(manifest):
        mine = keep is None or keep(raw.row)
        try:
            spec = parse_row(raw, base, root_p)
            if spec.id in seen:
                raise Reject("duplicate_id", f"id {spec.id}: duplicate of manifest row {seen[spec.id]}")
            seen[spec.id] = raw.row
            has_osm = has_osm or spec.osm is not None
            out.append(spec if mine else None)
        except Reject as r:
            r.row = raw.row
            d = raw.data or {}
            r.id = str(d.get("id")) if d.get("id") is not None else ""
            out.append(r if mine else None)
    if info is not None:
        info["has_osm"] = has_osm
    return out
