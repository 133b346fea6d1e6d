"""`convert --out s3://bucket/prefix`: shards are written into a local staging folder as for a local output and
uploaded object by object (boto3) as soon as each one is complete, under the same keys as the local layout.

Commit points, as for a local output: a shard's group `zarr.json` (which holds its dataprep metadata) is uploaded
after all its other objects, so its presence marks a complete shard (a rerun skips it, rank 0 waits for it); the
dataset-level files (index.parquet, errors.parquet, the index column folder) follow the last shard, and
`dataset.json` is uploaded last of all. Endpoint, region and credentials: the standard AWS environment (as the
reader, dataprep.remote).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import remote
from .shard import shard_name

THREADS = 8  # concurrent PUTs of one shard's objects


class S3Error(RuntimeError):
    """A failure of the object store that ends the run with a one-line message."""


def default_stage(url: str) -> Path:
    """Staging folder of `url` when --stage is not given: the same one on a rerun, so local shards are reused."""
    endpoint = remote.kvstore(url).get("endpoint", "")
    h = hashlib.sha256(f"{endpoint} {url}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "dataprep-stage" / h


def _describe(e: Exception, bucket: str) -> str:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket"):
            return f"no such bucket: {bucket}"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return f"access to bucket {bucket} denied ({code}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        return f"{code}: {e.response.get('Error', {}).get('Message', e)}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class S3Target:
    """The dataset at `url` being written from the staging folder `stage`."""

    def __init__(self, url: str, stage: str | os.PathLike | None = None, keep_stage: bool = False):
        if not url.startswith("s3://"):  # gs:// is read-only here (dataprep.remote): no GCS writer
            raise S3Error(f"{url}: convert writes to local folders and s3:// only; convert locally and copy with "
                          "`gcloud storage cp -r`")  # fmt: skip
        import boto3
        from boto3.exceptions import Boto3Error
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        self.url, self.keep_stage = url, keep_stage
        self.bucket, self.prefix = remote.split(url)
        self.stage = Path(stage) if stage else default_stage(url)
        spec = remote.kvstore(url)
        self.client = boto3.client("s3", endpoint_url=spec.get("endpoint"), region_name=spec.get("aws_region"),
                                   config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                                 max_pool_connections=THREADS))  # fmt: skip
        self.errors = (BotoCoreError, ClientError, Boto3Error)  # Boto3Error: upload_file's S3UploadFailedError
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.errors as e:
            raise S3Error(f"{url}: {_describe(e, self.bucket)}") from None

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _fail(self, what: str, e: Exception) -> S3Error:
        return S3Error(f"{self.url}: {what}: {_describe(e, self.bucket)}")

    def shard_meta(self, k: int) -> dict | None:
        """Shard k's dataprep metadata from its uploaded group zarr.json; None while the shard is not complete."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(f"shards/{shard_name(k)}/zarr.json"))
            return json.loads(body["Body"].read())["attributes"]["dataprep"]
        except self.client.exceptions.NoSuchKey:
            return None
        except self.errors as e:
            raise self._fail(f"reading {shard_name(k)}", e) from None

    def has_shard(self, k: int) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(f"shards/{shard_name(k)}/zarr.json"))
            return True
        except self.errors as e:
            if getattr(e, "response", {}).get("Error", {}).get("Code") in ("404", "NoSuchKey"):
                return False
            raise self._fail(f"checking {shard_name(k)}", e) from None

    def _put_all(self, files: list[tuple[Path, str]]) -> None:
        def put(f: tuple[Path, str]) -> None:
            self.client.upload_file(str(f[0]), self.bucket, self.key(f[1]))

        try:
            with ThreadPoolExecutor(THREADS) as ex:
                list(ex.map(put, files))
        except self.errors as e:
            raise self._fail(f"uploading {files[0][1]}", e) from None

    def upload_shard(self, k: int) -> int:
        """Upload the committed staged shard k, its group zarr.json last; then drop it from the stage. Returns the
        number of objects."""
        name = shard_name(k)
        d = self.stage / "shards" / name
        files = sorted((p, f"shards/{name}/{p.relative_to(d).as_posix()}") for p in d.rglob("*") if p.is_file())
        marker = [f for f in files if f[0] == d / "zarr.json"]
        if not marker:
            raise S3Error(f"{d}: not a complete shard (no zarr.json)")
        rest = [f for f in files if f[0] != d / "zarr.json"]
        if rest:
            self._put_all(rest)
        self._put_all(marker)
        if not self.keep_stage:
            shutil.rmtree(d, ignore_errors=True)
        return len(files)

    def upload_dataset_files(self) -> int:
        """Upload the staged dataset-level files (everything but shards/ and temporaries), dataset.json last."""
        files = []
        for p in sorted(self.stage.rglob("*")):
            rel = p.relative_to(self.stage).as_posix()
            if not p.is_file() or rel.startswith("shards/") or any(s.startswith(".") for s in rel.split("/")):
                continue
            if ".tmp-" not in p.name and rel != "dataset.json":
                files.append((p, rel))
        self._put_all(files)
        self._put_all([(self.stage / "dataset.json", "dataset.json")])
        return len(files) + 1
