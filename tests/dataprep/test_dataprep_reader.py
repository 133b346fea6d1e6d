"""Reader round trip: values read back equal the source files (read independently with Pillow / numpy)."""

from __future__ import annotations

import json
import multiprocessing as mp
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from PIL import Image

from dataprep.reader import DatasetReader
from dataprep.schema import parse_date, region_of
from tests.dataprep.dp_helpers import HR, S2


def _rows(raw):
    return [json.loads(line) for line in (raw / "manifest.jsonl").read_text().splitlines()]


def test_reader_round_trip_boxes_and_frames(raw, dataset):
    r = pickle.loads(pickle.dumps(DatasetReader(dataset)))  # must work before first access
    rows = _rows(raw)
    assert len(r) == len(rows) and r.hr_size == HR and r.s2_size == S2
    rng = np.random.default_rng(0)
    for i, row in enumerate(rows):
        m = r.meta(i)
        assert m["id"] == row["id"] and m["label"] == row["label"]
        assert m["lon"] == row["lon"] and m["region"] == region_of(row["lon"], row["lat"])
        y0, x0 = rng.integers(0, HR // 2, 2)
        box = (int(y0), int(x0), int(y0) + HR // 2, int(x0) + HR // 3)
        if row.get("hr"):
            src = np.asarray(Image.open(raw / row["hr"])).transpose(2, 0, 1)
            got = r.read(i, "hr", box)
            assert got.dtype == np.uint8 and np.array_equal(got, src[:, box[0] : box[2], box[1] : box[3]])
        else:
            assert not m["has_hr"] and not r.read(i, "hr").any()
        osm = np.asarray(Image.open(raw / row["osm"]))
        assert np.array_equal(r.read(i, "osm", box), osm[box[0] : box[2], box[1] : box[3]])
        for mod, dtype in (("s2", np.uint16), ("s1", np.float32)):
            if not row.get(mod):
                assert len(m[f"{mod}_dates"]) == 0 and r.read(i, mod).shape == (0, 10 if mod == "s2" else 2, S2, S2)
                continue
            src = np.stack([np.load(raw / f["path"]) for f in row[mod]])
            dates = np.array([parse_date(f["date"]) for f in row[mod]], np.int32)
            assert np.array_equal(m[f"{mod}_dates"], dates)  # sample writes frames in date order
            full = r.read(i, mod)
            assert full.dtype == dtype and np.array_equal(full, src)
            frames = [len(src) - 1, 0, 1]  # out of order, non-contiguous
            b = (2, 3, S2 - 1, S2 // 2)
            assert np.array_equal(r.read(i, mod, b, frames), src[frames][:, :, 2 : S2 - 1, 3 : S2 // 2])
            assert np.array_equal(r.read(i, mod, frames=[1, 2]), src[1:3])


def test_reader_stats_match_numpy(raw, dataset):
    r = DatasetReader(dataset)
    rows = _rows(raw)
    s2 = np.concatenate([np.stack([np.load(raw / f["path"]) for f in row["s2"]]) for row in rows if row.get("s2")])
    x = s2.transpose(1, 0, 2, 3).reshape(10, -1).astype(np.float64)
    np.testing.assert_allclose(r.stats["s2"]["mean"], x.mean(1), rtol=1e-9)
    np.testing.assert_allclose(r.stats["s2"]["std"], x.std(1), rtol=1e-6)
    hr = np.stack([np.asarray(Image.open(raw / row["hr"])) for row in rows if row.get("hr")])
    np.testing.assert_allclose(r.stats["hr"]["mean"], hr.reshape(-1, 3).mean(0), rtol=1e-9)


def test_plain_zarr_layout(dataset):
    """The documented layout is readable with zarr + pyarrow alone."""
    idx = pq.read_table(dataset / "index.parquet").to_pylist()
    r = DatasetReader(dataset)
    for i, row in enumerate(idx):
        g = zarr.open_group(dataset / "shards" / f"shard-{row['shard']:05d}.zarr", mode="r")
        offs = g["s2_offsets"][:]
        assert offs[row["row"]] == row["s2_start"] and offs[row["row"] + 1] - offs[row["row"]] == row["n_s2"]
        s2 = g["s2"][offs[row["row"]] : offs[row["row"] + 1]]
        assert np.array_equal(s2, r.read(i, "s2"))
        assert list(g["s2_dates"][offs[row["row"]] : offs[row["row"] + 1]]) == row["s2_dates"]
        codecs = g["s2"].metadata.to_dict()["codecs"][0]
        assert codecs["name"] == "sharding_indexed"
        assert codecs["configuration"]["codecs"][-1]["name"] == "crc32c"


def _child_read(reader, i, q):
    q.put(reader.read(i, "s2").sum())


def test_reader_fork_safe(dataset):
    r = DatasetReader(dataset)
    i = next(j for j in range(len(r)) if r.meta(j)["s2_dates"].size)
    want = int(r.read(i, "s2").sum())  # parent opened handles; the child must open its own
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_read, args=(r, i, q))
    p.start()
    got = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0 and int(got) == want


def test_reader_rejects_bad_box(dataset):
    r = DatasetReader(dataset)
    with pytest.raises(IndexError):
        r.read(0, "hr", (0, 0, HR + 1, 4))


def test_direct_reads_equal_zarr_reads(dataset):
    """The hand-written shard reader (dataprep.shardio, the tensorstore reader's reference) and zarr itself
    return the same arrays."""
    from dataprep.shardio import FastArray

    fast, slow = DatasetReader(dataset, backend="direct"), DatasetReader(dataset, backend="zarr")
    rng = np.random.default_rng(1)
    for i in range(len(fast)):
        assert isinstance(fast._arrays(fast.meta(i)["shard"])[1]["s2"], FastArray)
        for m, size in (("hr", HR), ("osm", HR), ("s2", S2), ("s1", S2)):
            y0, x0 = (int(v) for v in rng.integers(0, size - 1, 2))
            box = (y0, x0, int(rng.integers(y0 + 1, size + 1)), int(rng.integers(x0 + 1, size + 1)))
            n = len(fast.meta(i)[f"{m}_dates"]) if m in ("s2", "s1") else 0
            frames = sorted(rng.choice(n, size=min(n, 3), replace=False).tolist()) if n else None
            a, b = fast.read(i, m, box, frames), slow.read(i, m, box, frames)
            assert a.dtype == b.dtype and np.array_equal(a, b), (i, m, box, frames)


def test_direct_read_detects_corruption(dataset, tmp_path):
    import shutil

    from dataprep.shardio import ChecksumError

    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    r = DatasetReader(d, backend="direct")
    i = next(j for j in range(len(r)) if r.meta(j)["shard"] == 0 and r.meta(j)["has_hr"])
    obj = d / "shards" / "shard-00000.zarr" / "hr" / f"c.{r.meta(i)['row']}.0.0.0"
    b = bytearray(obj.read_bytes())
    b[len(b) // 3] ^= 0xFF
    obj.write_bytes(bytes(b))
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        r.read(i, "hr")
