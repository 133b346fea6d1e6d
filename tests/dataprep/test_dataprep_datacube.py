"""NetCDF4/HDF5 datacubes (WorldCereal, openeo-gfmap from ../shared/data, plus CF-scaled cubes written here from
their values): converted, then compared value by value with the source read independently with h5py, applying
the documented decoding (`_Unsigned`, fill values, scale_factor/add_offset, openEO's dB = 20 log10(DN) - 83).
Also the missing-band policy, the SCL cloud fraction against a hand count, lon/lat from the georeferencing, and
broken cubes ending in errors.parquet. The real-data tests skip when ../shared/data is absent."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import SHARED_DATA, convert_inproc

h5py = pytest.importorskip("h5py")
D = SHARED_DATA.resolve()
WC = D / "worldcereal" / "worldcereal_preprocessed_inputs.nc"
GF2 = D / "openeo-gfmap" / "cdse_sentinel2_l2a.nc"
GF1 = D / "openeo-gfmap" / "cdse_sentinel1_grd.nc"
real = pytest.mark.skipif(not WC.exists() or not GF2.exists(), reason=f"real sample cubes not found under {D}")
S2 = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
DAYS_1990 = (dt.date(1990, 1, 1) - dt.date(1970, 1, 1)).days


def _write(tmp_path, rows, name="manifest.jsonl"):
    m = tmp_path / name
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return m


def _u16(f, name) -> np.ndarray:
    """An openEO int16 variable with `_Unsigned = true`, read as the unsigned values it stores."""
    assert f[name].attrs["_Unsigned"] in (b"true", "true")
    return f[name][:].view(np.uint16)


def _openeo_db(dn: np.ndarray) -> np.ndarray:
    return (20.0 * np.log10(dn.astype(np.float64)) - 83.0).astype(np.float32)


def _index(out) -> list[dict]:
    return pq.read_table(out / "index.parquet").to_pylist()


def _errors(out) -> dict[str, dict]:
    return {e["id"]: e for e in pq.read_table(out / "errors.parquet").to_pylist()}


@real
def test_worldcereal_cube(tmp_path):
    rows = [{"id": "wc", "s2": {"cube": str(WC), "missing_bands": "zero"},
             "s1": {"cube": str(WC), "units": "openeo_u16"}},
            {"id": "wc-reject", "lon": 5.0, "lat": 50.0, "s2": {"cube": str(WC)}}]  # fmt: skip
    out = tmp_path / "out"
    assert convert_inproc(_write(tmp_path, rows), out, s2_size=100) == 1  # the second row: B8A missing, rejected
    r = DatasetReader(out)
    with h5py.File(WC) as f:
        dates = f["t"][:] + DAYS_1990
        s2 = np.stack([_u16(f, f"S2-L2A-{b}") if b != "B8A" else np.zeros((12, 100, 100), np.uint16)
                       for b in S2], axis=1)  # fmt: skip
        s1 = np.stack([_u16(f, f"S1-SIGMA0-{p}") for p in ("VV", "VH")], axis=1)
        xs, ys, wkt = f["x"][:], f["y"][:], f["crs"].attrs["crs_wkt"].decode()
    nodata = (s2 == 65535).any(1)  # openEO's uint16 no-data value: two whole monthly composites here
    assert nodata.all((1, 2)).sum() == 2
    want = np.where(nodata[:, None], 0, s2)
    got = r.read(0, "s2")
    assert got.dtype == np.uint16 and np.array_equal(got, want)
    assert np.array_equal(r.read(0, "s1"), _openeo_db(s1))
    row = _index(out)[0]
    assert row["s2_dates"] == row["s1_dates"] == dates.tolist()
    assert dt.date(1970, 1, 1) + dt.timedelta(days=row["s2_dates"][0]) == dt.date(2020, 11, 1)
    assert row["s2_missing_bands"] == ["B8A"] and row["s1_missing_bands"] == []
    assert row["s2_nodata"] == nodata.mean((1, 2)).tolist() and row["s2_cloud"] == [None] * 12  # no SCL here
    from rasterio.crs import CRS
    from rasterio.warp import transform

    lon, lat = transform(CRS.from_wkt(wkt), "EPSG:4326", [(xs[0] + xs[-1]) / 2], [(ys[0] + ys[-1]) / 2])
    assert row["lonlat_source"] == "raster" and (row["lon"], row["lat"]) == pytest.approx((lon[0], lat[0]))
    assert 2 < row["lon"] < 7 and 49 < row["lat"] < 52  # Belgium, UTM 31N
    st = json.loads((out / "dataset.json").read_text())["stats"]["s2"]
    good = ~nodata
    assert st["pixels_per_band"] == [int(good.sum())] * 7 + [0] + [int(good.sum())] * 2  # B8A, no-data left out
    assert st["mean"][0] == pytest.approx(s2[:, 0][good].astype(np.float64).mean())
    err = _errors(out)["wc-reject"]
    assert err["kind"] == "wrong_band_count" and "B8A" in err["message"]


def _hand_cloud(scl: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
    """Per frame: pixels of SCL classes 3, 8, 9, 10 over the pixels with data: SCL not 0/1 (no data, defective)
    and no band at its fill value."""
    valid = (scl != 0) & (scl != 1) & (True if fill is None else ~fill)
    cloud = ((scl == 3) | (scl == 8) | (scl == 9) | (scl == 10)) & valid
    return np.array([c.sum() / v.sum() if v.sum() else 1.0 for c, v in zip(cloud, valid)], np.float32)


@real
def test_gfmap_scl_cloud_fraction_and_skip(tmp_path):
    rows = [{"id": "gf", "s2": {"cube": str(GF2)}, "s1": {"cube": str(GF1), "units": "openeo_u16"}}]
    out, out_skip = tmp_path / "out", tmp_path / "skip"
    # 66 x 64 grid: --crop takes the centre 64 rows; gfmap has only B04, B08, B11 of SkySense's bands
    assert convert_inproc(_write(tmp_path, rows), out, s2_size=64, crop=True, missing_bands="zero") == 0
    assert convert_inproc(_write(tmp_path, rows), out_skip, s2_size=64, crop=True, missing_bands="zero",
                          cloud_max=0.5) == 0  # fmt: skip
    with h5py.File(GF2) as f:
        scl = _u16(f, "S2-L2A-SCL")[:, 1:65]
        bands = {b: _u16(f, f"S2-L2A-{b}")[:, 1:65] for b in ("B04", "B08", "B11")}
        dates2 = (f["t"][:] + DAYS_1990).tolist()
    with h5py.File(GF1) as f:
        s1 = np.stack([_u16(f, f"S1-SIGMA0-{p}")[:, 1:65] for p in ("VV", "VH")], axis=1)
        dates1 = (f["t"][:] + DAYS_1990).tolist()
    hand = _hand_cloud(scl)
    assert 0 < (hand <= 0.5).sum() < len(hand)  # the threshold really splits this April's frames
    row = _index(out)[0]
    assert row["s2_cloud"] == pytest.approx(hand.tolist(), abs=1e-7)
    assert row["s2_missing_bands"] == ["B2", "B3", "B5", "B6", "B7", "B8A", "B12"]
    want = np.zeros((12, 10, 64, 64), np.uint16)
    for c, b in ((2, "B04"), (6, "B08"), (8, "B11")):
        want[:, c] = bands[b]
    nodata = np.isin(scl, (0, 1))
    want[np.broadcast_to(nodata[:, None], want.shape)] = 0
    r = DatasetReader(out)
    assert np.array_equal(r.read(0, "s2"), want) and row["s2_dates"] == dates2
    assert np.array_equal(r.read(0, "s1"), _openeo_db(s1)) and row["s1_dates"] == dates1
    clear = ~nodata & ~np.isin(scl, (3, 8, 9, 10))
    st = json.loads((out / "dataset.json").read_text())["stats"]["s2"]
    assert st["pixels_per_band"][2] == int(clear.sum()) and st["pixels_per_band"][0] == 0
    assert st["mean"][2] == pytest.approx(bands["B04"][clear].astype(np.float64).mean())
    keep = hand <= 0.5
    row = _index(out_skip)[0]
    assert row["s2_cloud_skipped"] == int((~keep).sum()) and row["n_s2"] == int(keep.sum())
    assert row["s2_dates"] == [d for d, k in zip(dates2, keep) if k]
    assert np.array_equal(DatasetReader(out_skip).read(0, "s2"), want[keep])


def _cf_cube(path, s2: dict[str, tuple], s1: dict[str, tuple] | None = None, days=None, crs=True):
    """A NetCDF4-like HDF5 file: (t, y, x) int16 variables with CF scale_factor/add_offset/_FillValue, a `t`
    dimension scale in days since 2000-01-01 and (optionally) a UTM 31N grid mapping with x/y coordinates."""
    T, H, W = next(iter(s2.values()))[0].shape
    with h5py.File(path, "w") as f:
        t = f.create_dataset("t", data=np.asarray(days if days is not None else np.arange(T) * 5, np.int32))
        t.attrs["units"] = "days since 2000-01-01"
        t.make_scale("t")
        if crs:
            f.create_dataset("x", data=664005.0 + 10 * np.arange(W)).make_scale("x")
            f.create_dataset("y", data=5612115.0 - 10 * np.arange(H)).make_scale("y")
            f.create_dataset("crs", data=b"").attrs["crs_wkt"] = "EPSG:32631"  # rasterio accepts an EPSG code
        for name, (a, sf, ao, fill) in {**s2, **(s1 or {})}.items():
            ds = f.create_dataset(name, data=a.astype(np.int16))
            ds.attrs["_FillValue"] = np.int16(fill)
            if sf is not None:
                ds.attrs.update({"scale_factor": sf, "add_offset": ao})
            if crs:
                ds.attrs["grid_mapping"] = "crs"
            ds.dims[0].attach_scale(t)


def test_cf_scaled_int16_cube(tmp_path):
    rng = np.random.default_rng(0)
    T, H = 3, 16
    refl = rng.integers(0, 12000, (len(S2), T, H, H))  # reflectance x 1e4, stored as int16 with scale 1e-4
    refl[0, 1, 2, 3] = -32768  # the fill value: no data
    db = rng.uniform(-25, 0, (2, T, H, H))
    s1_int = np.rint((db + 30.0) / 0.001).astype(np.int64)  # dB = int x 0.001 - 30
    s1_int[1, 2, 4, 5] = -32767
    s2v = {f"S2-{b}": (refl[c], 1e-4, 0.0, -32768) for c, b in enumerate(S2)}
    scl = rng.integers(2, 12, (T, H, H))  # every SCL class; no data (0) and defective (1) pixels in frame 2 only
    scl[2, :2] = [[0], [1]]
    s2v["S2-SCL"] = (scl, None, None, -1)
    s1v = {f"S1-{p}": (s1_int[c], 0.001, -30.0, -32767) for c, p in enumerate(("VV", "VH"))}
    _cf_cube(tmp_path / "cube.nc", s2v, s1v, days=[0, 31, 60])
    rows = [{"id": "cf", "lon": 5.0, "lat": 50.6, "s2": {"cube": "cube.nc", "scale": 10000},
             "s1": {"cube": "cube.nc"}},
            {"id": "cf-noscale", "lon": 5.0, "lat": 50.6, "s2": {"cube": "cube.nc"}}]  # fmt: skip
    out = tmp_path / "out"
    assert convert_inproc(_write(tmp_path, rows), out, s2_size=H) == 1
    # independent decode: physical = raw x scale_factor + add_offset, fill -> no data
    with h5py.File(tmp_path / "cube.nc") as f:
        scaled = [k for k in f if "scale_factor" in f[k].attrs]
        phys = {k: f[k][:] * f[k].attrs["scale_factor"] + f[k].attrs["add_offset"] for k in scaled}
        fill = {k: f[k][:] == f[k].attrs["_FillValue"] for k in f if k.startswith("S")}
    s2_bad = np.any([fill[f"S2-{b}"] for b in S2], 0) | (scl <= 1)
    s1_bad = fill["S1-VV"] | fill["S1-VH"]
    want2 = np.stack([np.where(s2_bad, 0, np.rint(phys[f"S2-{b}"] * 1e4)) for b in S2], 1).astype(np.uint16)
    want1 = np.stack([np.where(s1_bad, 0, phys[f"S1-{p}"]) for p in ("VV", "VH")], 1).astype(np.float32)
    r = DatasetReader(out)
    assert np.array_equal(r.read(0, "s2"), want2)
    assert np.array_equal(r.read(0, "s2")[0, 1], refl[1, 0].astype(np.uint16))  # the integers come back exactly
    assert np.array_equal(r.read(0, "s1"), want1)
    row = _index(out)[0]
    assert row["s2_dates"] == [(dt.date(2000, 1, 1) + dt.timedelta(days=d) - dt.date(1970, 1, 1)).days
                               for d in (0, 31, 60)]  # fmt: skip
    assert row["s2_nodata"] == pytest.approx([0.0, 1 / H**2, 2 / H]) and row["s1_nodata"][2] == pytest.approx(1 / H**2)
    assert row["s2_cloud"] == pytest.approx(_hand_cloud(scl, s2_bad).tolist(), abs=1e-7)
    assert row["lonlat_source"] == "manifest" and row["lon"] == 5.0
    assert _errors(out)["cf-noscale"]["kind"] == "wrong_dtype"  # floats after scale_factor need 'scale'


def test_missing_band_policy_on_frame_files(tmp_path):
    """The policy applies to per-frame files too: a 'bands' list without B8A is rejected, or zero-filled."""
    a = np.arange(9 * 8 * 8, dtype=np.uint16).reshape(9, 8, 8)
    np.save(tmp_path / "f.npy", a)
    names = [b for b in S2 if b != "B8A"]
    rows = [{"id": "x", "lon": 1.0, "lat": 2.0, "s2": [{"path": "f.npy", "date": "2021-01-01", "bands": names}]}]
    m = _write(tmp_path, rows)
    assert convert_inproc(m, tmp_path / "rej", s2_size=8) == 1
    assert _errors(tmp_path / "rej")["x"]["kind"] == "wrong_band_count"
    assert convert_inproc(m, tmp_path / "zero", s2_size=8, missing_bands="zero") == 0
    got = DatasetReader(tmp_path / "zero").read(0, "s2")[0]
    assert np.array_equal(got[[0, 1, 2, 3, 4, 5, 6, 8, 9]], a) and not got[7].any()
    assert _index(tmp_path / "zero")[0]["s2_missing_bands"] == ["B8A"]
    st = json.loads((tmp_path / "zero" / "dataset.json").read_text())["stats"]["s2"]
    assert st["pixels_per_band"] == [64] * 7 + [0] + [64] * 2


def test_broken_cubes_end_in_errors(tmp_path):
    rng = np.random.default_rng(1)
    band = {f"S2-{b}": (rng.integers(0, 5000, (2, 8, 8)), None, None, -1) for b in S2}  # plain int16
    _cf_cube(tmp_path / "ok.nc", band)
    _cf_cube(tmp_path / "nogeo.nc", band, crs=False)
    raw = (tmp_path / "ok.nc").read_bytes()
    (tmp_path / "trunc.nc").write_bytes(raw[: len(raw) // 2])
    shutil.copy(tmp_path / "ok.nc", tmp_path / "dup.nc")
    with h5py.File(tmp_path / "dup.nc", "a") as f:
        f["t"][...] = [3, 3]
    rows = [
        {"id": "ok", "s2": {"cube": "ok.nc"}},  # lon/lat from the grid mapping
        {"id": "missing", "lon": 1.0, "lat": 2.0, "s2": {"cube": "nope.nc"}},
        {"id": "truncated", "lon": 1.0, "lat": 2.0, "s2": {"cube": "trunc.nc"}},
        {"id": "no-variable", "lon": 1.0, "lat": 2.0, "s2": {"cube": "ok.nc", "variables": {"B2": "S2-B2-typo"}}},
        {"id": "no-georef", "s2": {"cube": "nogeo.nc"}},
        {"id": "bad-key", "lon": 1.0, "lat": 2.0, "s2": {"cube": "ok.nc", "sacle": 3}},
        {"id": "dup-dates", "lon": 1.0, "lat": 2.0, "s2": {"cube": "dup.nc"}},
        {"id": "s1-int-no-units", "lon": 1.0, "lat": 2.0, "s1": {"cube": "ok.nc", "variables": {"VV": "S2-B02",
                                                                                              "VH": "S2-B03"}}},
    ]  # fmt: skip
    out = tmp_path / "out"
    assert convert_inproc(_write(tmp_path, rows), out, s2_size=8) == 1
    idx, err = _index(out), _errors(out)
    assert [r["id"] for r in idx] == ["ok"] and idx[0]["lonlat_source"] == "raster"
    assert 4 < idx[0]["lon"] < 6 and 50 < idx[0]["lat"] < 51
    want = {"missing": "missing_file", "truncated": "corrupt_file", "no-variable": "wrong_band_count",
            "no-georef": "missing_field", "bad-key": "malformed_row", "dup-dates": "duplicate_date",
            "s1-int-no-units": "wrong_dtype"}  # fmt: skip
    assert {k: e["kind"] for k, e in err.items()} == want
    assert "trunc.nc" in err["truncated"]["message"] and "S2-B2-typo" in err["no-variable"]["message"]


TS = D / "anysat-treesat" / "Abies_alba_1_1005_WEFL_NLF"


@pytest.mark.skipif(not TS.with_suffix(".h5").exists(), reason=f"TreeSatAI-TS sample not found under {D}")
def test_treesat_hr_s2_s1_pair(tmp_path):
    """A true HR + S2 + S1 set: 304 px aerial at 0.2 m over 6 x 6 S2/S1 px (HR:S2 pixel ratio 50.7), resampled to
    the canonical ratio of 32 (192 px HR over 6 px). The aerial tif is IR, G, B, R, as the TreeSatAI benchmark
    archive's documentation gives it (220629_doc_TreeSatAI_benchmark_archive.pdf, quoted by torchgeo's TreeSatAI
    loader), so hr_bands picks R, G, B = 3, 1, 2. The band means over this fir stand agree: 137, 86, 82, 76, IR
    brightest and green above red, as over vegetation."""
    h5, tif = f"{TS}.h5", f"{TS}.tif"
    s1 = {"cube": h5, "array": ["sen-1-asc-data", "sen-1-des-data"],
          "dates": ["sen-1-asc-products", "sen-1-des-products"], "units": "power"}  # fmt: skip
    rows = [{"id": "treesat", "hr": tif, "hr_bands": [3, 1, 2],
             "s2": {"cube": h5, "array": "sen-2-data", "dates": "sen-2-products", "scale": 1},
             "s1": {**s1, "duplicates": "first"}},
            {"id": "treesat-dup-days", "lon": 9.9, "lat": 52.1, "s1": s1}]  # fmt: skip
    out = tmp_path / "out"
    assert convert_inproc(_write(tmp_path, rows), out, hr_size=192, s2_size=6, resample_hr=True) == 1
    r = DatasetReader(out)
    import rasterio
    from rasterio.warp import transform

    with rasterio.open(tif) as f:
        hr = f.read()[[3, 1, 2]].astype(np.float64)
        b = f.bounds
        lon, lat = transform(f.crs, "EPSG:4326", [(b.left + b.right) / 2], [(b.top + b.bottom) / 2])
    # area average by supersampling: 304 x 12 = 192 x 19 = 3648
    want_hr = np.rint(np.repeat(np.repeat(hr, 12, 1), 12, 2).reshape(3, 192, 19, 192, 19).mean((2, 4)))
    assert np.array_equal(r.read(0, "hr"), want_hr.astype(np.uint8))
    day = lambda s: (dt.date(int(s[:4]), int(s[4:6]), int(s[6:8])) - dt.date(1970, 1, 1)).days  # noqa: E731
    with h5py.File(h5) as f:
        s2 = f["sen-2-data"][:]
        d2 = [day(p.decode().split("_")[2]) for p in f["sen-2-products"][:]]
        s1a = np.concatenate([f["sen-1-asc-data"][:], f["sen-1-des-data"][:]])
        d1 = [day(p.decode().split("_")[4]) for k in ("asc", "des") for p in f[f"sen-1-{k}-products"][:]]
    first = {}
    for i, d in enumerate(d1):
        first.setdefault(d, i)  # the first frame of a day (descending passes repeat days: adjacent scenes)
    keep = [first[d] for d in sorted(first)]
    row = _index(out)[0]
    assert row["s2_dates"] == sorted(d2) == d2 and row["s1_dates"] == sorted(first)
    assert len(d1) == 146 and row["n_s1"] == len(first) < 146
    assert np.array_equal(r.read(0, "s2"), np.rint(s2).astype(np.uint16))
    assert np.array_equal(r.read(0, "s1"), (10 * np.log10(s1a[keep].astype(np.float64))).astype(np.float32))
    assert row["lonlat_source"] == "raster" and (row["lon"], row["lat"]) == pytest.approx((lon[0], lat[0]))
    assert 5.8 < row["lon"] < 15 and 47 < row["lat"] < 55  # Germany
    assert _errors(out)["treesat-dup-days"]["kind"] == "duplicate_date"


def test_duplicate_days_keep_first(tmp_path):
    """duplicates='first': of two frames on one day the first in file order is kept (the sample's repeats are
    identical scenes, so this synthetic cube makes them differ)."""
    vals = np.stack([np.full((4, 4), 100), np.full((4, 4), 200), np.full((4, 4), 300)])  # days 7, 3, 7
    _cf_cube(tmp_path / "c.nc", {f"S2-{b}": (vals, None, None, -1) for b in S2}, days=[7, 3, 7], crs=False)
    rows = [{"id": "d", "lon": 1.0, "lat": 2.0, "s2": {"cube": "c.nc", "duplicates": "first"}}]
    assert convert_inproc(_write(tmp_path, rows), tmp_path / "out", s2_size=4) == 0
    got = DatasetReader(tmp_path / "out").read(0, "s2")
    assert got[:, 0, 0, 0].tolist() == [200, 100] and _index(tmp_path / "out")[0]["s2_dates"] == [10957 + 3, 10957 + 7]
