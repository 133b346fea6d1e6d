"""Every error kind: the bad row lands in errors.parquet with its kind and a message naming the file;
the good rows are converted; the exit status is 1; --strict stops at the first."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataprep.errors import KINDS
from tests.dataprep.dp_helpers import HR, S2, convert_inproc


def _good(raw, i: int) -> dict:
    return json.loads((raw / "manifest.jsonl").read_text().splitlines()[i])


@pytest.fixture(scope="module")
def bad_manifest(raw, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    for sub in ("hr", "osm", "s2", "s1"):
        shutil.copytree(raw / sub, d / sub)
    rows = [_good(raw, i) for i in range(12)]
    good = next(r for r in rows if r.get("hr") and r.get("s2") and r.get("s1"))
    rng = np.random.default_rng(0)

    def variant(kind, **kw):
        return json.dumps({**good, "id": f"bad-{kind}", **kw})

    def s2file(name, a):
        np.save(d / "s2" / name, a)
        return [{"path": f"s2/{name}", "date": "2021-05-01"}]

    trunc = (d / good["hr"]).read_bytes()
    (d / "hr" / "trunc.png").write_bytes(trunc[: len(trunc) // 2])
    Image.fromarray(rng.integers(0, 60000, (HR, HR)).astype(np.uint16)).save(d / "hr" / "u16.png")
    s1nan = np.zeros((2, S2, S2), np.float32)
    s1nan[1, 3, 4] = np.nan
    np.save(d / "s1" / "nan.npy", s1nan)
    (d / "s2" / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    (d.parent / "outside.png").write_bytes(trunc)
    lines = [json.dumps(r) for r in rows]
    lines += [
        variant("missing_file", hr="hr/nope.png"),
        variant("corrupt_file", hr="hr/trunc.png"),
        variant("corrupt_file2", s2=[{"path": "s2/garbage.npy", "date": "2021-01-01"}]),
        variant("wrong_band_count", s2=s2file("b7.npy", np.zeros((7, S2, S2), np.uint16))),
        variant("wrong_size", s2=s2file("big.npy", np.zeros((10, S2 + 3, S2 + 3), np.uint16))),
        variant("wrong_dtype", hr="hr/u16.png"),
        variant("wrong_dtype2", s2=s2file("f.npy", np.zeros((10, S2, S2), np.float32))),
        variant("nan_inf", s1=[{"path": "s1/nan.npy", "date": "2021-02-02"}]),
        variant("value_out_of_range", s2=s2file("neg.npy", -np.ones((10, S2, S2), np.int32))),
        json.dumps({**good, "id": "none-empty-lists", "s2": [], "s1": []}),  # [] means "none", like null
        variant("bad_date", s1=[{**good["s1"][0], "date": "2021-13-45"}]),
        variant("duplicate_date", s2=[good["s2"][0], {**good["s2"][1], "date": good["s2"][0]["date"]}]),
        variant("lonlat_out_of_range", lat=95.0),
        variant("path_escapes_root", hr="../outside.png"),
        variant("empty_set", hr=None, s2=None, s1=None),
        variant("empty_set2", hr=None, s2=[], s1=[]),
        json.dumps({k: v for k, v in good.items() if k != "lon"} | {"id": "bad-missing_field"}),
        json.dumps({**good}),  # duplicate id: the first occurrence stays
        '{"id": "bad-malformed_row", "lon": 1.0, ',  # truncated line
    ]
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return d, good["id"]


def test_every_error_kind(bad_manifest, tmp_path):
    d, dup_id = bad_manifest
    rc = convert_inproc(d / "manifest.jsonl", tmp_path / "out", root=str(d))
    assert rc == 1
    idx = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    errs = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert len(idx) == 13 and not any(r["id"].startswith("bad-") for r in idx)
    none = next(r for r in idx if r["id"] == "none-empty-lists")
    assert none["has_hr"] and none["n_s2"] == none["n_s1"] == 0 and none["s2_dates"] == none["s1_dates"] == []
    got = {(e["id"] or f"row{e['manifest_row']}"): e for e in errs}
    want = {"bad-" + k: k.rstrip("2") for k in (
        "missing_file", "corrupt_file", "corrupt_file2", "wrong_band_count", "wrong_size", "wrong_dtype",
        "wrong_dtype2", "nan_inf", "value_out_of_range", "bad_date", "duplicate_date",
        "lonlat_out_of_range", "path_escapes_root", "empty_set", "empty_set2", "missing_field")}  # fmt: skip
    for sid, kind in want.items():
        assert got[sid]["kind"] == kind, (sid, got[sid])
        assert got[sid]["kind"] in KINDS
    assert got[dup_id]["kind"] == "duplicate_id" and got[dup_id]["manifest_row"] == 29
    malformed = [e for e in errs if e["kind"] == "malformed_row"]
    assert len(malformed) == 1 and "line 31" in malformed[0]["message"]
    # messages name the offending file
    assert "nope.png" in got["bad-missing_file"]["message"] and "trunc.png" in got["bad-corrupt_file"]["message"]
    assert "nan.npy" in got["bad-nan_inf"]["message"] and "b7.npy" in got["bad-wrong_band_count"]["message"]
    assert "outside.png" in got["bad-path_escapes_root"]["message"]
    # exactly one of index / errors per manifest row
    rows = sorted([r["manifest_row"] for r in idx] + [e["manifest_row"] for e in errs])
    assert rows == list(range(31))
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["rejected"] == len(errs) == 18 and info["manifest"]["rows"] == 31


def test_strict_stops_at_first(bad_manifest, tmp_path):
    d, _ = bad_manifest
    assert convert_inproc(d / "manifest.jsonl", tmp_path / "out", strict=True) == 2
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_crop_accepts_larger_frames(bad_manifest, tmp_path):
    d, _ = bad_manifest
    convert_inproc(d / "manifest.jsonl", tmp_path / "out", crop=True)
    errs = pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()
    assert "bad-wrong_size" not in {e["id"] for e in errs}
    idx = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()}
    assert idx["bad-wrong_size"]["n_s2"] == 1


def test_csv_and_parquet_manifests_equal_jsonl(raw, dataset, tmp_path):
    import pyarrow as pa

    rows = [_good(raw, i) for i in range(12)]
    keys = ["id", "lon", "lat", "label", "hr", "osm", "s2", "s1"]
    with open(raw / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in rows:
            w.writerow([json.dumps(r[k]) if k in ("s2", "s1") and r.get(k) else r.get(k, "") for k in keys])
    table = pa.table({k: [json.dumps(r.get(k)) if k in ("s2", "s1") else r.get(k) for r in rows] for k in keys})
    pq.write_table(table, raw / "m.parquet")
    want = pq.read_table(dataset / "index.parquet").drop(["source"])
    for name in ("m.csv", "m.parquet"):
        assert convert_inproc(raw / name, tmp_path / name) == 0
        got = pq.read_table(tmp_path / name / "index.parquet").drop(["source"])
        assert got.equals(want), name


@pytest.mark.filterwarnings("ignore::UserWarning")  # rasterio: the test tifs carry no georeference
def test_geotiff_errors(raw, tmp_path):
    """Per-band folders with unequal band grids, truncated GeoTIFFs, folders lacking a band."""
    rasterio = pytest.importorskip("rasterio")

    def tif(path, a):
        with rasterio.open(path, "w", driver="GTiff", width=a.shape[2], height=a.shape[1], count=a.shape[0],
                           dtype=a.dtype) as f:  # fmt: skip
            f.write(a)

    rng = np.random.default_rng(1)
    bands = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
    ok, bad, lacking = tmp_path / "ok", tmp_path / "unequal", tmp_path / "lacking"
    for d in (ok, bad, lacking):
        d.mkdir()
    want = []
    for b in bands:
        n = S2 // 2 if b in ("B05", "B11") else S2  # 20 m bands at half resolution, as in BigEarthNet
        a = rng.integers(0, 5000, (1, n, n)).astype(np.uint16)
        tif(ok / f"P_{b}.tif", a)
        tif(bad / f"P_{b}.tif", a if b != "B06" else a[:, :5, :5])  # 5 does not divide 16
        if b != "B8A":
            tif(lacking / f"P_{b}.tif", a)
        want.append(np.kron(a[0], np.ones((S2 // n, S2 // n), np.uint16)))
    full = rng.integers(0, 5000, (13, S2, S2)).astype(np.uint16)
    tif(tmp_path / "full.tif", full)
    data = (tmp_path / "full.tif").read_bytes()
    (tmp_path / "trunc.tif").write_bytes(data[: len(data) // 3])
    rows = [{"id": name, "lon": 1.0, "lat": 2.0, "s2": [{"path": path, "date": "2020-01-01"}]}
            for name, path in (("ok", "ok"), ("unequal", "unequal"), ("lacking", "lacking"),
                               ("full", "full.tif"), ("trunc", "trunc.tif"))]  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert convert_inproc(tmp_path / "m.jsonl", tmp_path / "out") == 1
    errs = {e["id"]: e for e in pq.read_table(tmp_path / "out" / "errors.parquet").to_pylist()}
    assert errs["unequal"]["kind"] == "wrong_size" and "band B6 " in errs["unequal"]["message"]
    assert errs["lacking"]["kind"] == "wrong_band_count" and "B8A" in errs["lacking"]["message"]
    assert errs["trunc"]["kind"] == "corrupt_file" and "trunc.tif" in errs["trunc"]["message"]
    from dataprep.reader import DatasetReader

    r = DatasetReader(tmp_path / "out")
    assert [r.meta(i)["id"] for i in range(len(r))] == ["ok", "full"]
    assert np.array_equal(r.read(0, "s2")[0], np.stack(want))
    assert np.array_equal(r.read(1, "s2")[0], full[[1, 2, 3, 4, 5, 6, 7, 8, 11, 12]])  # 13 bands: ESA L1C order
