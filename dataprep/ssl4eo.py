"""SSL4EO-S12 v1.1: WebDataset .tar shards whose members are zipped Zarr v2 stores (`<key>.zarr.zip`).

Each store holds `bands` ((sample, time, band, y, x) or (time, band, y, x); S2 int16 DN, S1 float16 dB), a `band`
coordinate (`B01`..`B12`, `vv`/`vh`), `cloud_mask` (S2, same layout without band; nonzero = cloud), `center_lon`,
`center_lat` and `time_` (datetime64[ns]; the WebDataset export names it `time`). `ingest` scans the tars and writes
a manifest whose rows point at the members (`{"cube": "x.tar", "member": ..., "offset": ..., "size": ...}`);
`convert` reads them in place through `read_ssl4eo` (datacube.load_cube), so no sample is ever extracted to disk."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile

import numpy as np

from .errors import Reject
from .schema import S1_BANDS, S2_LAYOUTS, normalise_band_name

SUFFIX = ".zarr.zip"
# Arrays whose chunks ingest needs; the pixel arrays are skipped there (only their metadata is read).
_PIXELS = ("bands/", "cloud_mask/")


def _member_bytes(path: str, member: str, offset: int | None, size: int | None) -> bytes:
    if not os.path.exists(path):
        raise Reject("missing_file", f"{path}: file not found", path)
    try:
        if offset is not None and size is not None:  # recorded by ingest: one seek, no header scan
            with open(path, "rb") as f:
                f.seek(offset)
                b = f.read(size)
            if len(b) != size:
                raise Reject("corrupt_file", f"{path}: member {member} truncated ({len(b)} of {size} bytes)", path)
            return b
        with tarfile.open(path) as t:
            f = t.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise Reject("missing_file", f"{path}: no member {member!r}", path) from None
    except (OSError, tarfile.TarError) as e:
        raise Reject("corrupt_file", f"{path}: unreadable tar: {e}", path) from None


def open_store(data: bytes, where: str, pixels: bool = True):
    """The bytes of a zipped Zarr v2 store -> a read-only zarr group (in memory; pixel chunks only if `pixels`)."""
    import zarr
    from zarr.core.buffer import cpu

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            names = [n for n in z.namelist() if pixels or not n.startswith(_PIXELS) or n.rsplit("/", 1)[-1][:1] == "."]
            d = {n.lstrip("/"): cpu.Buffer.from_bytes(z.read(n)) for n in names if not n.endswith("/")}
        return zarr.open_group(zarr.storage.MemoryStore(d), mode="r", zarr_format=2)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, KeyError) as e:
        raise Reject("corrupt_file", f"{where}: not a readable zipped Zarr v2 store: {e}", where) from None
    except Exception as e:  # zarr raises its own types for broken metadata (GroupNotFoundError, ...)
        raise Reject("corrupt_file", f"{where}: not a readable zipped Zarr v2 store: {type(e).__name__}: {e}",
                     where) from None  # fmt: skip


def _read(g, name: str, where: str) -> np.ndarray:
    try:
        return np.asarray(g[name][...])
    except Exception as e:  # a chunk missing from or garbled in the zip
        raise Reject("corrupt_file", f"{where}: cannot read {name}: {type(e).__name__}: {e}", where) from None


def _pick(a: np.ndarray, ndim: int, sample: int, where: str, name: str) -> np.ndarray:
    """Drop the leading sample axis of a per-file array (64-sample files; a WebDataset member has one)."""
    if a.ndim == ndim + 1:
        if not 0 <= sample < a.shape[0]:
            raise Reject("malformed_row", f"{where}: sample {sample} outside {name}'s {a.shape[0]} samples", where)
        return a[sample]
    if a.ndim != ndim:
        raise Reject("wrong_size", f"{where}: {name} has shape {a.shape}, expected {ndim} or {ndim + 1} axes", where)
    return a


def _dates(g, sample: int, where: str) -> np.ndarray:
    """time_ (or `time` holding datetime64/ns integers) -> int32 days since 1970-01-01."""
    for name in ("time_", "time"):
        if name in g:
            t = _pick(_read(g, name, where), 1, sample, where, name)
            if t.dtype.kind == "M":
                t = t.astype("datetime64[ns]").astype(np.int64)
            elif t.dtype.kind not in "iu" or not (t > 10**15).all():  # a 0..3 time index, not nanoseconds
                continue
            return np.floor_divide(t.astype(np.int64), 86_400 * 10**9).astype(np.int32)
    raise Reject("bad_date", f"{where}: no time_ (datetime64) array", where)


def _band_names(g, n: int, mod: str, where: str) -> tuple[str, ...]:
    if "band" in g:
        names = tuple(normalise_band_name(str(b)) for b in _read(g, "band", where).ravel())
        if len(names) == n:
            return names
    if mod == "s1" and n == 2:
        return S1_BANDS
    layout = {12: "l2a12", 13: "l1c13"}.get(n)
    if mod == "s2" and layout:
        return S2_LAYOUTS[layout]
    raise Reject("wrong_band_count", f"{where}: {n} bands and no band coordinate naming them", where)


def lonlat(g, sample: int, where: str) -> tuple[float, float] | None:
    if "center_lon" not in g or "center_lat" not in g:
        return None
    lon = _pick(_read(g, "center_lon", where), 0, sample, where, "center_lon")
    lat = _pick(_read(g, "center_lat", where), 0, sample, where, "center_lat")
    return float(lon), float(lat)


def read_ssl4eo(spec, mod: str, bands, policy: str):
    """A manifest SSL4EO source (datacube.CubeSpec with `member`) -> ({band: (T, Y, X)}, nodata (T, Y, X),
    dates (T,), cloudy (T, Y, X) bool or None, missing band names), as datacube's readers return them.
    Bands outside SkySense's set (B1, B9, B10) are dropped; S2 pixels 0 in every kept band are no data."""
    where = f"{spec.path}:{spec.member}" if spec.member else spec.path
    if spec.member:
        data = _member_bytes(spec.path, spec.member, spec.offset, spec.size)
    else:
        if not os.path.exists(spec.path):
            raise Reject("missing_file", f"{spec.path}: file not found", spec.path)
        with open(spec.path, "rb") as f:
            data = f.read()
    g = open_store(data, where)
    if "bands" not in g:
        raise Reject("wrong_band_count", f"{where}: no 'bands' array (arrays: {sorted(g.array_keys())})", where)
    sample = spec.sample or 0
    x = _pick(_read(g, "bands", where), 4, sample, where, "bands")  # (T, C, Y, X)
    src = _band_names(g, x.shape[1], mod, where)
    if mod == "s2" and set(src) & set(S1_BANDS) or mod == "s1" and not set(src) <= set(S1_BANDS):
        raise Reject("wrong_band_count", f"{where}: bands {', '.join(src)} are not {mod.upper()}", where)
    missing = [b for b in bands if b not in src]
    if missing and policy == "reject":
        raise Reject("wrong_band_count", f"{where}: no bands {missing} (missing_bands='zero' fills them)", where)
    vals = {b: x[:, src.index(b)] for b in bands if b in src}
    dates = _dates(g, sample, where)
    if len(dates) != x.shape[0]:
        raise Reject("bad_date", f"{where}: {len(dates)} dates for {x.shape[0]} frames", where)
    if mod == "s2":
        nodata = np.all(np.stack([v == 0 for v in vals.values()]), 0)
    else:
        nodata = np.any(np.stack([~np.isfinite(v) for v in vals.values()]), 0)
        vals = {b: v.astype(np.float32) for b, v in vals.items()}
    cloudy = None
    if mod == "s2" and "cloud_mask" in g:
        cm = _pick(_read(g, "cloud_mask", where), 3, sample, where, "cloud_mask")
        if cm.shape != nodata.shape:
            raise Reject("wrong_size", f"{where}: cloud_mask {cm.shape} does not match bands {nodata.shape}", where)
        cloudy = cm != 0
    return vals, nodata, dates, cloudy, missing


def _modality(g, where: str) -> str:
    n = g["bands"].shape[-3]
    return "s1" if _band_names(g, n, "s1" if n == 2 else "s2", where) == S1_BANDS else "s2"


def ingest(tars: list[str], out: str) -> tuple[str, dict]:
    """Scan SSL4EO-S12 v1.1 tars (any mix of S2L1C/S2L2A/S1GRD) -> OUT/manifest.jsonl, one row per sample key.

    The modality of each tar is read from its members' bands; members of one key across tars form one set.
    Returns (manifest path, counts). An unreadable member still gets its row: convert rejects it with the reason."""
    os.makedirs(out, exist_ok=True)
    rows: dict[str, dict] = {}
    counts = {"members": 0, "unreadable": 0, "s2": 0, "s1": 0}
    for tar in tars:
        rel = os.path.relpath(os.path.abspath(tar), os.path.abspath(out))
        mod = None
        with tarfile.open(tar) as t:
            pending = []
            for m in t:
                if not (m.isfile() and m.name.endswith(SUFFIX)):
                    continue
                counts["members"] += 1
                key = os.path.basename(m.name)[: -len(SUFFIX)]
                src = {"cube": rel, "member": m.name, "offset": m.offset_data, "size": m.size}
                row = rows.setdefault(key, {"id": key})
                try:
                    g = open_store(t.extractfile(m).read(), f"{tar}:{m.name}", pixels=False)
                    ll = lonlat(g, 0, f"{tar}:{m.name}")
                    if "bands" in g:
                        mod = mod or _modality(g, f"{tar}:{m.name}")
                    if ll is not None and "lon" not in row:
                        row["lon"], row["lat"] = ll
                except Reject:
                    counts["unreadable"] += 1
                pending.append((row, src))
        mod = mod or "s2"
        for row, src in pending:
            if mod in row:
                raise ValueError(f"{tar}: sample {row['id']} already has {mod} from another tar")
            row[mod] = src
            counts[mod] += 1
    path = os.path.join(out, "manifest.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for row in rows.values():
            f.write(json.dumps(row) + "\n")
    return path, counts
