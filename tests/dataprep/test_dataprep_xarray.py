"""Shards open in xarray (Zarr v3 dimension_names + attributes) with the reader's values; shards written
without dimension_names (earlier versions) still read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from dataprep.reader import DatasetReader
from dataprep.schema import S2_BANDS


def test_xarray_opens_every_shard_with_the_readers_values(dataset):
    xr = pytest.importorskip("xarray")
    r = DatasetReader(dataset)
    info = json.loads((dataset / "dataset.json").read_text())
    seen = 0
    for k in range(info["shards"]):
        ds = xr.open_zarr(dataset / "shards" / f"shard-{k:05d}.zarr", consolidated=False)
        assert ds["hr"].dims == ("set", "hr_band", "hr_y", "hr_x")
        assert ds["s2"].dims == ("s2_frame", "s2_band", "y", "x") and ds["s1"].dims[0] == "s1_frame"
        assert ds["s2"].attrs["bands"] == list(S2_BANDS) and ds["s2"].attrs["scale"] == 1e-4
        assert ds["s2"].dtype == np.uint16 and ds["hr"].dtype == np.uint8 and ds["s1"].dtype == np.float32
        for i in (j for j in range(len(r)) if r.meta(j)["shard"] == k):
            m = r.meta(i)
            row = m["row"]
            assert np.array_equal(ds["hr"][row].values, r.read(i, "hr"))
            assert np.array_equal(ds["osm"][row].values, r.read(i, "osm"))
            for mod in ("s2", "s1"):
                lo, hi = (int(v) for v in ds[f"{mod}_offsets"].values[row : row + 2])
                assert np.array_equal(ds[mod][lo:hi].values, r.read(i, mod))
                want = m[f"{mod}_dates"].astype("datetime64[D]")  # CF "days since 1970-01-01": decoded by xarray
                assert np.array_equal(ds[f"{mod}_dates"][lo:hi].values.astype("datetime64[D]"), want)
            seen += 1
    assert seen == len(r) == 12


def test_shards_without_dimension_names_still_read(dataset, tmp_path):
    d = tmp_path / "old"
    shutil.copytree(dataset, d)
    n = 0
    for meta in (d / "shards").glob("*.zarr/*/zarr.json"):
        j = json.loads(meta.read_text())
        j.pop("dimension_names", None)
        j["attributes"] = {}
        meta.write_text(json.dumps(j))
        n += 1
    assert n >= 3 * 7
    new, old, old_zarr = DatasetReader(dataset), DatasetReader(d), DatasetReader(d, backend="zarr")
    for i in range(len(new)):
        for m in ("hr", "s2", "s1", "osm"):
            want = new.read(i, m)
            assert np.array_equal(old.read(i, m), want) and np.array_equal(old_zarr.read(i, m), want), (i, m)
