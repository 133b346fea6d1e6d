"""Datasets on object storage: `s3://bucket/prefix` read through tensorstore's `s3` kvstore.

Shards are read in place (ranged GETs of the shard index and of the touched chunks). The metadata files
(dataset.json, index.parquet) are fetched through the same kvstore into a local mirror folder, where the reader's
index column files are built beside them as for a local dataset; a mirror is fetched again only when an object's
generation (its ETag) changed. The endpoint and credentials come from the standard AWS environment variables:
AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (absent: AWS itself), AWS_REGION or AWS_DEFAULT_REGION, and tensorstore's
default credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, or the profile files).

The fetch runs in a short child process when this process has not run tensorstore yet: the training loader's parent
opens the dataset and then forks DataLoader workers, which can only use tensorstore if the parent never did
(dataprep.tsio).
"""

from __future__ import annotations

import contextlib
import hashlib
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
SCHEMES = ("s3://",)


def is_url(root) -> bool:
    return isinstance(root, str) and root.startswith(SCHEMES)


def split(url: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")"""
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def kvstore(url: str, rel: str = "") -> dict:
    """tensorstore s3 kvstore spec of the folder `rel` under the dataset at `url`."""
    bucket, prefix = split(url)
    path = "/".join(p for p in (prefix, rel.strip("/")) if p)
    spec = {"driver": "s3", "bucket": bucket, "path": path + "/" if path else ""}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        spec["endpoint"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        spec["aws_region"] = region
    return spec


def mirror_dir(url: str) -> Path:
    """The local folder holding the metadata of `url` ($DATAPREP_INDEX_CACHE, default the temp dir)."""
    base = Path(os.environ.get("DATAPREP_INDEX_CACHE") or Path(tempfile.gettempdir()) / "dataprep-index")
    endpoint = kvstore(url).get("endpoint", "")
    return base / f"s3-{hashlib.sha256(f'{endpoint} {url}'.encode()).hexdigest()[:16]}"


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
        if r.state != "value":  # unchanged since the last fetch
            continue
        tmp = dest / f".{name}.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.write_bytes(r.value)
        os.replace(tmp, dest / name)
        tmp.write_bytes(r.stamp.generation)
        os.replace(tmp, gen)


@contextlib.contextmanager
def local_s3_server(port: int = 0):
    """A moto S3 server on loopback (`python -m moto.server`, the test extra), for tests and the benchmark; yields
    its endpoint URL and sets nothing in the environment."""
    if not port:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        for _ in range(300):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if p.poll() is not None:
                raise RuntimeError("moto.server exited: is moto[server] installed (pip install 'moto[server]')?")
            time.sleep(0.1)
        else:
            raise TimeoutError(f"moto.server did not listen on 127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait(10)


def upload(root: str | os.PathLike, url: str, endpoint: str) -> int:
    """Copy a local dataset folder to `url` (boto3, comes with moto; for tests and the benchmark); returns objects."""
    import boto3

    bucket, prefix = split(url)
    c = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"))
    with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou):
        c.create_bucket(Bucket=bucket)
    n = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = p.relative_to(root).as_posix()
            if rel.startswith("index-v") or f.startswith("."):  # derived index columns: built from index.parquet
                continue
            c.upload_file(str(p), bucket, f"{prefix}/{rel}" if prefix else rel)
            n += 1
    return n


if __name__ == "__main__":  # python -m dataprep.remote URL DEST: the fetch, in a process of its own
    fetch(sys.argv[1], Path(sys.argv[2]))
