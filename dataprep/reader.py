"""DatasetReader: the trainer's random-access view of a dataprep dataset."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import remote, tsio
from .index import IndexColumns
from .schema import DTYPES, N_BANDS, OSM_UNKNOWN
from .shardio import FastArray, open_fast

_log = logging.getLogger(__name__)
BACKENDS = ("tensorstore", "direct", "zarr")


class DatasetReader:
    """Lazy, fork-safe reader over a dataprep dataset: opens shard stores on first access in each process.

    Index metadata lives in column files beside index.parquet (dataprep.index; built on first open for datasets
    that lack them), read a row at a time from the shared page cache: no process holds a copy of the index, no
    Python object exists per row, and forked DataLoader workers add nothing per row. Shard handles are opened per
    process on first use and never pickled, so the reader can be handed to DataLoader workers (fork or spawn).
    """

    def __init__(self, root: str | os.PathLike, max_open_shards: int = 64, backend: str = "tensorstore"):
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: one of {BACKENDS}")
        # s3://bucket/prefix: shards read in place through tensorstore; metadata from a local mirror (remote.py)
        self.url = str(root) if remote.is_url(root) else None
        if self.url and backend != "tensorstore":
            raise ValueError(f"{root}: object storage is read through tensorstore only, not backend={backend!r}")
        self.root = remote.mirror(self.url) if self.url else Path(root)
        with open(self.root / "dataset.json") as f:
            self.info: dict = json.load(f)
        self.stats: dict = {m: {"mean": v["mean"], "std": v["std"]} for m, v in self.info["stats"].items()}
        self.hr_size: int = int(self.info["hr_size"])
        self.s2_size: int = int(self.info["s2_size"])
        self.has_osm: bool = bool(self.info.get("has_osm", False))
        self._map_index()
        self.max_open_shards = max_open_shards
        self._pid = None
        self._open: dict[int, tuple[str, dict]] = {}
        # "tensorstore" (dataprep.tsio); "direct": the hand-written reader (dataprep.shardio, the reference);
        # "zarr": zarr-python. A process that cannot run tensorstore reads with "direct" (see _arrays).
        self.backend = backend
        self._backend = backend

    def _map_index(self) -> None:
        self._index = IndexColumns(self.root)

    def __len__(self) -> int:
        return len(self._index)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"], state["_pid"] = {}, None  # never carry zarr handles across processes
        state.pop("_index")  # file descriptors and mappings: opened again on arrival
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map_index()

    def meta(self, i: int) -> dict:
        """id, lon, lat, region, label, has_hr, has_osm, shard, row, s2_dates / s1_dates (int32 days since epoch)."""
        c = self._index.meta(i)
        return {k: c[k] for k in ("id", "lon", "lat", "region", "label", "has_hr", "has_osm", "shard", "row",
                                  "s2_dates", "s1_dates")}  # fmt: skip

    def _arrays(self, shard: int) -> tuple[str, dict]:
        """(backend, name -> array handle) of one shard, opened in this process on first use."""
        pid = os.getpid()
        if self._pid != pid:  # first use in this process (or after a fork): drop inherited handles
            self._open, self._pid = {}, pid
            self._backend = self.backend
            if self.backend == "tensorstore" and not tsio.usable():
                if self.url:
                    raise RuntimeError(f"{self.url}: tensorstore ran in the parent before this process was forked, "
                                       "so it cannot run here and object storage has no other reader: read no "
                                       "pixels in the parent before forking, or start workers with spawn/forkserver")
                _log.warning("pid %d: tensorstore ran in the parent before this process was forked and cannot run "
                             "here; reading with dataprep.shardio (same bytes, crc32c checked)", pid)
                self._backend = "direct"
        got = self._open.get(shard)
        if got is None:
            path = self.root / "shards" / f"shard-{shard:05d}.zarr"
            names = ("hr", "s2", "s1") + (("osm",) if self.has_osm else ())
            if self._backend == "tensorstore":
                rel = f"shards/shard-{shard:05d}.zarr"
                arrs = tsio.open_arrays({n: remote.kvstore(self.url, f"{rel}/{n}") if self.url else
                                         tsio.kvstore(str(path / n)) for n in names})  # fmt: skip
            else:
                arrs = {n: open_fast(str(path / n)) for n in names} if self._backend == "direct" else {}
                if len(arrs) < len(names) or any(a is None for a in arrs.values()):  # zarr reads the rest
                    import zarr

                    g = zarr.open_group(path, mode="r", zarr_format=3)
                    arrs = {n: (arrs.get(n) or g[n]) for n in names}
            if len(self._open) >= self.max_open_shards:
                self._open.pop(next(iter(self._open)))
            got = self._open[shard] = (self._backend, arrs)
        return got

    def read(self, i: int, modality: str, box: tuple[int, int, int, int] | None = None,
             frames: Sequence[int] | None = None) -> np.ndarray:  # fmt: skip
        """Pixels of set i. "hr" -> (3, h, w) uint8; "s2" -> (T, 10, h, w) uint16; "s1" -> (T, 2, h, w) float32;
        "osm" -> (h, w) uint8. box = (y0, x0, y1, x1) in that modality's pixels (None = whole); frames =
        indices into the set's time series (None = all). Reads only the chunks the box/frames touch."""
        return self.read_many(i, [(modality, box, frames)])[0]

    def read_many(self, i: int, requests: Sequence[tuple]) -> list[np.ndarray]:
        """Several reads of set i, [(modality, box, frames), ...] as in `read`, all in flight at once (one sample's
        modalities and frames: tensorstore decodes them concurrently); returns the arrays in request order."""
        c = self._index.row(i)
        plans = [self._plan(c, *r) for r in requests]
        todo = [p for p in plans if not isinstance(p, np.ndarray)]
        if todo:
            backend, arrs = self._arrays(c["shard"])
            if backend == "tensorstore":
                shard = f"{self.url or self.root}/shards/shard-{c['shard']:05d}.zarr"
                futs = [tsio.read_future(arrs[m], first, box) for m, first, box in todo]
                done = iter(tsio.read_all(futs, [f"{shard}/{m}" for m, _, _ in todo]))
            else:
                done = iter([_take(arrs[m], first, box) for m, first, box in todo])
        out = [p if isinstance(p, np.ndarray) else next(done) for p in plans]
        return [a[0] if m in ("hr", "osm") and not isinstance(p, np.ndarray) else a
                for a, p, (m, *_) in zip(out, plans, requests)]  # fmt: skip

    def _plan(self, c: dict, modality: str, box=None, frames=None):
        """A constant result (np.ndarray) or what to read: (array name, first-axis indices, box)."""
        size = self.s2_size if modality in ("s2", "s1") else self.hr_size
        y0, x0, y1, x1 = box if box is not None else (0, 0, size, size)
        if not (0 <= y0 <= y1 <= size and 0 <= x0 <= x1 <= size):
            raise IndexError(f"box {box} outside a {size}x{size} {modality} image")
        box = (int(y0), int(x0), int(y1), int(x1))
        row = c["row"]
        if modality == "hr":
            if not c["has_hr"]:
                return np.zeros((3, y1 - y0, x1 - x0), np.uint8)
            return "hr", np.array([row]), box
        if modality == "osm":
            if not self.has_osm:  # dataset without label rasters
                return np.full((y1 - y0, x1 - x0), OSM_UNKNOWN, np.uint8)
            return "osm", np.array([row]), box
        if modality not in ("s2", "s1"):
            raise KeyError(f"unknown modality {modality!r}")
        n = c[f"n_{modality}"]
        start = c[f"{modality}_start"]
        if frames is None:
            sel = np.arange(n)
        else:
            sel = np.asarray(frames, dtype=np.int64).reshape(-1)
            if sel.size and (sel.min() < -n or sel.max() >= n):
                raise IndexError(f"frames {list(sel)} outside a series of {n}")
            sel = np.where(sel < 0, sel + n, sel)
        if sel.size == 0:
            return np.zeros((0, N_BANDS[modality], y1 - y0, x1 - x0), DTYPES[modality])
        return modality, start + sel, box


def _take(a, first: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """a[first, ..., y0:y1, x0:x1] for a FastArray or a zarr array; first: (K,) int64."""
    y0, x0, y1, x1 = box
    if isinstance(a, FastArray):
        return a.read(first, box)
    if np.all(np.diff(first) == 1):  # contiguous: a plain slice
        return a[int(first[0]) : int(first[-1]) + 1, ..., y0:y1, x0:x1]
    return a.oindex[(first,) + (slice(None),) * (a.ndim - 3) + (slice(y0, y1), slice(x0, x1))]
