"""index.parquet as fixed-width row records plus three value files: what DatasetReader and its forked
DataLoader workers read, a row at a time, from the shared page cache.

Layout, beside index.parquet: `index-v<format>-<fp>.cols/` holding `rows.bin` (one packed little-endian record per row:
the index's fixed-width columns, then where the row's id and dates start in the value files: `id_at`, `id_len`,
`s2_at`, `s1_at`; the date counts are the `n_s2`/`n_s1` columns), `id.data` (utf-8), `s2_dates.values` and
`s1_dates.values` (int32 days since 1970-01-01, rows' dates back to back), and `meta.json` (row count, record
dtype). `<fp>` fingerprints index.parquet (size and its last MiB, which holds the footer with every column
chunk's offsets and statistics), so a rewritten index never meets a stale folder.

A row read is 4 preads (record, id, two date runs): nothing is held or mapped per process, no Python object
exists per row, so a process's memory does not grow with the dataset nor with the rows it has read (a mapping's
touched pages would stay in its RSS: an epoch touches every page, ~450 B a row, 9 GB at 21M rows). `cols` maps
`rows.bin` for vectorised whole-column use (numpy views of the record fields, read-only, shared pages).

The reader builds the folder on first open when it is missing (datasets written before it existed, or a
rewritten index.parquet): streamed from Parquet in bounded batches, under a temporary name, then renamed
(atomic; a concurrent builder's identical result wins harmlessly). A read-only dataset folder builds into
$DATAPREP_INDEX_CACHE (default: the temp dir) instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np

FORMAT = 2
COLUMNS = {"shard": "<i4", "row": "<i4", "lon": "<f8", "lat": "<f8", "region": "<i4", "label": "<i4",
           "has_hr": "|b1", "has_osm": "|b1", "n_s2": "<i4", "n_s1": "<i4", "s2_start": "<i8", "s1_start": "<i8"}
LISTS = {"s2_dates": "<i4", "s1_dates": "<i4"}
RECORD = np.dtype([*COLUMNS.items(), ("id_at", "<i8"), ("id_len", "<i4"), ("s2_at", "<i8"), ("s1_at", "<i8")])
BATCH_ROWS = 1 << 16
_TAIL = 1 << 20


def fingerprint(parquet: str | os.PathLike) -> str:
    """16 hex digits from the file's size and its last MiB (the Parquet footer): cheap, content-derived."""
    with open(parquet, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(max(0, size - _TAIL))
        tail = f.read()
    return hashlib.sha256(size.to_bytes(8, "little") + tail).hexdigest()[:16]


def _string_parts(a) -> tuple[np.ndarray, memoryview]:
    """(offsets relative to the first, utf-8 bytes) of a pyarrow (large_)string array slice, no Python strs."""
    import pyarrow as pa

    if a.null_count:
        raise ValueError("index.parquet: null id")
    if len(a) == 0:
        return np.zeros(1, np.int64), memoryview(b"")
    width = np.int64 if pa.types.is_large_string(a.type) else np.int32
    bufs = a.buffers()
    offs = np.frombuffer(bufs[1], width)[a.offset : a.offset + len(a) + 1].astype(np.int64)
    data = memoryview(bufs[2])[int(offs[0]) : int(offs[-1])] if bufs[2] is not None else memoryview(b"")
    return offs - offs[0], data


def build(parquet: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the column folder for `parquet` at `out` (atomically); returns `out`."""
    import pyarrow.parquet as pq

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ends = dict.fromkeys(("id", "s2", "s1"), 0)
    rows = 0
    # pre_buffer=False: pyarrow's default pre-buffering kept the whole file's column chunks (RSS 557 MB instead of
    # 318 MB building from a 2M-row index; grows with the rows)
    with contextlib.ExitStack() as stack:
        files = {n: stack.enter_context(open(tmp / n, "wb"))
                 for n in ("rows.bin", "id.data", "s2_dates.values", "s1_dates.values")}  # fmt: skip
        pf = pq.ParquetFile(parquet, pre_buffer=False)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=[*COLUMNS, *LISTS, "id"]):
            n = batch.num_rows
            rows += n
            rec = np.zeros(n, RECORD)
            for c, dt in COLUMNS.items():
                rec[c] = batch.column(c).to_numpy(zero_copy_only=False).astype(dt, copy=False)
            for m in ("s2", "s1"):
                lst = batch.column(f"{m}_dates")
                offs = lst.offsets.to_numpy().astype(np.int64)
                if not np.array_equal(np.diff(offs), rec[f"n_{m}"]):
                    raise ValueError(f"{parquet}: {m}_dates lengths differ from n_{m}")
                rec[f"{m}_at"] = offs[:-1] - offs[0] + ends[m]
                ends[m] += int(offs[-1] - offs[0])
                vals = lst.flatten().to_numpy(zero_copy_only=False).astype(LISTS[f"{m}_dates"], copy=False)
                vals.tofile(files[f"{m}_dates.values"])
            offs, data = _string_parts(batch.column("id"))
            rec["id_at"], rec["id_len"] = offs[:-1] + ends["id"], np.diff(offs)
            ends["id"] += int(offs[-1])
            files["id.data"].write(data)
            rec.tofile(files["rows.bin"])
    meta = {"format": FORMAT, "rows": rows, "record": RECORD.descr, "lists": LISTS,
            "parquet_fingerprint": fingerprint(parquet)}  # fmt: skip
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    try:
        os.rename(tmp, out)
    except OSError:  # another process committed the same folder first: same input, same bytes
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _locations(root: Path, fp: str) -> list[Path]:
    name = f"index-v{FORMAT}-{fp}.cols"
    cache = Path(os.environ.get("DATAPREP_INDEX_CACHE") or Path(tempfile.gettempdir()) / "dataprep-index")
    return [root / name, cache / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16] / name]


def ensure(root: str | os.PathLike) -> Path:
    """The index folder of root/index.parquet, built first when missing or stale."""
    root = Path(root)
    fp = fingerprint(root / "index.parquet")
    places = _locations(root, fp)
    for p in places:
        if (p / "meta.json").exists():
            return p
    for p in places:
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            out = build(root / "index.parquet", p)
        except PermissionError:
            continue
        for old in p.parent.glob("index-*.cols"):  # folders of an earlier index.parquet
            if old.name != p.name:
                shutil.rmtree(old, ignore_errors=True)
        return out
    raise PermissionError(f"{root}: cannot write the index folder beside index.parquet nor in {places[-1].parent}")


class IndexColumns:
    """The index of a dataset, read a row at a time (`row`, `id`, `dates_of`) with pread; `cols[name]`: (N,)
    read-only views of the mapped record file, for vectorised use."""

    def __init__(self, root: str | os.PathLike):
        d = ensure(root)
        meta = json.loads((d / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d}: index format {meta.get('format')}, this reader reads {FORMAT}")
        self.n = int(meta["rows"])
        self.path = d
        self._rec = np.dtype([tuple(f) for f in meta["record"]])
        self._names = [n for n in self._rec.names if n in COLUMNS]
        self._list_dt = {c[:2]: np.dtype(dt) for c, dt in meta["lists"].items()}
        self._fds: dict[str, int] = {}
        self._cols: dict | None = None

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def __len__(self) -> int:
        return self.n

    def _read(self, name: str, nbytes: int, offset: int) -> bytes:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.path / name, os.O_RDONLY)
        b = os.pread(fd, nbytes, offset)
        if len(b) != nbytes:
            raise ValueError(f"{self.path / name}: truncated ({len(b)} of {nbytes} bytes at {offset})")
        return b

    def _record(self, i: int) -> dict:
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"row {i} outside an index of {self.n} rows")
        i += self.n if i < 0 else 0
        size = self._rec.itemsize
        return dict(zip(self._rec.names, np.frombuffer(self._read("rows.bin", size, i * size), self._rec)[0].item()))

    def row(self, i: int) -> dict:
        """Every fixed-width column of row i as Python scalars."""
        r = self._record(i)
        return {n: r[n] for n in self._names}

    def id(self, i: int) -> str:
        r = self._record(i)
        return self._read("id.data", r["id_len"], r["id_at"]).decode() if r["id_len"] else ""

    def _dates(self, m: str, r: dict) -> np.ndarray:
        dt, k = self._list_dt[m], r[f"n_{m}"]
        if k == 0:
            return np.zeros(0, dt)
        return np.frombuffer(self._read(f"{m}_dates.values", k * dt.itemsize, r[f"{m}_at"] * dt.itemsize), dt).copy()

    def dates_of(self, m: str, i: int) -> np.ndarray:
        """(T,) int32 dates of modality m ("s2"/"s1") of row i."""
        return self._dates(m, self._record(i))

    def meta(self, i: int) -> dict:
        """row(i) plus "id", "s2_dates", "s1_dates", from one record read."""
        r = self._record(i)
        out = {n: r[n] for n in self._names}
        out["id"] = self._read("id.data", r["id_len"], r["id_at"]).decode() if r["id_len"] else ""
        for m in ("s2", "s1"):
            out[f"{m}_dates"] = self._dates(m, r)
        return out

    @property
    def cols(self) -> dict[str, np.ndarray]:
        if self._cols is None:
            if self.n == 0:
                recs = np.zeros(0, self._rec)
            else:
                with open(self.path / "rows.bin", "rb") as f:
                    recs = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), self._rec)
            self._cols = {n: recs[n] for n in self._names}
        return self._cols
