"""NetCDF4/HDF5 datacubes (one (T, Y, X) variable per band, CF attributes, openEO/WorldCereal style) read with
h5py into whole S2/S1 time series, plus lon/lat from a raster's own georeferencing.

A manifest row points a modality at a cube with `"s2": {"cube": "x.nc", ...}` (see docs/dataprep.md). Decoding
follows CF: `_Unsigned` reinterprets the integers, `_FillValue`/`missing_value` (or the manifest's `nodata`;
65535 for unsigned 16-bit data without either, what openEO writes) mark no-data pixels, then
`scale_factor`/`add_offset` give physical values. Dates come from the time coordinate's `units`
("days since 1990-01-01", also hours/minutes/seconds)."""

from __future__ import annotations

import datetime as _dt
import os
import re
from dataclasses import dataclass

import numpy as np

from .errors import Reject
from .schema import EPOCH, S1_BANDS, S2_BANDS, normalise_band_name
from .ssl4eo import SUFFIX as SSL4EO_SUFFIX
from .ssl4eo import read_ssl4eo

MISSING_POLICIES = ("reject", "zero")
S1_UNITS = ("db", "power", "openeo_u16")
# Sentinel-2 L2A scene classification: 0 no data, 1 saturated/defective; 3 cloud shadow, 8/9 cloud medium/high
# probability, 10 thin cirrus.
SCL_NODATA = (0, 1)
SCL_CLOUD = (3, 8, 9, 10)


@dataclass(kw_only=True, slots=True)
class CubeSpec:
    """A whole S2 or S1 time series in one datacube file."""

    path: str
    variables: dict[str, str] | None = None  # SkySense band name -> variable; default: found by name suffix
    missing_bands: str | None = None  # "reject" | "zero"; None: the dataset's ShardConfig.missing_bands
    scale: float | None = None  # S2: physical value x scale -> stored uint16 (needed for float reflectance)
    units: str | None = None  # S1: "db" | "power" | "openeo_u16" (dB = 20 log10(DN) - 83)
    nodata: float | None = None  # raw no-data value when the file has no _FillValue
    scl: str | None = None  # S2 scene-classification variable; default: a variable named *SCL
    array: str | list[str] | None = None  # instead of per-band variables: (T, C, Y, X) dataset(s), concatenated
    dates: str | list[str] | None = None  # per array: a dataset of product names / ISO dates (else its time axis)
    bands: list[str] | None = None  # band names of an array's C axis (default: SkySense order)
    duplicates: str = "reject"  # a day twice: "reject" the row or keep the "first" frame of that day
    # SSL4EO-S12 v1.1 (dataprep/ssl4eo.py): a zipped Zarr v2 store, alone or a member of a WebDataset tar
    member: str | None = None  # tar member name (`<key>.zarr.zip`); None: `path` is the .zarr.zip itself
    offset: int | None = None  # member's data offset and size in the tar (recorded by ingest-ssl4eo)
    size: int | None = None
    sample: int | None = None  # index along a store's sample axis (64-sample files); default 0


@dataclass(kw_only=True, slots=True)
class Series:
    """A decoded time series: data (T, C, h, w) in the stored dtype, dates (T,) int32, nodata (T, h, w) bool,
    cloud (T,) float32 fraction (NaN: unknown), cloudy (T, h, w) bool or None, missing: zero-filled band names,
    skipped: frames dropped as too cloudy."""

    data: np.ndarray
    dates: np.ndarray
    nodata: np.ndarray
    cloud: np.ndarray
    missing: list[str]
    cloudy: np.ndarray | None = None
    skipped: int = 0


def parse_cube(d: dict, path: str, mod: str) -> CubeSpec:
    """A manifest cube object (path already resolved) -> CubeSpec; raises Reject("malformed_row")."""
    known = {"cube", "variables", "missing_bands", "scale", "units", "nodata", "scl", "array", "dates", "bands",
             "duplicates", "member", "offset", "size", "sample"}  # fmt: skip
    extra = sorted(set(d) - known)
    if extra:
        raise Reject("malformed_row", f"{mod}: unknown cube keys {extra}")
    var = d.get("variables")
    if var is not None and not (isinstance(var, dict) and all(isinstance(v, str) for v in var.values())):
        raise Reject("malformed_row", f"{mod}: 'variables' must map band names to variable names, got {var!r}")
    if d.get("missing_bands") not in (None, *MISSING_POLICIES):
        raise Reject("malformed_row", f"{mod}: missing_bands must be one of {MISSING_POLICIES}")
    if d.get("units") not in (None, *S1_UNITS):
        raise Reject("malformed_row", f"{mod}: units must be one of {S1_UNITS}")
    for k in ("scale", "nodata"):
        if d.get(k) is not None and not isinstance(d[k], int | float):
            raise Reject("malformed_row", f"{mod}: {k} must be a number, got {d[k]!r}")
    for k in ("array", "dates", "bands"):
        v = d.get(k)
        if v is not None and not (isinstance(v, str) and k != "bands" or
                                  isinstance(v, list) and all(isinstance(x, str) for x in v)):
            raise Reject("malformed_row", f"{mod}: {k} must be a name or a list of names, got {v!r}")
    if d.get("member") is not None and not isinstance(d["member"], str):
        raise Reject("malformed_row", f"{mod}: member must be a tar member name, got {d['member']!r}")
    for k in ("offset", "size", "sample"):
        if d.get(k) is not None and (not isinstance(d[k], int) or isinstance(d[k], bool) or d[k] < 0):
            raise Reject("malformed_row", f"{mod}: {k} must be a non-negative int, got {d[k]!r}")
    if d.get("duplicates", "reject") not in ("reject", "first"):
        raise Reject("malformed_row", f"{mod}: duplicates must be 'reject' or 'first'")
    variables = {normalise_band_name(k): v for k, v in var.items()} if var else None
    return CubeSpec(path=path, variables=variables, missing_bands=d.get("missing_bands"), scale=d.get("scale"),
                    units=d.get("units"), nodata=d.get("nodata"), scl=d.get("scl"), array=d.get("array"),
                    dates=d.get("dates"), bands=d.get("bands"), duplicates=d.get("duplicates", "reject"),
                    member=d.get("member"), offset=d.get("offset"), size=d.get("size"),
                    sample=d.get("sample"))  # fmt: skip


def _attr(ds, name):
    v = ds.attrs.get(name)
    if isinstance(v, bytes | np.bytes_):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.size == 1:
        return v.reshape(()).item()
    return v


def _open(path: str):
    import h5py

    if not os.path.exists(path):
        raise Reject("missing_file", f"{path}: file not found", path)
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as e:
        raise Reject("corrupt_file", f"{path}: unreadable NetCDF/HDF5 file: {e}", path) from None


def _cubes(f) -> dict[str, object]:
    return {k: v for k, v in f.items() if hasattr(v, "ndim") and v.ndim == 3}


def _band_of(name: str, wanted) -> str | None:
    """'S2-L2A-B02' -> 'B2', 'S1-SIGMA0-VV' -> 'VV' (the last '-'/'_' token, when it names a wanted band)."""
    tok = normalise_band_name(re.split(r"[-_ ]", name)[-1])
    return tok if tok in wanted else None


_UNITS = re.compile(r"^\s*(days?|hours?|minutes?|seconds?)\s+since\s+(\S+)(?:[ T](\S+))?", re.I)
_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def _dates(f, ds, path: str) -> np.ndarray:
    """The time coordinate of ds's first axis as int32 days since 1970-01-01."""
    t = None
    try:
        if len(ds.dims[0]):
            t = ds.dims[0][0]
    except (RuntimeError, KeyError, IndexError):
        t = None
    if t is None:
        t = next((f[k] for k in ("t", "time") if k in f), None)
    if t is None or t.shape != (ds.shape[0],):
        raise Reject("bad_date", f"{path}: no time coordinate of length {ds.shape[0]} for {ds.name}", path)
    units = _attr(t, "units") or ""
    m = _UNITS.match(units)
    if m is None:
        raise Reject("bad_date", f"{path}: time units {units!r} are not '<unit> since <date>'", path)
    try:
        origin = _dt.date.fromisoformat(m.group(2)[:10])
    except ValueError:
        raise Reject("bad_date", f"{path}: time origin {m.group(2)!r} is not a date", path) from None
    secs = t[:].astype(np.float64) * _SECONDS[m.group(1)[0].lower()]
    days = np.floor(secs / 86400.0).astype(np.int64) + (origin - EPOCH).days
    return days.astype(np.int32)


def _decode(ds, nodata: float | None, path: str) -> tuple[np.ndarray, np.ndarray]:
    """A CF-encoded variable -> (values: float64 when scaled, else integers, (T, Y, X); nodata mask)."""
    try:
        raw = ds[:]
    except (OSError, ValueError) as e:
        raise Reject("corrupt_file", f"{path}: cannot read variable {ds.name}: {e}", path) from None
    if str(_attr(ds, "_Unsigned")).lower() == "true" and raw.dtype.kind == "i":
        raw = raw.view(raw.dtype.str.replace("i", "u"))
    fills = [_attr(ds, k) for k in ("_FillValue", "missing_value") if _attr(ds, k) is not None]
    if nodata is not None:
        fills.append(nodata)
    elif not fills and raw.dtype == np.uint16:
        fills.append(65535)
    bad = np.zeros(raw.shape, bool)
    for v in fills:
        v = np.asarray(v).astype(raw.dtype) if raw.dtype.kind in "ui" else np.asarray(v, raw.dtype)
        bad |= raw == v
    if raw.dtype.kind == "f":
        bad |= ~np.isfinite(raw)
    sf, ao = _attr(ds, "scale_factor"), _attr(ds, "add_offset")
    if sf is not None or ao is not None:
        raw = raw.astype(np.float64) * (1.0 if sf is None else float(sf)) + (0.0 if ao is None else float(ao))
    return raw, bad


def _fit(a: np.ndarray, size: int, crop: bool, path: str) -> np.ndarray:
    from .sources import _fit as fit  # here, not at the top: sources -> manifest -> datacube would cycle

    return fit(a, size, crop, path, "cube grid")


def _read_variables(f, spec: CubeSpec, mod: str, bands, policy: str):
    """One (t, y, x) variable per band -> ({band: values (T, Y, X)}, nodata (T, Y, X), dates (T,), scl or None,
    missing band names)."""
    cubes = _cubes(f)
    if spec.variables is not None:
        names = {b: spec.variables[b] for b in bands if b in spec.variables}
        absent = sorted(set(names.values()) - set(cubes))
        if absent:
            raise Reject("wrong_band_count", f"{spec.path}: variables {absent} not in the file", spec.path)
    else:
        names = {}
        for k in sorted(cubes):
            b = _band_of(k, bands)
            if b is not None and b not in names:
                names[b] = k
    if not names:
        raise Reject("wrong_band_count", f"{spec.path}: no {mod.upper()} band variables found "
                     f"(variables: {sorted(cubes)})", spec.path)  # fmt: skip
    missing = [b for b in bands if b not in names]
    if missing and policy == "reject":
        raise Reject("wrong_band_count", f"{spec.path}: no variable for bands {missing} "
                     "(missing_bands='zero' fills them)", spec.path)  # fmt: skip
    first = cubes[next(iter(names.values()))]
    shape = first.shape
    dates = _dates(f, first, spec.path)
    vals, nodata = {}, np.zeros(shape, bool)
    for b, k in names.items():
        if cubes[k].shape != shape:
            raise Reject("wrong_size", f"{spec.path}: {k} is {cubes[k].shape}, {first.name} {shape}", spec.path)
        vals[b], bad = _decode(cubes[k], spec.nodata, spec.path)
        nodata |= bad
    scl_name = spec.scl or next((k for k in sorted(cubes) if k.upper().endswith("SCL")), None)
    scl = None
    if mod == "s2" and scl_name is not None:
        if scl_name not in cubes or cubes[scl_name].shape != shape:
            raise Reject("wrong_band_count", f"{spec.path}: no SCL variable {scl_name!r} of shape {shape}",
                         spec.path)  # fmt: skip
        scl = _decode(cubes[scl_name], None, spec.path)[0].astype(np.int64)
    return vals, nodata, dates, scl, missing


_STAMP = re.compile(rb"(\d{8})T\d{6}")


def _product_dates(ds, path: str) -> np.ndarray:
    """Dates of a dataset of product names (the first YYYYMMDDThhmmss in each, e.g. S2A_MSIL2A_20200102T102421_...)
    or of ISO date strings, as int32 days since 1970-01-01."""
    out = []
    for v in ds[:]:
        b = v if isinstance(v, bytes) else str(v).encode()
        m = _STAMP.search(b)
        try:
            s = m.group(1).decode() if m else b.decode().strip()[:10]
            d = _dt.date(int(s[:4]), int(s[4:6]), int(s[6:8])) if m else _dt.date.fromisoformat(s)
        except ValueError:
            raise Reject("bad_date", f"{path}: no date in {ds.name} entry {b[:80]!r}", path) from None
        out.append((d - EPOCH).days)
    return np.array(out, np.int32)


def _read_arrays(f, spec: CubeSpec, mod: str, bands, policy: str):
    """(T, C, Y, X) datasets (TreeSatAI-TS `sen-2-data`; several are concatenated, e.g. S1 ascending +
    descending) with their dates -> the same as _read_variables."""
    arrays = [spec.array] if isinstance(spec.array, str) else list(spec.array)
    dnames = [spec.dates] if isinstance(spec.dates, str) else list(spec.dates or [None] * len(arrays))
    if len(dnames) != len(arrays):
        raise Reject("malformed_row", f"{spec.path}: 'dates' must name one dataset per 'array'", spec.path)
    src = tuple(normalise_band_name(b) for b in spec.bands) if spec.bands else bands
    missing = [b for b in bands if b not in src]
    if missing and policy == "reject":
        raise Reject("wrong_band_count", f"{spec.path}: arrays lack bands {missing}", spec.path)
    parts, bads, dates = [], [], []
    for a, dn in zip(arrays, dnames):
        if a not in f or getattr(f[a], "ndim", 0) != 4:
            raise Reject("wrong_band_count", f"{spec.path}: no 4-D (T, C, Y, X) dataset {a!r}", spec.path)
        ds = f[a]
        if ds.shape[1] != len(src):
            raise Reject("wrong_band_count", f"{spec.path}: {a} has {ds.shape[1]} bands, expected {len(src)} "
                         f"({', '.join(src)})", spec.path)  # fmt: skip
        if parts and ds.shape[2:] != parts[0].shape[2:]:
            raise Reject("wrong_size", f"{spec.path}: {a} grid {ds.shape[2:]} differs from {arrays[0]}", spec.path)
        v, bad = _decode(ds, spec.nodata, spec.path)
        if dn is None:
            d = _dates(f, ds, spec.path)
        elif dn not in f or f[dn].shape != (ds.shape[0],):
            raise Reject("bad_date", f"{spec.path}: no dates dataset {dn!r} of length {ds.shape[0]}", spec.path)
        else:
            d = _product_dates(f[dn], spec.path)
        parts.append(v)
        bads.append(bad.any(1))
        dates.append(d)
    v = np.concatenate(parts)
    vals = {b: v[:, src.index(b)] for b in bands if b in src}
    return vals, np.concatenate(bads), np.concatenate(dates), None, missing


def load_cube(spec: CubeSpec, mod: str, size: int, crop: bool = False, missing_default: str = "reject",
              cloud_max: float | None = None) -> Series:  # fmt: skip
    """A cube file -> the modality's Series on the dataset grid, sorted by date; S2 (T, 10, size, size) uint16,
    S1 (T, 2, size, size) float32 dB. No-data pixels are stored as 0 and flagged in `nodata`."""
    bands = S2_BANDS if mod == "s2" else S1_BANDS
    policy = spec.missing_bands or missing_default
    if spec.member is not None or spec.path.lower().endswith(SSL4EO_SUFFIX):
        vals, nodata, dates, scl, missing = read_ssl4eo(spec, mod, bands, policy)  # scl: a cloud mask (bool)
    else:
        with _open(spec.path) as f:
            read = _read_arrays if spec.array is not None else _read_variables
            vals, nodata, dates, scl, missing = read(f, spec, mod, bands, policy)
    T = len(dates)
    cloud, cloudy = np.full(T, np.nan, np.float32), None
    nodata = _fit(nodata, size, crop, spec.path)
    if scl is not None:
        scl = _fit(scl, size, crop, spec.path)
        if scl.dtype != bool:  # SCL classes; a bool array is a cloud mask already
            nodata = nodata | np.isin(scl, SCL_NODATA)
        n_data = (~nodata).sum((1, 2))
        cloudy = (scl if scl.dtype == bool else np.isin(scl, SCL_CLOUD)) & ~nodata
        n_cloud = cloudy.sum((1, 2))
        cloud = np.where(n_data > 0, n_cloud / np.maximum(n_data, 1), 1.0).astype(np.float32)
    out = np.zeros((T, len(bands), size, size), np.uint16 if mod == "s2" else np.float32)
    for c, b in enumerate(bands):
        if b in vals:
            out[:, c] = _physical(_fit(vals[b], size, crop, spec.path), nodata, mod, spec, b)
    order = np.argsort(dates, kind="stable")
    if len(np.unique(dates)) != len(dates):
        if spec.duplicates != "first":
            raise Reject("duplicate_date", f"{spec.path}: the time coordinate repeats a day "
                         "(duplicates='first' keeps the first frame of each day)", spec.path)  # fmt: skip
        order = order[np.unique(dates[order], return_index=True)[1]]  # first frame (file order) of each day
    dates, out, nodata, cloud = dates[order], out[order], nodata[order], cloud[order]
    cloudy = None if cloudy is None else cloudy[order]
    T = len(dates)
    keep = np.ones(T, bool) if cloud_max is None else ~(cloud > cloud_max)  # NaN (unknown) is kept
    return Series(data=np.ascontiguousarray(out[keep]), dates=dates[keep], nodata=nodata[keep], cloud=cloud[keep],
                  missing=missing, cloudy=None if cloudy is None else cloudy[keep],
                  skipped=int((~keep).sum()))  # fmt: skip


def _physical(v: np.ndarray, nodata: np.ndarray, mod: str, spec: CubeSpec, band: str) -> np.ndarray:
    """Decoded values of one band (T, h, w) -> stored values (0 where nodata)."""
    good = ~nodata
    if mod == "s2":
        if v.dtype.kind == "f" and spec.scale is None:
            raise Reject("wrong_dtype", f"{spec.path}: {band} decodes to floats; S2 needs 'scale' (e.g. 10000)",
                         spec.path)  # fmt: skip
        x = v.astype(np.float64) * (1.0 if spec.scale is None else spec.scale)
        x = np.rint(np.where(good, x, 0.0))
        if x.size and (x.min() < 0 or x.max() > 65535):
            raise Reject("value_out_of_range", f"{spec.path}: {band} values {x.min()}..{x.max()} outside 0..65535",
                         spec.path)  # fmt: skip
        return x.astype(np.uint16)
    units = spec.units or ("db" if v.dtype.kind == "f" else None)
    if units is None:
        raise Reject("wrong_dtype", f"{spec.path}: {band} is integer; S1 cubes need 'units' {S1_UNITS}", spec.path)
    x = v.astype(np.float64)
    if units == "openeo_u16":  # openeo-gfmap compress_backscatter_uint16: DN = 10^((dB + 83) / 20), 0 = no data
        good = good & (x > 0)
        nodata |= ~good
        x = 20.0 * np.log10(np.where(good, x, 1.0)) - 83.0
    elif units == "power":
        good = good & (x > 0)
        nodata |= ~good
        x = 10.0 * np.log10(np.where(good, x, 1.0))
    return np.where(good, x, 0.0).astype(np.float32)


def lonlat_of(path: str) -> tuple[float, float] | None:
    """Centre of a georeferenced raster (GeoTIFF via rasterio, or a CF cube's grid_mapping + x/y) in WGS84
    degrees; None when the file carries no usable georeferencing."""
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.warp import transform

    low = path.lower()
    if low.endswith((".tif", ".tiff")):
        import rasterio

        try:
            with rasterio.open(path) as f:
                if f.crs is None:
                    return None
                crs, b = f.crs, f.bounds
                x, y = (b.left + b.right) / 2, (b.top + b.bottom) / 2
        except (rasterio.errors.RasterioError, OSError):
            return None
    elif low.endswith((".nc", ".h5", ".hdf5", ".nc4")) and os.path.exists(path):
        try:
            with _open(path) as f:
                cube = next(iter(_cubes(f).values()), None)
                gm = _attr(cube, "grid_mapping") if cube is not None else None
                if gm is None or gm not in f or "x" not in f or "y" not in f:
                    return None
                wkt = _attr(f[gm], "crs_wkt") or _attr(f[gm], "spatial_ref")
                xs, ys = f["x"][:], f["y"][:]
            crs = CRS.from_user_input(wkt)
        except (Reject, CRSError, TypeError):
            return None
        x, y = (float(xs.min()) + float(xs.max())) / 2, (float(ys.min()) + float(ys.max())) / 2
    else:
        return None
    lon, lat = transform(crs, "EPSG:4326", [x], [y])
    return float(lon[0]), float(lat[0])
