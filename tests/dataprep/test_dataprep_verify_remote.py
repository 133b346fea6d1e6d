"""verify and inspect of a dataset on object storage (a moto S3 server on loopback) report what they report for the
same folder on local disk: the local run is the reference, the chunks corrupted are chosen by the test."""

from __future__ import annotations

import io
import json
import shutil

import pytest

from dataprep import remote, store
from dataprep.inspect_ import inspect_dataset
from dataprep.verify import verify
from tests.dataprep.dp_helpers import flip, run_dataprep

pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the loopback S3 server")
URL = "s3://bkt/sets/v1"  # the s3 fixture's copy of the dataset fixture
BAD = "s3://bkt/sets/corrupt-verify"
CORRUPT = [("shard-00001.zarr", "s2", "c.0.0.0.0", 0.05, "0/0/0/0"),  # the first S2 frame chunk of that shard
           ("shard-00002.zarr", "hr", "c.1.0.0.0", 0.5, "1/0/0/0")]  # fmt: skip


def _verify(root, **kw) -> tuple[int, list[str]]:
    buf = io.StringIO()
    rc = verify(str(root), out=buf, **kw)
    return rc, buf.getvalue().replace(str(root), "ROOT").splitlines()


def _finding(line: str) -> str:
    """A problem line without its cause (which names the local file or the object and the reading library)."""
    return ": ".join(line.split(": ")[:2])


@pytest.fixture(scope="module")
def corrupt(dataset, s3, tmp_path_factory):
    """A local copy of the dataset with CORRUPT's chunks damaged and a shard store beyond dataset.json's three, and
    the same bytes uploaded to BAD."""
    d = tmp_path_factory.mktemp("corrupt") / "d"
    shutil.copytree(dataset, d)
    shutil.copytree(d / "shards" / "shard-00002.zarr", d / "shards" / "shard-00003.zarr")
    for shard, arr, key, where, _ in CORRUPT:
        flip(d / "shards" / shard / arr / key, where)
    remote.upload(d, BAD, s3[0])
    return d


def test_clean_dataset_on_s3_verifies_as_local(dataset, s3):
    rc, lines = _verify(URL)
    assert (rc, lines) == _verify(dataset) and rc == 0, lines
    assert lines[-1].startswith("verify ROOT: 12 sets in 3 shards checked, 0 problem(s)")


def test_corrupt_chunk_on_s3_is_named_as_local(corrupt):
    rc, lines = _verify(BAD)
    rc_local, local = _verify(corrupt)
    assert rc == rc_local == 1
    for shard, arr, _, _, chunk in CORRUPT:  # the chunks this test damaged, each named
        assert any(x.startswith(f"FAIL {shard}/{arr}: corrupt chunk {chunk} (elements") for x in lines), lines
    assert "FAIL shard-00003.zarr: shard store beyond dataset.json's 3 shards" in lines
    assert [_finding(x) for x in lines] == [_finding(x) for x in local]
    assert all("ChecksumError" in x for x in lines if "corrupt chunk" in x)


def test_workers_and_ranks_on_s3_report_the_same(corrupt):
    serial = _verify(BAD)
    p = run_dataprep("verify", BAD, "--workers", "2", "--no-progress", check=1)  # spawned workers, from the CLI
    assert p.stdout.replace(BAD, "ROOT").splitlines() == serial[1]
    parts = [_verify(BAD, workers=2, rank=r, world_size=2) for r in (0, 1)]
    assert [p[0] for p in parts] == [1, 1]  # shard 1 is rank 1's, shard 2 rank 0's
    assert sorted(x for p in parts for x in p[1][:-1]) == sorted(serial[1][:-1])


def test_missing_dataset_on_s3_fails_cleanly(s3):
    rc, lines = _verify("s3://bkt/nothing/here")
    assert rc == 1 and lines[0].startswith("FAIL ROOT: dataset files unreadable") and len(lines) == 1, lines


def test_inspect_on_s3_prints_as_local(dataset, s3, tmp_path, capsys, monkeypatch):
    d = tmp_path / "d"  # the local copy of what remote.upload sent: the derived index columns stay behind
    shutil.copytree(dataset, d, ignore=shutil.ignore_patterns("index-v*", ".*"))
    read, read_all = [], store._read_all  # what the sizing reads: not the dataset files inspect has already read

    def spy(kv, keys, *a, **kw):
        read.extend(keys)
        return read_all(kv, keys, *a, **kw)

    monkeypatch.setattr(store, "_read_all", spy)
    for as_json in (False, True):
        outs = []
        for root in (URL, str(d)):
            assert inspect_dataset(root, as_json=as_json) == 0
            outs.append(capsys.readouterr().out.replace(root, "ROOT"))
        assert outs[0] == outs[1], outs
    s = json.loads(outs[1])
    assert all(s["bytes_on_disk"][m] > 0 for m in ("hr", "s2", "s1", "osm")) and s["total_bytes"] > 0
    assert read and not {"dataset.json", "index.parquet", "errors.parquet"} & set(read), read
