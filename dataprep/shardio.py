"""Direct reads of the zarr shard objects dataprep writes: the hand-written reader tensorstore replaced (dataprep.tsio).

Kept as the independent reference the tensorstore reader is tested against, and as the reader of a process
forked after tensorstore ran in its parent (tensorstore cannot run there; see dataprep.tsio).

Format (zarr v3 `sharding_indexed`, index at the end): inner chunks encoded bytes -> blosc|zstd -> crc32c,
then an index of (offset, nbytes) uint64 pairs in C order over the object's chunk grid + crc32c of the index.
`open_fast(path)` returns None for any array whose metadata is not exactly that layout (the reader then
uses zarr). Every chunk and index read is checked against its crc32c: corruption raises, never returns junk.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import google_crc32c
import numpy as np

from .errors import ChecksumError

__all__ = ["ChecksumError", "FastArray", "open_fast"]
MAX_U64 = 2**64 - 1


def _decoder(codecs: list[dict]):
    from numcodecs import Blosc, Zstd

    names = [c["name"] for c in codecs]
    endian = (codecs[0].get("configuration") or {}).get("endian", "little") if codecs else None
    if len(names) != 3 or names[0] != "bytes" or endian != "little" or names[2] != "crc32c":
        return None
    return {"blosc": Blosc(), "zstd": Zstd()}.get(names[1])


class FastArray:
    """One sharded array (first axis = sets or frames, then full band axes, then H, W), read chunk by chunk."""

    def __init__(self, path: str, meta: dict, decoder, index_cache: int = 4096):
        self.path = path
        self.shape = tuple(meta["shape"])
        cfg = meta["codecs"][0]["configuration"]
        self.chunk = tuple(cfg["chunk_shape"])
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        self.sep = meta["chunk_key_encoding"]["configuration"].get("separator", "/")
        self.decoder = decoder
        self.gy, self.gx = self.shard[-2] // self.chunk[-2], self.shard[-1] // self.chunk[-1]
        self.n_inner = self.shard[0] * self.gy * self.gx
        self._index: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._index_cache = index_cache
        self.bytes_read = 0  # for the benchmark's read amplification

    def _file(self, obj: int) -> str:
        parts = ["c", str(obj)] + ["0"] * (len(self.shape) - 1)
        return os.path.join(self.path, self.sep.join(parts) if self.sep == "." else os.path.join(*parts))

    def _read_index(self, fd: int, size: int, name: str) -> np.ndarray:
        n = self.n_inner * 16 + 4
        b = os.pread(fd, n, size - n)
        self.bytes_read += len(b)
        if len(b) != n or google_crc32c.value(b[:-4]) != int.from_bytes(b[-4:], "little"):
            raise ChecksumError(f"{name}: shard index checksum mismatch")
        return np.frombuffer(b[:-4], dtype="<u8").reshape(self.n_inner, 2)

    def read(self, first: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """Elements `first` (int array, first axis) cropped to box = (y0, x0, y1, x1): (len(first), *mid, h, w)."""
        y0, x0, y1, x1 = box
        mid = self.shape[1:-2]
        out = np.full((len(first), *mid, y1 - y0, x1 - x0), self.fill, dtype=self.dtype)
        cy, cx = self.chunk[-2], self.chunk[-1]
        tiles = [(ty, tx) for ty in range(y0 // cy, -(-y1 // cy)) for tx in range(x0 // cx, -(-x1 // cx))]
        by_obj: dict[int, list[int]] = {}
        for k, f in enumerate(first.tolist()):
            by_obj.setdefault(f // self.shard[0], []).append(k)
        for obj, ks in by_obj.items():
            name = self._file(obj)
            try:
                fd = os.open(name, os.O_RDONLY)
            except FileNotFoundError:
                continue  # an object never written holds only the fill value (e.g. a missing HR image)
            try:
                idx = self._index.get(obj)
                if idx is None:
                    idx = self._read_index(fd, os.fstat(fd).st_size, name)
                    self._index[obj] = idx
                    if len(self._index) > self._index_cache:
                        self._index.popitem(last=False)
                for k in ks:
                    j0 = int(first[k]) % self.shard[0]
                    for ty, tx in tiles:
                        j = (j0 * self.gy + ty) * self.gx + tx
                        off, nb = int(idx[j, 0]), int(idx[j, 1])
                        if off == MAX_U64:
                            continue
                        b = os.pread(fd, nb, off)
                        self.bytes_read += len(b)
                        if len(b) != nb or google_crc32c.value(b[:-4]) != int.from_bytes(b[-4:], "little"):
                            raise ChecksumError(f"{name}: chunk {j} checksum mismatch")
                        a = np.frombuffer(self.decoder.decode(b[:-4]), dtype=self.dtype).reshape(self.chunk[1:])
                        sy, sx = ty * cy, tx * cx
                        ya, yb, xa, xb = max(y0, sy), min(y1, sy + cy), max(x0, sx), min(x1, sx + cx)
                        out[k, ..., ya - y0 : yb - y0, xa - x0 : xb - x0] = a[..., ya - sy : yb - sy, xa - sx : xb - sx]
            finally:
                os.close(fd)
        return out


def open_fast(path: str) -> FastArray | None:
    """A FastArray for the array folder `path`, or None when its layout is not the one dataprep writes."""
    with open(os.path.join(path, "zarr.json")) as f:
        meta = json.load(f)
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    cfg = codecs[0]["configuration"]
    idx_names = [c["name"] for c in cfg.get("index_codecs", [])]
    if cfg.get("index_location", "end") != "end" or idx_names != ["bytes", "crc32c"]:
        return None
    shape, chunk = meta["shape"], cfg["chunk_shape"]
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    if len(shape) < 3 or chunk[0] != 1 or list(chunk[1:-2]) != list(shape[1:-2]) or shard[1:] != shape[1:]:
        return None
    if shard[-2] % chunk[-2] or shard[-1] % chunk[-1] or meta.get("chunk_key_encoding", {}).get("name") != "default":
        return None
    dec = _decoder(cfg["codecs"])
    return None if dec is None else FastArray(path, meta, dec)
