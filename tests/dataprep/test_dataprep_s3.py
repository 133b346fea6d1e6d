"""Training reads from object storage: `s3://bucket/prefix` through tensorstore's s3 kvstore, against a real moto
S3 server on loopback (a separate process), compared with the local dataset read by the hand-written reader."""

from __future__ import annotations

import numpy as np
import pytest

from dataprep import remote
from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import (
    assert_corrupt_chunk_raises,
    assert_mirror_refetched_only_on_change,
    assert_reads_equal,
    run_loader,
)

pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the loopback S3 server")
URL = "s3://bkt/sets/v1"


def test_s3_reads_equal_local_reads(dataset, s3):
    r, local = DatasetReader(URL), DatasetReader(dataset, backend="direct")
    assert r.url == URL and r.root != dataset and len(r) == len(local) and r.stats == local.stats
    assert_reads_equal(r, local, np.random.default_rng(3))


def test_checkpoint_fingerprint_of_s3_dataset_equals_local(dataset, s3):
    from trainer.checkpoint import dataset_fingerprint

    assert dataset_fingerprint(URL) == dataset_fingerprint(dataset)


def test_metadata_mirror_is_fetched_again_only_when_it_changed(dataset, s3):
    import boto3

    endpoint, _ = s3
    url = "s3://bkt/sets/changing"
    remote.upload(dataset, url, endpoint)
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    assert_mirror_refetched_only_on_change(dataset, url, lambda key, data: c.put_object(Bucket="bkt", Key=key,
                                                                                         Body=data))  # fmt: skip


def test_missing_dataset_and_local_only_backend_are_clear_errors(s3):
    with pytest.raises(FileNotFoundError, match=r"s3://bkt/nothing/here/dataset.json: no such object"):
        DatasetReader("s3://bkt/nothing/here")
    with pytest.raises(ValueError, match="tensorstore only"):
        DatasetReader(URL, backend="direct")


def test_corrupt_object_on_s3_is_a_checksum_error(dataset, s3):
    import boto3

    endpoint, _ = s3
    url = "s3://bkt/sets/corrupt"
    remote.upload(dataset, url, endpoint)
    c = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    assert_corrupt_chunk_raises(dataset, url, lambda key, data: c.put_object(Bucket="bkt", Key=key, Body=data))


def test_dataloader_fork_workers_read_s3(dataset, s3):
    """The training loader's forked workers open their own tensorstore handles on S3 (the parent fetched the
    metadata in a child process, so it never ran tensorstore itself) and cut the same samples as a local copy."""
    _, env = s3
    p = run_loader(URL, dataset, env)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
