"""verify finds corrupted chunks and index/store disagreements; inspect reports the dataset."""

from __future__ import annotations

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.verify import verify
from tests.dataprep.dp_helpers import flip, run_dataprep


def test_verify_clean(dataset):
    buf = io.StringIO()
    assert verify(str(dataset), out=buf) == 0, buf.getvalue()


def test_verify_reports_corrupt_chunk(dataset, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    obj = d / "shards" / "shard-00001.zarr" / "s2" / "c.0.0.0.0"  # first zarr shard object (8 frames)
    flip(obj, 0.05)  # inside the first frame chunk (the shard index sits at the end)
    buf = io.StringIO()
    assert verify(str(d), out=buf) == 1
    text = buf.getvalue()
    assert "shard-00001.zarr/s2: corrupt chunk 0/0/0/0" in text, text
    assert "shard-00000.zarr" not in text and "shard-00002.zarr" not in text
    flip(d / "shards" / "shard-00002.zarr" / "hr" / "c.1.0.0.0", 0.5)
    buf = io.StringIO()
    assert verify(str(d), out=buf) == 1
    assert "shard-00002.zarr/hr: corrupt chunk 1/0/0/0" in buf.getvalue(), buf.getvalue()


def test_verify_in_parallel_and_split_over_ranks_finds_the_same(dataset, tmp_path):
    """Issue 11: `verify --workers N` and `--rank r --world-size w` report exactly what the serial check reports."""
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    flip(d / "shards" / "shard-00001.zarr" / "s2" / "c.0.0.0.0", 0.05)
    flip(d / "shards" / "shard-00002.zarr" / "hr" / "c.1.0.0.0", 0.5)

    def fails(**kw) -> tuple[int, list[str], int]:
        buf = io.StringIO()
        rc = verify(str(d), out=buf, **kw)
        lines = buf.getvalue().splitlines()
        checked = int(lines[-1].split(": ")[1].split()[0])
        return rc, [x for x in lines if x.startswith("FAIL")], checked

    rc, serial, n = fails()
    assert rc == 1 and len(serial) == 2 and n == len(pq.read_table(d / "index.parquet"))
    assert fails(workers=3) == (rc, serial, n)  # same lines, same order
    parts = [fails(workers=2, rank=r, world_size=2) for r in (0, 1)]
    assert all(p[0] == 1 for p in parts)  # shard 1 is rank 1's, shard 2 rank 0's: both ranks find one
    assert sorted(parts[0][1] + parts[1][1]) == sorted(serial)
    assert parts[0][2] + parts[1][2] == n


def test_verify_cross_checks_index(dataset, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    t = pq.read_table(d / "index.parquet")
    dates = t.column("s2_dates").to_pylist()
    j = next(i for i, x in enumerate(dates) if x)
    dates[j] = [x + 1 for x in dates[j]]
    crcs = t.column("s1_crc32c").to_pylist()
    crcs[-1] ^= 1
    t = t.set_column(t.schema.get_field_index("s2_dates"), "s2_dates", pa.array(dates, pa.list_(pa.int32())))
    t = t.set_column(t.schema.get_field_index("s1_crc32c"), "s1_crc32c", pa.array(crcs, pa.uint32()))
    pq.write_table(t, d / "index.parquet")
    buf = io.StringIO()
    assert verify(str(d), out=buf) == 1
    text = buf.getvalue()
    assert "s2_dates disagree with index" in text and "s1 checksum mismatch" in text, text


def test_inspect_cli(dataset):
    p = run_dataprep("inspect", str(dataset), "--json", check=0)
    s = json.loads(p.stdout)
    info = json.loads((dataset / "dataset.json").read_text())
    assert s["sets"] == info["sets"] == 12 and s["frames"] == info["frames"]
    assert all(s["compression_ratio"][m] > 1.0 for m in ("hr", "s2", "s1"))
    assert s["s2_dates"]["first"].startswith("2021-")
