"""Real data from ../shared/data: build manifests, convert, compare values read back with the source files
(read independently with rasterio / Pillow / numpy). Skipped when the folder is absent (a fresh clone).

Stand-ins, said plainly: TerraMind's S2RGB plays the HR image (same 10 m grid, not 0.3 m); EuroSAT, LEVIR and
eo-learn carry no per-frame dates we can use, so fixed dates are given; BigEarthNet dates come from the names."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import SHARED_DATA, convert_inproc

rasterio = pytest.importorskip("rasterio")
if not SHARED_DATA.is_dir():
    pytest.skip(f"real sample data not found at {SHARED_DATA} (not part of the repository)", allow_module_level=True)
D = SHARED_DATA.resolve()


def _tif(p) -> np.ndarray:
    with rasterio.open(p) as f:
        return f.read()


def _lonlat(p) -> tuple[float, float]:
    from rasterio.warp import transform

    with rasterio.open(p) as f:
        b = f.bounds
        xs, ys = transform(f.crs, "EPSG:4326", [(b.left + b.right) / 2], [(b.top + b.bottom) / 2])
    return float(xs[0]), float(ys[0])


def _write(tmp_path, rows) -> os.PathLike:
    m = tmp_path / "manifest.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return m


def test_eurosat_13band(tmp_path):
    classes = sorted(os.listdir(D / "eurosat100" / "tif"))
    rows = []
    for c, name in enumerate(classes):
        for p in sorted(glob.glob(str(D / "eurosat100" / "tif" / name / "*.tif")))[:2]:
            stem = os.path.splitext(os.path.basename(p))[0]
            gj = json.loads((D / "eurosat100" / "label" / name / f"{stem}.geojson").read_text())
            ring = np.array(gj["features"][0]["geometry"]["coordinates"][0])
            rows.append({"id": stem, "lon": float(ring[:, 0].mean()), "lat": float(ring[:, 1].mean()), "label": c,
                         "s2": [{"path": p, "date": "2017-06-01", "bands": "eurosat13"}]})  # fmt: skip
    out = tmp_path / "out"
    assert convert_inproc(_write(tmp_path, rows), out, hr_size=64, s2_size=64, root=str(D)) == 0
    r = DatasetReader(out)
    assert len(r) == len(rows) == 20
    sel = [1, 2, 3, 4, 5, 6, 7, 12, 10, 11]  # EuroSAT tif order B1..B12 then B8A -> B2..B8, B8A, B11, B12
    for i, row in enumerate(rows):
        src = _tif(row["s2"][0]["path"])
        assert np.array_equal(r.read(i, "s2")[0], src[sel])
        assert r.meta(i)["label"] == row["label"] and not r.meta(i)["has_hr"]
        assert np.array_equal(r.read(i, "s2", (5, 6, 40, 50), [0])[0], src[sel][:, 5:40, 6:50])


def test_bigearthnet_band_folders(tmp_path):
    s2_dirs = sorted(glob.glob(str(D / "bigearthnet" / "BigEarthNet-S2-Example" / "*")))
    s1_dirs = sorted(glob.glob(str(D / "bigearthnet" / "BigEarthNet-S1-Example" / "*")))
    rows = []
    for s2 in s2_dirs:
        name = os.path.basename(s2)
        tile = "_".join(name.split("_")[-2:])
        s1 = next(x for x in s1_dirs if x.endswith(tile))
        lon, lat = _lonlat(glob.glob(os.path.join(s2, "*_B02.tif"))[0])
        rows.append({"id": name, "lon": lon, "lat": lat,
                     "s2": [{"path": s2, "date": name.split("_")[2][:8]}],
                     "s1": [{"path": s1, "date": os.path.basename(s1).split("_")[4][:8]}]})  # fmt: skip
    out = tmp_path / "out"
    assert convert_inproc(_write(tmp_path, rows), out, hr_size=120, s2_size=120) == 0
    r = DatasetReader(out)
    assert len(r) == 6
    bands = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    for i, row in enumerate(rows):
        folder = row["s2"][0]["path"]
        want = []
        for b in bands:
            a = _tif(glob.glob(os.path.join(folder, f"*_{b}.tif"))[0])[0]
            want.append(np.kron(a, np.ones((120 // a.shape[0],) * 2, a.dtype)))  # 20 m bands: 60 -> 120 px
        assert np.array_equal(r.read(i, "s2")[0], np.stack(want))
        s1 = row["s1"][0]["path"]
        vv, vh = (_tif(glob.glob(os.path.join(s1, f"*_{p}.tif"))[0])[0] for p in ("VV", "VH"))
        assert np.array_equal(r.read(i, "s1")[0], np.stack([vv, vh]).astype(np.float32))
        import datetime as dt

        d = dt.date(int(row["s2"][0]["date"][:4]), int(row["s2"][0]["date"][4:6]), int(row["s2"][0]["date"][6:]))
        assert r.meta(i)["s2_dates"][0] == (d - dt.date(1970, 1, 1)).days


def test_terramind_co_registered(tmp_path):
    sites = sorted(os.path.splitext(n)[0] for n in os.listdir(D / "terramind" / "S2L2A"))
    rows = []
    for s in sites:
        lon, lat = _lonlat(D / "terramind" / "S2L2A" / f"{s}.tif")
        rows.append({"id": s, "lon": lon, "lat": lat, "hr": f"S2RGB/{s}.tif", "osm": f"LULC/{s}.tif",
                     "s2": [{"path": f"S2L2A/{s}.tif", "date": "2020-07-01"},
                            {"path": f"S2L1C/{s}.tif", "date": "2020-06-30"}],
                     "s1": [{"path": f"S1RTC/{s}.tif", "date": "2020-07-02"}]})  # fmt: skip
    # relative paths resolve against the manifest's folder: place the manifest next to the data via a symlink dir
    link = tmp_path / "tm"
    link.symlink_to(D / "terramind")
    m = link.parent / "tm_manifest.jsonl"
    m.write_text("\n".join(json.dumps({**r, **{k: f"tm/{r[k]}" for k in ("hr", "osm")},
                                       "s2": [{**f, "path": "tm/" + f["path"]} for f in r["s2"]],
                                       "s1": [{**f, "path": "tm/" + f["path"]} for f in r["s1"]]}) for r in rows))
    out = tmp_path / "out"
    assert convert_inproc(m, out, hr_size=224, s2_size=224, shard_size=2) == 0
    r = DatasetReader(out)
    assert len(r) == 5
    for i, s in enumerate(sites):
        t = D / "terramind"
        assert np.array_equal(r.read(i, "hr"), _tif(t / "S2RGB" / f"{s}.tif"))
        assert np.array_equal(r.read(i, "osm"), _tif(t / "LULC" / f"{s}.tif")[0])
        s2 = r.read(i, "s2")  # stored in date order: L1C (06-30) first, then L2A (07-01)
        assert np.array_equal(s2[0], _tif(t / "S2L1C" / f"{s}.tif")[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]])
        assert np.array_equal(s2[1], _tif(t / "S2L2A" / f"{s}.tif")[[1, 2, 3, 4, 5, 6, 7, 8, 10, 11]])
        assert np.array_equal(r.read(i, "s1")[0], _tif(t / "S1RTC" / f"{s}.tif").astype(np.float32))


def test_eolearn_float_time_series(tmp_path):
    p = D / "eolearn" / "REFERENCE_SCENES.npy"
    src = np.load(p)  # (5, 101, 100, 13) reflectance 0..1
    frames = [{"path": str(p), "date": f"2017-0{t + 1}-15", "index": t, "scale": 10000} for t in range(len(src))]
    rows = [{"id": "eolearn-ref", "lon": 14.5, "lat": 46.0, "s2": frames},
            {"id": "eolearn-noscale", "lon": 14.5, "lat": 46.0, "s2": [{"path": str(p), "date": "2017-01-01",
                                                                         "index": 0}]}]  # fmt: skip
    out = tmp_path / "out"
    assert convert_inproc(_write(tmp_path, rows), out, hr_size=64, s2_size=64, crop=True) == 1
    r = DatasetReader(out)
    assert len(r) == 1
    y, x = (101 - 64) // 2, (100 - 64) // 2
    sel = [1, 2, 3, 4, 5, 6, 7, 8, 11, 12]  # L1C order B1..B8, B8A, B9, B10, B11, B12
    want = np.rint(src[:, y : y + 64, x : x + 64, :].astype(np.float64) * 1e4).astype(np.uint16)
    assert np.array_equal(r.read(0, "s2"), want[..., sel].transpose(0, 3, 1, 2))
    import pyarrow.parquet as pq

    err = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["kind"] for e in err] == ["wrong_dtype"] and "REFERENCE_SCENES.npy" in err[0]["message"]


def test_levir_hr_png(tmp_path):
    rows = []
    for p in sorted(glob.glob(str(D / "levir-cd" / "A" / "*.png"))):
        lab = D / "levir-cd" / "label" / os.path.basename(p)
        rows.append({"id": os.path.basename(p), "lon": 0.0, "lat": 0.0, "hr": p,
                     **({"osm": str(lab)} if lab.exists() else {})})  # fmt: skip
    out = tmp_path / "out"
    rc = convert_inproc(_write(tmp_path, rows), out, hr_size=256, s2_size=64)
    r = DatasetReader(out)
    import pyarrow.parquet as pq

    errs = pq.read_table(out / "errors.parquet").to_pylist()
    assert len(r) >= 8 and len(r) + len(errs) == len(rows) and rc == (1 if errs else 0)
    assert all(e["kind"] == "wrong_size" for e in errs)  # the few non-256 tiles
    for i in range(len(r)):
        row = next(x for x in rows if x["id"] == r.meta(i)["id"])
        assert np.array_equal(r.read(i, "hr"), np.asarray(Image.open(row["hr"])).transpose(2, 0, 1))
        if "osm" in row:
            assert np.array_equal(r.read(i, "osm"), np.asarray(Image.open(row["osm"])))
        else:
            assert (r.read(i, "osm") == 255).all()
