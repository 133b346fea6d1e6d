"""`convert --out s3://bucket/prefix`: shards staged locally and uploaded as each completes, metadata last, against
a real moto S3 server on loopback; the result read back through DatasetReader and compared, object by object and
value by value, with a local conversion of the same manifest."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dataprep import convert as convert_mod
from dataprep import remote, s3write
from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import convert_inproc, run_dataprep, tree_bytes

pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the loopback S3 server")


def objects(endpoint: str, url: str) -> dict[str, bytes]:
    """Every object under url (key relative to the prefix -> bytes)."""
    import boto3

    bucket, prefix = remote.split(url)
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = {}
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix) + 1 :]] = c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.fixture(scope="module")
def local(raw, tmp_path_factory):
    """The same manifest converted into a local folder: every file but temporaries, by relative path."""
    out = tmp_path_factory.mktemp("local")
    assert convert_inproc(raw / "manifest.jsonl", out) == 0
    return out, {k: v for k, v in tree_bytes(out).items() if not any(s.startswith(".") for s in k.split(os.sep))}


@pytest.fixture(scope="module")
def written(raw, s3, tmp_path_factory):
    """An uninterrupted single-rank conversion to S3: (url, its objects)."""
    url = "s3://bkt/out/full"
    stage = tmp_path_factory.mktemp("stage")
    assert convert_inproc(raw / "manifest.jsonl", url, stage=str(stage)) == 0
    assert not any((stage / "shards").iterdir())  # uploaded shards leave the stage
    return url, objects(s3[0], url)


def test_s3_output_equals_local_output(local, written):
    _, files = local
    _, objs = written
    assert sorted(objs) == sorted(k.replace(os.sep, "/") for k in files)
    for k, b in files.items():
        assert objs[k.replace(os.sep, "/")] == b, k  # index.parquet, errors.parquet, dataset.json, every chunk


def test_s3_output_reads_equal_local_reads(local, written):
    r, ref = DatasetReader(written[0]), DatasetReader(local[0], backend="direct")
    assert len(r) == len(ref) > 0 and r.info == ref.info
    for i in range(len(r)):
        assert {k: np.asarray(v).tolist() for k, v in r.meta(i).items()} == \
               {k: np.asarray(v).tolist() for k, v in ref.meta(i).items()}  # fmt: skip
        for m in ("hr", "osm", "s2", "s1"):
            a, b = r.read(i, m), ref.read(i, m)
            assert a.dtype == b.dtype and np.array_equal(a, b), (i, m)


def test_resume_after_failed_upload_uploads_only_the_rest(raw, s3, written, tmp_path, monkeypatch):
    url, manifest = "s3://bkt/out/resumed", raw / "manifest.jsonl"
    put, calls = s3write.S3Target._put_all, []

    def failing(self, files):
        calls.append(files[-1][1])
        if len(calls) == 4:  # shard 1's group zarr.json (its chunks are uploaded): the commit never happens
            raise RuntimeError("injected failure")
        put(self, files)

    monkeypatch.setattr(s3write.S3Target, "_put_all", failing)
    with pytest.raises(RuntimeError, match="injected"):
        convert_inproc(manifest, url, stage=str(tmp_path))
    assert calls[-1] == "shards/shard-00001.zarr/zarr.json"
    got = objects(s3[0], url)
    assert "dataset.json" not in got and "shards/shard-00001.zarr/zarr.json" not in got
    assert any(k.startswith("shards/shard-00001.zarr/hr/") for k in got)
    monkeypatch.setattr(s3write.S3Target, "_put_all", put)

    converted, uploaded = [], []
    work, upload = convert_mod._work, s3write.S3Target.upload_shard
    monkeypatch.setattr(convert_mod, "_work", lambda a: converted.append(a[0]) or work(a))
    monkeypatch.setattr(s3write.S3Target, "upload_shard", lambda self, k: uploaded.append(k) or upload(self, k))
    assert convert_inproc(manifest, url, stage=str(tmp_path)) == 0
    assert converted == [2] and uploaded == [1, 2]  # shard 1 was staged whole: uploaded without converting again
    assert objects(s3[0], url) == written[1]


def test_two_ranks_with_their_own_stages_and_workers_equal_one(raw, s3, written, tmp_path):
    url = "s3://bkt/out/ranks"
    for rank in (1, 0):  # different stages, as on two machines; rank 0 (2 worker processes) merges from the objects
        rc = convert_inproc(raw / "manifest.jsonl", url, stage=str(tmp_path / f"r{rank}"), rank=rank, world_size=2,
                            workers=2 - rank)  # fmt: skip
        assert rc == 0
    assert objects(s3[0], url) == written[1]


def test_missing_bucket_and_bad_credentials_are_one_line_errors(raw, s3, tmp_path, monkeypatch):
    man = str(raw / "manifest.jsonl")
    p = run_dataprep("convert", "--manifest", man, "--out", "s3://no-such-bucket/x", "--stage", str(tmp_path),
                     "--no-progress", check=2)  # fmt: skip
    assert p.stderr.strip() == "dataprep: s3://no-such-bucket/x: no such bucket: no-such-bucket"
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")  # this server checks credentials (moto's IAM)
    with remote.local_s3_server() as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        p = run_dataprep("convert", "--manifest", man, "--out", "s3://bkt/x", "--stage", str(tmp_path),
                         "--no-progress", check=2)  # fmt: skip
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("dataprep: s3://bkt/x: access to bucket bkt denied"), p.stderr


def test_cli_keep_stage_keeps_uploaded_shards(raw, s3, written, tmp_path):
    url = "s3://bkt/out/cli"
    run_dataprep("convert", "--manifest", str(raw / "manifest.jsonl"), "--out", url, "--stage", str(tmp_path),
                 "--keep-stage", "--no-progress", "--hr-size", "64", "--s2-size", "16", "--shard-size", "5",
                 "--frames-per-chunk-shard", "8", check=0)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"shard-0000{k}.zarr" for k in range(3)]
    assert objects(s3[0], url) == written[1]
