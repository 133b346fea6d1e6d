"""Writing one shard store: every set of a fixed slice of manifest rows, under a temporary name, renamed on
completion (the rename is the commit point: a reader never sees a half-written shard)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .datacube import CubeSpec, Series, load_cube, lonlat_of
from .errors import Reject
from .manifest import SetSpec
from .schema import DTYPES, HR_BANDS, N_BANDS, OSM_UNKNOWN, S1_BANDS, S2_BANDS, check_lonlat, region_of
from .sources import load_hr, load_osm, load_s1, load_s2

HR_CHUNK = 256


def hr_chunk(size: int) -> int:
    """HR chunk edge: 256, or the largest divisor of size below it (a zarr shard must tile into chunks)."""
    return next(c for c in range(min(HR_CHUNK, size), 0, -1) if size % c == 0)


@dataclass(kw_only=True, slots=True)
class ShardConfig:
    """Everything that decides the bytes of a shard (part of the resume fingerprint)."""

    hr_size: int = 256
    s2_size: int = 64
    shard_size: int = 256
    frames_per_chunk_shard: int = 64  # S2/S1 frames per zarr shard object (one chunk per frame inside)
    codec: str = "blosc"  # "blosc" (zstd + byte shuffle) or "zstd"
    clevel: int = 3
    crop: bool = False  # centre-crop larger rasters instead of rejecting them
    has_osm: bool = False
    missing_bands: str = "reject"  # an S2/S1 source lacking SkySense bands: "reject" the row or "zero"-fill them
    cloud_max: float | None = None  # drop S2 frames whose cloud fraction (from SCL) exceeds this
    resample_hr: bool = False  # area-average HR images of another size to hr_size (any ratio) instead of rejecting

    def fingerprint(self) -> dict:
        # Settings added later enter only when set, so a conversion begun by an earlier version still resumes.
        added = {"missing_bands": "reject", "cloud_max": None, "resample_hr": False}
        return {k: getattr(self, k) for k in self.__slots__ if k not in added or getattr(self, k) != added[k]}


class StrictStop(Exception):  # noqa: N818 - control flow for --strict
    """--strict: the first rejected row stops the run."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.zarr"


def compressors(cfg: ShardConfig, dtype: np.dtype) -> list:
    if cfg.codec == "zstd":
        comp = ZstdCodec(level=cfg.clevel)
    elif cfg.codec == "blosc":
        comp = BloscCodec(cname="zstd", clevel=cfg.clevel, shuffle="shuffle", typesize=dtype.itemsize)
    else:
        raise ValueError(f"unknown codec {cfg.codec!r}")
    return [comp, Crc32cCodec()]  # crc32c last: it checksums the compressed bytes of every chunk


def crc(a: np.ndarray) -> int:
    return int(google_crc32c.value(np.ascontiguousarray(a).tobytes()))


class _Stats:
    """Per-band pixel count, sum and sum of squares in float64 (merged across shards in shard order), over the
    pixels that hold data: no-data and cloud pixels and zero-filled bands are left out."""

    def __init__(self):
        self.d = {m: {"count": [0] * N_BANDS[m], "sum": [0.0] * N_BANDS[m], "sumsq": [0.0] * N_BANDS[m]}
                  for m in N_BANDS}  # fmt: skip

    def add(self, m: str, a: np.ndarray, exclude: np.ndarray | None = None, bands_absent=()) -> None:
        """a: (..., C, H, W); exclude: (..., H, W) bool, pixels left out of every band; bands_absent: band names."""
        c = a.shape[-3]
        x = np.moveaxis(a.reshape(-1, c, a.shape[-2] * a.shape[-1]), 1, 0).reshape(c, -1).astype(np.float64)
        if exclude is not None and exclude.any():
            x = x[:, ~exclude.reshape(-1)]
        names = {"hr": HR_BANDS, "s2": S2_BANDS, "s1": S1_BANDS}[m]
        on = np.array([n not in bands_absent for n in names], np.float64)
        s = self.d[m]
        s["count"] = [u + int(x.shape[1] * o) for u, o in zip(s["count"], on)]
        s["sum"] = [u + float(v) for u, v in zip(s["sum"], x.sum(1) * on)]
        s["sumsq"] = [u + float(v) for u, v in zip(s["sumsq"], np.einsum("ij,ij->i", x, x) * on)]


# Chunk keys "c.0.0.0.0" (flat files in the array folder, not nested folders): millions of images would
# otherwise cost millions of directories, and directory creation dominated small-shard writes here.
KEY_ENCODING = {"name": "default", "separator": "."}


def _key(*idx: int) -> str:
    return "c." + ".".join(map(str, idx))


# Zarr v3 dimension names (xarray's open_zarr needs them) and attributes. Every size gets its own name, because
# xarray puts a shard's arrays into one Dataset, where a dimension has one length: HR's bands and pixels are not
# S2's, and each ragged frame axis is its own. `scale`: physical value = stored value x scale (not CF's
# `scale_factor`, which xarray would apply, turning the stored integers into floats).
DIMS = {"hr": ("set", "hr_band", "hr_y", "hr_x"), "osm": ("set", "hr_y", "hr_x"),
        "s2": ("s2_frame", "s2_band", "y", "x"), "s1": ("s1_frame", "s1_band", "y", "x"),
        "s2_offsets": ("set_edge",), "s1_offsets": ("set_edge",), "s2_dates": ("s2_frame",),
        "s1_dates": ("s1_frame",)}  # fmt: skip
ATTRS = {
    "hr": {"long_name": "high-resolution optical image", "bands": list(HR_BANDS), "units": "DN 0-255", "scale": 1},
    "osm": {"long_name": "land-cover label raster", "units": "class id", "unknown_class": OSM_UNKNOWN},
    "s2": {"long_name": "Sentinel-2 frames, all sets' series concatenated (set i: s2_offsets[i]:s2_offsets[i+1])",
           "bands": list(S2_BANDS), "units": "reflectance x 1e4", "scale": 1e-4},
    "s1": {"long_name": "Sentinel-1 frames, all sets' series concatenated (set i: s1_offsets[i]:s1_offsets[i+1])",
           "bands": list(S1_BANDS), "units": "backscatter dB", "scale": 1},
    "s2_offsets": {"long_name": "first S2 frame of each set, then the frame count"},
    "s1_offsets": {"long_name": "first S1 frame of each set, then the frame count"},
    "s2_dates": {"long_name": "S2 acquisition date", "units": "days since 1970-01-01"},
    "s1_dates": {"long_name": "S1 acquisition date", "units": "days since 1970-01-01"},
}


def _create(group, name, shape, chunks, shards, dtype, cfg, fill_value=0):
    return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill_value,
                              compressors=compressors(cfg, np.dtype(dtype)), chunk_key_encoding=KEY_ENCODING,
                              dimension_names=DIMS[name], attributes=ATTRS[name])


def _load_series(spec: SetSpec, m: str, cfg: ShardConfig) -> Series:
    src = getattr(spec, m)
    h = cfg.s2_size
    if isinstance(src, CubeSpec):
        return load_cube(src, m, h, cfg.crop, cfg.missing_bands, cfg.cloud_max if m == "s2" else None)
    frames = src or []
    missing: list[str] = []
    if m == "s2":
        arrs = [load_s2(fr, h, cfg.crop, cfg.missing_bands, missing) for fr in frames]
    else:
        arrs = [load_s1(fr, h, cfg.crop) for fr in frames]
    T = len(arrs)
    return Series(data=np.stack(arrs) if arrs else np.zeros((0, N_BANDS[m], h, h), DTYPES[m]),
                  dates=np.array([fr.date for fr in frames], dtype=np.int32), nodata=np.zeros((T, h, h), bool),
                  cloud=np.full(T, np.nan, np.float32), missing=missing)  # fmt: skip


def _raster_lonlat(spec: SetSpec) -> tuple[float, float]:
    """lon/lat of a row that gives none: the centre of its first georeferenced raster (HR, S2, S1)."""
    paths = [spec.hr] if spec.hr else []
    for m in ("s2", "s1"):
        src = getattr(spec, m)
        paths += [src.path] if isinstance(src, CubeSpec) else [fr.path for fr in src or []]
    for p in paths:
        ll = lonlat_of(p)
        if ll is not None:
            try:
                check_lonlat(*ll)
            except ValueError as e:
                raise Reject("lonlat_out_of_range", f"{p}: georeferencing gives {e}", p) from None
            return ll
    raise Reject("missing_field", f"id {spec.id}: no lon/lat in the manifest and no georeferenced raster")


def _load_set(spec: SetSpec, cfg: ShardConfig) -> dict:
    out = {"hr": None, "osm": None, "lonlat": (spec.lon, spec.lat)}
    if spec.hr is not None:
        out["hr"] = load_hr(spec.hr, cfg.hr_size, cfg.crop, spec.hr_bands, cfg.resample_hr)
    if spec.osm is not None:
        out["osm"] = load_osm(spec.osm, cfg.hr_size, cfg.crop)
    for m in ("s2", "s1"):
        ser = _load_series(spec, m, cfg)
        out[m], out[m + "_dates"], out[m + "_series"] = ser.data, ser.dates, ser
    if spec.lonlat_from_raster:
        out["lonlat"] = _raster_lonlat(spec)
    return out


def _source_bytes(spec: SetSpec) -> int:
    paths = [p for p in (spec.hr, spec.osm) if p]
    for src in (spec.s2, spec.s1):
        paths += [src.path] if isinstance(src, CubeSpec) else [f.path for f in src or []]
    paths = list(dict.fromkeys(paths))  # one cube file may hold both S2 and S1
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(e.stat().st_size for e in os.scandir(p) if e.is_file())
        elif os.path.exists(p):
            total += os.path.getsize(p)
    return total


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


MAX_U64 = np.uint64(2**64 - 1)


class _ChunkWriter:
    """Writes whole zarr shard objects directly (sharding_indexed codec: inner chunks encoded as
    bytes -> compressor -> crc32c, then an index of (offset, nbytes) uint64 pairs + crc32c at the end).

    Zarr reads these like its own; writing them here skips zarr's per-chunk async machinery, which cost
    twice the codec time itself on small chunks (measured by `python -m dataprep bench`)."""

    def __init__(self, cfg: ShardConfig):
        from numcodecs import Blosc, Zstd, blosc

        # One thread per worker process: parallelism comes from --workers; blosc's own threads would
        # oversubscribe the cores (and hide the per-worker rate).
        blosc.use_threads = False
        self._dirs: set[str] = set()
        self._codecs = {}
        for dt in (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32")):
            if cfg.codec == "zstd":
                self._codecs[dt] = Zstd(level=cfg.clevel)
            else:
                self._codecs[dt] = Blosc(cname="zstd", clevel=cfg.clevel, shuffle=Blosc.SHUFFLE, typesize=dt.itemsize)

    def write(self, path: str, chunks: list[np.ndarray | None]) -> None:
        """chunks: the inner chunks of one zarr shard in C order over the chunk grid (None = absent)."""
        index = np.full((len(chunks), 2), MAX_U64, dtype="<u8")
        parts, off = [], 0
        for j, a in enumerate(chunks):
            if a is None:
                continue
            comp = bytes(self._codecs[a.dtype].encode(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))
            b = comp + google_crc32c.value(comp).to_bytes(4, "little")
            index[j] = (off, len(b))
            off += len(b)
            parts.append(b)
        ib = index.tobytes()
        parts.append(ib + google_crc32c.value(ib).to_bytes(4, "little"))
        d = os.path.dirname(path)
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)
        with open(path, "wb") as f:
            f.write(b"".join(parts))


def _tiles(img: np.ndarray, c: int) -> list[np.ndarray]:
    """(..., H, W) -> row-major list of (..., c, c) tiles, edge tiles zero-padded (zarr's chunk layout)."""
    H, W = img.shape[-2:]
    out = []
    for y in range(0, H, c):
        for x in range(0, W, c):
            t = img[..., y : y + c, x : x + c]
            if t.shape[-2:] != (c, c):
                pad = np.zeros(img.shape[:-2] + (c, c), img.dtype)
                pad[..., : t.shape[-2], : t.shape[-1]] = t
                t = pad
            out.append(t)
    return out


# Called once per manifest row written or rejected (dataprep convert's per-set progress bar and counter); set in
# each pool worker by `dataprep.convert`.
ON_ROW: Callable[[], None] | None = None


def _reported(items: list):
    """`items`, calling ON_ROW each time the loop body has finished with one (written, rejected or skipped)."""
    for item in items:
        yield item
        if ON_ROW is not None:
            ON_ROW()


def write_shard(k: int, items: list, cfg: ShardConfig, shards_dir: str, strict: bool = False) -> dict:
    """Convert the manifest rows `items` (SetSpec or row-level Reject, in manifest order) into shard k.

    Returns a summary {shard, sets, rows, rejects: {kind: n}, bytes_in, bytes_out}. Raises StrictStop under strict.
    """
    final = os.path.join(shards_dir, shard_name(k))
    tmp = os.path.join(shards_dir, f".tmp-{shard_name(k)}-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    H, h, fps = cfg.hr_size, cfg.s2_size, cfg.frames_per_chunk_shard
    hc = hr_chunk(H)
    w = _ChunkWriter(cfg)
    buf: dict[str, list[np.ndarray]] = {"s2": [], "s1": []}  # frames not yet written (less than one zarr shard)
    written = {"s2": 0, "s1": 0}
    offsets = {"s2": [0], "s1": [0]}
    dates: dict[str, list[int]] = {"s2": [], "s1": []}

    def flush(m: str, final_block: bool) -> None:
        frames = [f for a in buf[m] for f in a]
        n_full = len(frames) if final_block else (len(frames) // fps) * fps
        for b in range(0, n_full, fps):
            block = frames[b : b + fps]
            w.write(os.path.join(tmp, m, _key((written[m] + b) // fps, 0, 0, 0)), block + [None] * (fps - len(block)))
        written[m] += n_full
        buf[m] = [np.stack(frames[n_full:])] if n_full < len(frames) else []

    rows, errors, stats, bytes_in = [], [], _Stats(), 0
    for item in _reported(items):
        try:
            if isinstance(item, Reject):
                raise item
            data = _load_set(item, cfg)
        except Reject as r:
            sid = item.id if isinstance(item, SetSpec) else getattr(r, "id", "")
            errors.append({"id": sid, "manifest_row": item.row, "kind": r.kind, "message": r.message, "path": r.path})
            if strict:
                shutil.rmtree(tmp, ignore_errors=True)
                raise StrictStop(f"manifest row {item.row} (id {sid!r}): {r.kind}: {r.message}") from None
            continue
        j = len(rows)
        bytes_in += _source_bytes(item)
        if data["hr"] is not None:  # a missing HR image is simply not stored: zarr returns the fill value 0
            w.write(os.path.join(tmp, "hr", _key(j, 0, 0, 0)), _tiles(data["hr"], hc))
            stats.add("hr", data["hr"])
        if data["osm"] is not None:  # a set without labels stores nothing: the fill value is OSM_UNKNOWN
            w.write(os.path.join(tmp, "osm", _key(j, 0, 0)), _tiles(data["osm"], hc))
        starts = {}
        for m in ("s2", "s1"):
            starts[m] = offsets[m][-1]
            ser = data[m + "_series"]
            if len(data[m]):
                buf[m].append(data[m])
                out_px = ser.nodata if ser.cloudy is None else ser.nodata | ser.cloudy
                stats.add(m, data[m], out_px, ser.missing)
                if sum(len(b) for b in buf[m]) >= fps:
                    flush(m, False)
            offsets[m].append(offsets[m][-1] + len(data[m]))
            dates[m].extend(data[m + "_dates"].tolist())
        lon, lat = data["lonlat"]
        s2s, s1s = data["s2_series"], data["s1_series"]
        rows.append({
            "id": item.id, "row": j, "manifest_row": item.row, "lon": lon, "lat": lat,
            "region": int(region_of(lon, lat)), "label": item.label,
            "has_hr": data["hr"] is not None, "has_osm": data["osm"] is not None,
            "n_s2": len(data["s2"]), "n_s1": len(data["s1"]), "s2_start": starts["s2"], "s1_start": starts["s1"],
            "s2_dates": data["s2_dates"].tolist(), "s1_dates": data["s1_dates"].tolist(),
            "hr_crc32c": crc(data["hr"]) if data["hr"] is not None else 0,
            "s2_crc32c": crc(data["s2"]), "s1_crc32c": crc(data["s1"]),
            "lonlat_source": "raster" if item.lonlat_from_raster else "manifest",
            "s2_missing_bands": list(s2s.missing), "s1_missing_bands": list(s1s.missing),
            "s2_cloud": [None if np.isnan(c) else float(c) for c in s2s.cloud],
            "s2_nodata": s2s.nodata.mean((1, 2)).tolist(), "s1_nodata": s1s.nodata.mean((1, 2)).tolist(),
            "s2_cloud_skipped": s2s.skipped,
        })  # fmt: skip
    n = len(rows)
    for m in ("s2", "s1"):
        flush(m, True)
    # Metadata last, with the final shapes (zarr never touches the chunk objects written above).
    g = zarr.open_group(tmp, mode="a", zarr_format=3)
    _create(g, "hr", (n, 3, H, H), (1, 3, hc, hc), (1, 3, H, H), "uint8", cfg)
    if cfg.has_osm:
        _create(g, "osm", (n, H, H), (1, hc, hc), (1, H, H), "uint8", cfg, fill_value=OSM_UNKNOWN)
    for m in ("s2", "s1"):
        nb = N_BANDS[m]
        _create(g, m, (written[m], nb, h, h), (1, nb, h, h), (fps, nb, h, h), DTYPES[m], cfg)
        _create(g, f"{m}_offsets", (n + 1,), (n + 1,), None, "int64", cfg)[:] = np.array(offsets[m], np.int64)
        nd = max(len(dates[m]), 1)
        _create(g, f"{m}_dates", (len(dates[m]),), (nd,), None, "int32", cfg)[:] = np.array(dates[m], np.int32)
    g.attrs["dataprep"] = {"shard": k, "config": cfg.fingerprint(), "rows": rows, "errors": errors,
                           "stats": stats.d}  # fmt: skip
    bytes_out = dir_bytes(tmp)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process committed the same shard first (same input, same bytes): keep theirs.
        shutil.rmtree(tmp, ignore_errors=True)
    kinds: dict[str, int] = {}
    for e in errors:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    return {"shard": k, "sets": n, "rows": len(items), "rejects": kinds, "bytes_in": bytes_in, "bytes_out": bytes_out}


def read_shard_meta(path: str) -> dict | None:
    """The shard's dataprep attributes (plain JSON, no zarr needed), or None when it is not a complete shard."""
    try:
        with open(os.path.join(path, "zarr.json")) as f:
            return json.load(f)["attributes"]["dataprep"]
    except (OSError, ValueError, KeyError):
        return None
