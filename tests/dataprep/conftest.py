"""Fixtures for the dataprep tests: a small synthetic raw dataset and its conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from dataprep import remote
from tests.dataprep.dp_helpers import HR, S2, convert_inproc


@pytest.fixture(scope="session")
def raw(tmp_path_factory) -> Path:
    """12 synthetic sets (HR 64 px, S2/S1 16 px), some with a modality missing."""
    from dataprep.sample import write_sample

    out = tmp_path_factory.mktemp("raw")
    write_sample(out, 12, seed=3, hr_size=HR, s2_size=S2, missing_rate=0.3)
    return out


@pytest.fixture(scope="session")
def dataset(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    assert convert_inproc(raw / "manifest.jsonl", out) == 0
    return out


@pytest.fixture(scope="module")
def s3(dataset, tmp_path_factory):
    """(endpoint, environment) of a moto server (moto[server], the test extra) holding the test dataset at
    s3://bkt/sets/v1 (the module's URL); the environment is also set in this process while the module runs."""
    pytest.importorskip("moto.server", reason="moto[server] (the test extra) runs the loopback S3 server")
    tmp = tmp_path_factory.mktemp("s3")
    (tmp / "aws").write_text("")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(tmp / "aws"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "aws"),
           "DATAPREP_INDEX_CACHE": str(tmp / "cache")}  # fmt: skip
    with pytest.MonkeyPatch.context() as mp, remote.local_s3_server() as endpoint:
        for k, v in {**env, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)
        assert remote.upload(dataset, "s3://bkt/sets/v1", endpoint) > 10
        yield endpoint, {**env, "AWS_ENDPOINT_URL": endpoint}
