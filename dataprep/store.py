"""The dataset `verify` and `inspect` read: a local folder or a URL on object storage, behind one small interface.

A local folder is read as it always was (files, zarr-python arrays, `os.walk` sizes). A URL (dataprep.remote) is
read through tensorstore: dataset.json and index.parquet from the local mirror (remote.mirror), errors.parquet and
each shard's metadata through the dataset's kvstore, the arrays with tensorstore's zarr3 driver (crc32c checked
for every chunk, as zarr-python does locally). tensorstore cannot run in a process forked after it ran in the
parent (dataprep.tsio), so a URL's worker pool is started with spawn.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os

import numpy as np

from . import remote
from .shard import MAX_U64, dir_bytes, read_shard_meta

ARRAYS = ("hr", "s2", "s1", "s2_offsets", "s1_offsets", "s2_dates", "s1_dates")  # every shard has these; osm maybe


def open_store(root: str) -> LocalStore | RemoteStore:
    return RemoteStore(root) if remote.is_url(root) else LocalStore(root)


class LocalStore:
    """A dataset folder."""

    def __init__(self, root: str):
        self.location = self.root = root
        self.mp_context = "fork" if "fork" in mp.get_all_start_methods() else "spawn"

    def dataset_files(self):
        """(dataset.json, index table, errors table); OSError or ValueError when unreadable."""
        import pyarrow.parquet as pq

        return *_info_and_index(self.root), pq.read_table(os.path.join(self.root, "errors.parquet"))

    def shard_meta(self, name: str) -> dict | None:
        return read_shard_meta(os.path.join(self.root, "shards", name))

    def shard_arrays(self, name: str) -> dict:
        """name -> zarr array: ARRAYS, and osm when the shard has one."""
        import zarr

        g = zarr.open_group(os.path.join(self.root, "shards", name), mode="r", zarr_format=3)
        return {n: g[n] for n in ARRAYS + (("osm",) if "osm" in g else ())}

    def shard_names(self, first: str) -> list[str]:
        """Entries of shards/ (first: the name of the first shard beyond the dataset; a URL lists from there)."""
        return os.listdir(os.path.join(self.root, "shards"))

    def bytes_under(self, folders: list[str]) -> list[int]:
        """Bytes of every file under each folder (relative; "" = the whole dataset)."""
        return [dir_bytes(os.path.join(self.root, f)) for f in folders]


class RemoteStore:
    """A dataset at a URL (dataprep.remote); picklable (tensorstore handles are opened in the process using them)."""

    mp_context = "spawn"

    def __init__(self, url: str):
        self.location = self.url = url
        self.known: dict[str, int] = {}  # key -> bytes of the dataset-level objects already read (not read again)

    def _kv(self, rel: str = ""):
        from . import tsio

        return tsio._ts().KvStore.open(remote.kvstore(self.url, rel), context=tsio.context()).result()

    def dataset_files(self):
        import pyarrow.parquet as pq

        mirror = remote.mirror(self.url)
        info, idx = _info_and_index(str(mirror))
        r = self._kv().read("errors.parquet").result()
        if r.state != "value":
            raise FileNotFoundError(f"{self.url}/errors.parquet: no such object")
        self.known = {n: (mirror / n).stat().st_size for n in remote.META_FILES} | {"errors.parquet": len(r.value)}
        return info, idx, pq.read_table(io.BytesIO(r.value))

    def shard_meta(self, name: str) -> dict | None:
        try:
            r = self._kv(f"shards/{name}").read("zarr.json").result()
            return json.loads(r.value)["attributes"]["dataprep"] if r.state == "value" else None
        except (ValueError, KeyError, TypeError):
            return None

    def shard_arrays(self, name: str) -> dict:
        from . import tsio

        has_osm = self._kv(f"shards/{name}").read("osm/zarr.json").result().state == "value"
        names = ARRAYS + (("osm",) if has_osm else ())
        arrs = tsio.open_arrays({n: remote.kvstore(self.url, f"shards/{name}/{n}") for n in names})
        return {n: _TsArray(a, f"{self.url}/shards/{name}/{n}") for n, a in arrs.items()}

    def shard_names(self, first: str) -> list[str]:
        from . import tsio

        # shard names are fixed-width, so every shard from `first` on sorts at or after it: list only those keys
        rng = tsio._ts().KvStore.KeyRange(inclusive_min=first.encode(), exclusive_max=b"shard.")
        return sorted({k.decode().split("/")[0] for k in self._kv("shards").list(rng).result()})

    def bytes_under(self, folders: list[str]) -> list[int]:
        sizes = _object_sizes(self._kv(), self.known)
        pre = [f.strip("/") + "/" if f.strip("/") else "" for f in folders]
        return [sum(v for k, v in sizes.items() if k.startswith(p)) for p in pre]


def _info_and_index(folder: str):
    import pyarrow.parquet as pq

    with open(os.path.join(folder, "dataset.json")) as f:
        return json.load(f), pq.read_table(os.path.join(folder, "index.parquet"))


class _TsArray:
    """A tensorstore array read like a zarr array: shape, inner chunk shape, a[slices] -> ndarray (clipped as numpy
    clips; a corrupt chunk raises dataprep.errors.ChecksumError)."""

    def __init__(self, a, what: str):
        self.a, self.what = a, what
        self.shape = tuple(int(s) for s in a.shape)
        self.chunks = tuple(int(c) for c in a.chunk_layout.read_chunk.shape)

    def __getitem__(self, sl):
        from . import tsio

        box = tuple(_clip(s, n) for s, n in zip(sl if isinstance(sl, tuple) else (sl,), self.shape))
        return tsio.result(self.a[box].read(), self.what)


def _clip(s, n: int):
    """A slice of an axis of length n as numpy reads it (tensorstore refuses bounds outside the array)."""
    if not isinstance(s, slice):
        return s
    lo, hi, _ = s.indices(n)
    return slice(lo, max(lo, hi))


def _object_sizes(kv, known: dict[str, int] | None = None, batch: int = 512) -> dict[str, int]:
    """key -> bytes of every object under kv. `known`: sizes already known (index.parquet at 21M sets is GBs, and
    inspect has fetched it). A zarr shard object is sized from its shard index (a suffix read of 16 bytes per inner
    chunk: chunks + index, as dataprep and zarr-python write them, without gaps); any other object is read whole."""
    keys = [k.decode() for k in kv.list().result()]
    listed = set(keys)
    known = {k: v for k, v in (known or {}).items() if k in listed}
    metas = _read_all(kv, [k for k in keys if k.rsplit("/", 1)[-1] == "zarr.json"], batch)
    sizes = {**known, **{k: len(r.value) for k, r in metas.items()}}
    index_bytes = {}
    for key, r in metas.items():
        folder, m = key[: -len("zarr.json")], json.loads(r.value)
        c = (m.get("codecs") or [{}])[0]
        if m.get("node_type") == "array" and c.get("name") == "sharding_indexed" and \
                c["configuration"].get("index_location", "end") == "end":  # fmt: skip
            shard, inner = m["chunk_grid"]["configuration"]["chunk_shape"], c["configuration"]["chunk_shape"]
            n = int(np.prod([s // i for s, i in zip(shard, inner)]))
            crc = any(x["name"] == "crc32c" for x in c["configuration"]["index_codecs"])
            index_bytes[folder] = 16 * n + 4 * crc
    sharded = {k: index_bytes[f] for k in keys if (f := k.rsplit("/", 1)[0] + "/") in index_bytes
               and k not in sizes}  # fmt: skip
    for k, r in _read_all(kv, list(sharded), batch, tail=sharded).items():
        ix = np.frombuffer(r.value[: 16 * (len(r.value) // 16)], "<u8").reshape(-1, 2)
        used = ix[ix[:, 0] != MAX_U64]
        sizes[k] = int((used[:, 0] + used[:, 1]).max()) + sharded[k] if len(used) else sharded[k]
    rest = [k for k in keys if k not in sizes]
    sizes.update({k: len(r.value) for k, r in _read_all(kv, rest, batch).items()})
    return sizes


def _read_all(kv, keys: list[str], batch: int, tail: dict[str, int] | None = None) -> dict:
    """key -> ReadResult, `batch` reads in flight at a time; tail: key -> read only that many last bytes."""
    out = {}
    for i in range(0, len(keys), batch):
        part = keys[i : i + batch]
        futs = [kv.read(k, byte_range=slice(-tail[k], None)) if tail else kv.read(k) for k in part]
        out.update(zip(part, (f.result() for f in futs)))
    return out
