"""SSL4EO-S12 v1.1 ingest: SYNTHETIC WebDataset tars written here from the dataset's public README schema (zipped
Zarr v2 stores with `bands` (sample, time, band, y, x), a `band` coordinate, `cloud_mask`, `center_lon/lat`,
`time_` datetime64[ns]); no real SSL4EO data is read. Converted end to end, compared value by value with the
fixture; a corrupt zip and a store without `bands` end in errors.parquet."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import S2, convert_inproc, run_dataprep

zarr = pytest.importorskip("zarr")
L2A = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")
KEEP = [L2A.index(b) for b in ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")]
T = 3


def _zarr_zip(tmp, name: str, arrays: dict[str, np.ndarray]) -> bytes:
    """A zipped Zarr v2 store (what xarray's to_zarr + zip gives: one array per variable, time chunked apart)."""
    d = tmp / f"{name}.zarr"
    g = zarr.open_group(zarr.storage.LocalStore(d), mode="w", zarr_format=2)
    for k, a in arrays.items():
        chunks = (1, 1, *a.shape[2:]) if a.ndim >= 4 else a.shape
        g.create_array(k, shape=a.shape, dtype=a.dtype, chunks=chunks, fill_value=None)[...] = a
    zarr.consolidate_metadata(zarr.storage.LocalStore(d))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for root, _, files in os.walk(d):
            for f in files:
                p = os.path.join(root, f)
                z.write(p, os.path.relpath(p, d))
    return buf.getvalue()


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, b in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(b)
            t.addfile(info, io.BytesIO(b))


def _sample(rng, mod: str, k: int) -> dict[str, np.ndarray]:
    days = np.array(["2021-06-02", "2020-12-01", "2021-03-15"], "datetime64[D]") + k
    out = {"center_lon": np.array([10.5 + k]), "center_lat": np.array([-33.25 + k]),
           "time_": (days.astype("datetime64[ns]") + np.timedelta64(37_801, "s"))[None]}  # fmt: skip
    if mod == "s2":
        x = rng.integers(1, 12000, (1, T, 12, S2, S2)).astype(np.int16)
        x[0, 1, :, :2, :] = 0  # no-data rows: 0 in every band
        out |= {"bands": x, "band": np.array(L2A), "cloud_mask": (rng.random((1, T, S2, S2)) < 0.3).astype(np.uint8)}
    else:
        out |= {"bands": rng.normal(-15, 5, (1, T, 2, S2, S2)).astype(np.float16), "band": np.array(["vv", "vh"])}
    return out


@pytest.fixture
def tars(tmp_path):
    rng = np.random.default_rng(0)
    src = {m: {k: _sample(rng, m, i) for i, k in enumerate(("0080717", "0060573"))} for m in ("s2", "s1")}
    s2 = {f"{k}.zarr.zip": _zarr_zip(tmp_path, f"s2_{k}", a) for k, a in src["s2"].items()}
    s2["bad_zip.zarr.zip"] = b"PK\x03\x04 this is not a zip archive"
    nob = {k: v for k, v in _sample(rng, "s2", 5).items() if k not in ("bands", "band")}
    s2["no_bands.zarr.zip"] = _zarr_zip(tmp_path, "nob", nob)
    s1 = {f"{k}.zarr.zip": _zarr_zip(tmp_path, f"s1_{k}", a) for k, a in src["s1"].items()}
    (tmp_path / "S2L2A").mkdir()
    (tmp_path / "S1GRD").mkdir()
    _tar(tmp_path / "S2L2A" / "ssl4eos12_shard_000001.tar", s2)
    _tar(tmp_path / "S1GRD" / "ssl4eos12_shard_000001.tar", s1)
    return tmp_path, src


def test_ssl4eo_ingest_convert_value_by_value(tars):
    tmp, src = tars
    p = run_dataprep("ingest-ssl4eo", "--tar", str(tmp / "S2L2A" / "ssl4eos12_shard_000001.tar"),
                     "--tar", str(tmp / "S1GRD" / "ssl4eos12_shard_000001.tar"), "--out", str(tmp / "m"),
                     check=0)  # fmt: skip
    man = tmp / "m" / "manifest.jsonl"
    assert p.stdout.strip() == str(man) and "unreadable=1" in p.stderr
    assert convert_inproc(man, tmp / "out") == 1  # two rows rejected
    err = {e["id"]: e for e in pq.read_table(tmp / "out" / "errors.parquet").to_pylist()}
    assert err["bad_zip"]["kind"] == "corrupt_file" and "bad_zip.zarr.zip" in err["bad_zip"]["message"]
    assert err["no_bands"]["kind"] == "wrong_band_count" and "no 'bands' array" in err["no_bands"]["message"]
    assert set(err) == {"bad_zip", "no_bands"}

    r = DatasetReader(tmp / "out", backend="direct")
    idx = pq.read_table(tmp / "out" / "index.parquet").to_pylist()
    assert [row["id"] for row in idx] == ["0080717", "0060573"]
    for i, row in enumerate(idx):
        a2, a1 = src["s2"][row["id"]], src["s1"][row["id"]]
        order = np.argsort(a2["time_"][0])
        days = (a2["time_"][0][order].astype("datetime64[D]").astype(np.int64)).tolist()
        meta = r.meta(i)
        assert (meta["lon"], meta["lat"]) == (a2["center_lon"][0], a2["center_lat"][0])
        assert meta["s2_dates"].tolist() == days and meta["s1_dates"].tolist() == days
        want = a2["bands"][0][order][:, KEEP].astype(np.uint16)  # B1, B9 dropped; B2..B12 with B8A
        np.testing.assert_array_equal(r.read(i, "s2"), want)
        np.testing.assert_array_equal(r.read(i, "s1"), a1["bands"][0][order].astype(np.float32))
        nodata = (a2["bands"][0][order][:, KEEP] == 0).all(1)
        cloudy = (a2["cloud_mask"][0][order] != 0) & ~nodata
        hand = cloudy.sum((1, 2)) / (~nodata).sum((1, 2))
        assert row["s2_cloud"] == pytest.approx(hand.tolist(), abs=1e-7)
        assert row["s2_nodata"] == pytest.approx(nodata.mean((1, 2)).tolist(), abs=1e-7)
        assert row["s2_missing_bands"] == []
