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


@dataclass(frozen=True, slots=True)
class RowRange:
    """Manifest rows [first, last): in JSONL/CSV at bytes [start, stop) of the file, `line` the first one's line
    number; in Parquet the rows themselves."""

    first: int
    last: int
    start: int = 0
    stop: int = 0
    line: int = 1


@dataclass(kw_only=True, slots=True)
class Scan:
    """One pass over a manifest that decodes almost nothing: its row count, whether any row names an osm file
    (has_osm, which every rank must agree on), and where the rows of each kept shard are."""

    rows: int = 0
    has_osm: bool = False
    shards: dict[int, RowRange] = field(default_factory=dict)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    kinds = {"jsonl": (".jsonl", ".json", ".ndjson"), "csv": (".csv",), "parquet": (".parquet", ".pq")}
    for kind, names in kinds.items():
        if suffix in names:
            return kind
    raise ValueError(f"manifest {path}: unknown format {suffix!r} (use .jsonl, .csv or .parquet)")


def _records(f, pos: int, line: int, quoted: bool):
    """(start, stop, first line, record bytes) of each non-blank record from the binary file f, positioned at byte
    `pos`, physical line `line`. CSV (`quoted`): a newline inside a quoted field continues the record."""
    parts, start, first, quotes = [], pos, line, 0
    for raw in f:
        parts.append(raw)
        pos += len(raw)
        line += 1
        quotes += raw.count(b'"') if quoted else 0
        if quotes % 2:
            continue
        rec = b"".join(parts) if len(parts) > 1 else raw
        if rec.strip():
            yield start, pos, first, rec
        parts, start, first, quotes = [], pos, line, 0


def _csv_header(f) -> tuple[list[str], int, int]:
    """(column names, byte and line number after it) of a CSV file's header record, f at its start."""
    for _, stop, first, rec in _records(f, 0, 1, quoted=True):
        return next(csv.reader([rec.decode("utf-8", errors="replace")]), []), stop, first + rec.count(b"\n")
    return [], 0, 1


def scan(path: str | os.PathLike, shard_size: int, keep: Callable[[int], bool] | None = None) -> Scan:
    """Scan (above) of the manifest at `path`; shards k with keep(k) (default all) get their RowRange. Rows are
    decoded only to learn has_osm, and only until a row names osm (JSONL: only lines holding the key's name)."""
    path, out = Path(path), Scan()
    kind = _suffix(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads ahead a whole file's columns
        out.rows = pf.metadata.num_rows
        if "osm" in pf.schema_arrow.names:
            out.has_osm = any(b.column(0).null_count < len(b) for b in pf.iter_batches(columns=["osm"]))
        out.shards = {k: RowRange(k * shard_size, min(out.rows, (k + 1) * shard_size))
                      for k in range(-(-out.rows // shard_size)) if keep is None or keep(k)}  # fmt: skip
        return out
    ranges: dict[int, list] = {}
    with open(path, "rb") as f:
        cols, pos, line = _csv_header(f) if kind == "csv" else ([], 0, 1)
        osm_col = cols.index("osm") if "osm" in cols else None
        for start, stop, first, rec in _records(f, pos, line, quoted=kind == "csv"):
            k = out.rows // shard_size
            r = ranges.get(k)
            if r is not None:
                r[1], r[3] = out.rows + 1, stop
            elif keep is None or keep(k):
                ranges[k] = [out.rows, out.rows + 1, start, stop, first]
            if not out.has_osm:
                out.has_osm = _names_osm(rec, kind, osm_col)
            out.rows += 1
    out.shards = {k: RowRange(*r) for k, r in ranges.items()}
    return out


def _names_osm(rec: bytes, kind: str, osm_col: int | None) -> bool:
    if kind == "csv":
        if osm_col is None:
            return False
        cells = next(csv.reader([rec.decode("utf-8", errors="replace")]), [])
        return osm_col < len(cells) and cells[osm_col] != ""
    if b'"osm"' not in rec:
        return False
    try:
        d = json.loads(rec)
    except ValueError:
        return False
    return isinstance(d, dict) and d.get("osm") is not None


def read_rows(path: str | os.PathLike, rows: RowRange | None = None) -> Iterator[RawRow]:
    """Yield the manifest's rows (all, or those of `rows`, a RowRange from `scan`) in order, streaming: a 21M-row
    manifest is never held whole. Malformed lines become RawRow(data=None, error=...) instead of raising."""
    path = Path(path)
    kind = _suffix(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads ahead a whole file's columns
        lo, hi = (0, pf.metadata.num_rows) if rows is None else (rows.first, rows.last)
        n = 0
        for g in range(pf.metadata.num_row_groups):  # only the row groups holding rows [lo, hi)
            m = pf.metadata.row_group(g).num_rows
            if n + m > lo and n < hi:
                for i, d in enumerate(pf.read_row_group(g).slice(max(lo - n, 0), hi - max(lo, n)).to_pylist()):
                    yield RawRow(row=max(lo, n) + i, data=d)
            n += m
        return
    with open(path, "rb") as f:
        cols, pos, line = _csv_header(f) if kind == "csv" else ([], 0, 1)
        n = 0
        if rows is not None:
            f.seek(rows.start)
            pos, line, n = rows.start, rows.line, rows.first
        for start, _, first, rec in _records(f, pos, line, quoted=kind == "csv"):
            if rows is not None and start >= rows.stop:
                return
            yield _decode(rec, kind, cols, n, f"{path.name} line {first}")
            n += 1


def _decode(rec: bytes, kind: str, cols: list[str], n: int, where: str) -> RawRow:
    text = rec.decode("utf-8", errors="replace")
    if kind == "csv":
        cells = next(csv.reader([text]), [])
        if len(cells) != len(cols):
            return RawRow(row=n, data=None, error=f"{where}: wrong column count")
        return RawRow(row=n, data={k: (v if v != "" else None) for k, v in zip(cols, cells)})
    try:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return RawRow(row=n, data=d)
    except ValueError as e:
        return RawRow(row=n, data=None, error=f"{where}: {e}")


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


def plan_rows(manifest: str | os.PathLike, root: str | os.PathLike | None = None,
              rows: RowRange | None = None) -> list[SetSpec | Reject]:  # fmt: skip
    """Parse and row-check the manifest's rows (all, or a RowRange from `scan`): one SetSpec or Reject per row, in
    manifest order. Rejects carry `.row` and `.id`. Duplicate ids are not checked here: a rank sees only its own
    shards' rows, so the merge rejects them (dataprep.convert.merge)."""
    manifest = Path(manifest)
    base = str(manifest.resolve().parent)
    root_p = os.path.realpath(root) if root is not None else None
    out: list[SetSpec | Reject] = []
    for raw in read_rows(manifest, rows):
        try:
            out.append(parse_row(raw, base, root_p))
        except Reject as r:
            r.row = raw.row
            d = raw.data or {}
            r.id = str(d.get("id")) if d.get("id") is not None else ""
            out.append(r)
    return out
