"""`python -m dataprep convert`: plan the manifest, convert this rank's shards with N worker processes,
then (rank 0) merge the per-shard metadata into index.parquet, errors.parquet and dataset.json."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import index, remote
from . import shard as shard_mod
from .manifest import RowRange, plan_rows, scan, sha256_file
from .schema import HR_BANDS, REGION_DEG, S1_BANDS, S2_BANDS, SCHEMA_VERSION, n_regions
from .shard import ShardConfig, StrictStop, read_shard_meta, shard_name, write_shard


@dataclass(kw_only=True, slots=True)
class ConvertConfig:
    """A conversion run: inputs, output, the shard layout and how the work is split."""

    manifest: str
    out: str
    root: str | None = None  # confine every path to this directory
    shard: ShardConfig = field(default_factory=ShardConfig)
    workers: int = 1
    rank: int = 0
    world_size: int = 1
    strict: bool = False
    progress: bool = True
    metrics_port: int | None = None
    merge_timeout_s: float = 24 * 3600.0  # rank 0 waits this long for the other ranks' shards
    stage: str | None = None  # out = s3://...: the local staging folder (default: one per URL in the temp dir)
    keep_stage: bool = False  # out = s3://...: keep uploaded shards in the staging folder


INDEX_SCHEMA = pa.schema([
    ("id", pa.string()), ("shard", pa.int32()), ("row", pa.int32()), ("manifest_row", pa.int64()),
    ("lon", pa.float64()), ("lat", pa.float64()), ("region", pa.int32()), ("label", pa.int32()),
    ("has_hr", pa.bool_()), ("has_osm", pa.bool_()), ("n_s2", pa.int32()), ("n_s1", pa.int32()),
    ("s2_start", pa.int64()), ("s1_start", pa.int64()),
    ("s2_dates", pa.list_(pa.int32())), ("s1_dates", pa.list_(pa.int32())),
    ("hr_crc32c", pa.uint32()), ("s2_crc32c", pa.uint32()), ("s1_crc32c", pa.uint32()), ("source", pa.string()),
    ("lonlat_source", pa.string()), ("s2_missing_bands", pa.list_(pa.string())),
    ("s1_missing_bands", pa.list_(pa.string())), ("s2_cloud", pa.list_(pa.float32())),
    ("s2_nodata", pa.list_(pa.float32())), ("s1_nodata", pa.list_(pa.float32())), ("s2_cloud_skipped", pa.int32()),
])  # fmt: skip
# Columns added after the first schema: a shard row that lacks them (written before) gets these (null: unknown).
ROW_DEFAULTS = {"lonlat_source": "manifest", "s2_missing_bands": None, "s1_missing_bands": None, "s2_cloud": None,
                "s2_nodata": None, "s1_nodata": None, "s2_cloud_skipped": None}  # fmt: skip
ERRORS_SCHEMA = pa.schema([
    ("id", pa.string()), ("manifest_row", pa.int64()), ("shard", pa.int32()), ("kind", pa.string()),
    ("message", pa.string()), ("path", pa.string()),
])  # fmt: skip


class _Metrics:
    """Prometheus counters, served only when a port is given."""

    def __init__(self, port: int | None):
        self.on = port is not None
        if not self.on:
            return
        from prometheus_client import CollectorRegistry, Counter, start_http_server

        self.registry = CollectorRegistry()  # own registry: several runs in one process must not collide
        kw = {"registry": self.registry}
        self.sets = Counter("dataprep_sets", "image sets converted", **kw)
        self.rows = Counter("dataprep_rows", "manifest rows processed (converted or rejected), counted per set", **kw)
        self.bytes_in = Counter("dataprep_bytes_in", "bytes of source files read", **kw)
        self.bytes_out = Counter("dataprep_bytes_out", "bytes of shard stores written", **kw)
        self.rejects = Counter("dataprep_rejects", "rejected manifest rows", ["kind"], **kw)
        self.shards = Counter("dataprep_shards", "shard stores committed", **kw)
        self.server, self.thread = start_http_server(port, registry=self.registry)

    def close(self) -> None:
        if self.on:
            self.server.shutdown()

    def row_done(self, n: int = 1) -> None:
        if self.on:
            self.rows.inc(n)

    def update(self, s: dict) -> None:
        if not self.on:
            return
        self.sets.inc(s["sets"])
        self.bytes_in.inc(s["bytes_in"])
        self.bytes_out.inc(s["bytes_out"])
        self.shards.inc()
        for k, v in s["rejects"].items():
            self.rejects.labels(kind=k).inc(v)


def _work(args):
    k, manifest, root, rows, cfg, shards_dir, strict = args
    return write_shard(k, plan_rows(manifest, root, rows), cfg, shards_dir, strict)


def _count_rows_into(counter) -> None:
    """Pool initializer: every row a worker finishes adds 1 to the shared counter the parent polls."""

    def done() -> None:
        with counter.get_lock():
            counter.value += 1

    shard_mod.ON_ROW = done


def _clean_tmp(shards_dir: str, mine: set[int]) -> None:
    """Remove temporary shards left by killed runs (only for shards this rank owns)."""
    for name in os.listdir(shards_dir):
        if name.startswith(".tmp-shard-"):
            k = int(name[len(".tmp-shard-") :].split(".", 1)[0])
            if k in mine:
                shutil.rmtree(os.path.join(shards_dir, name), ignore_errors=True)


def convert(cfg: ConvertConfig) -> int:
    """Run one rank of a conversion. Returns the exit status: 0 clean, 1 rows rejected, 2 stopped/failed."""
    K = cfg.shard.shard_size
    try:  # this rank's shards' rows are decoded by the workers converting them; here they are only located
        sc = scan(cfg.manifest, K, keep=lambda k: k % cfg.world_size == cfg.rank)
    except (OSError, ValueError) as e:  # the manifest itself is unreadable: nothing to convert row by row
        print(f"dataprep: cannot read manifest {cfg.manifest}: {e}", file=sys.stderr)
        return 2
    cfg.shard.has_osm = sc.has_osm  # every rank reaches the same answer: any row names an osm file
    target = None
    if remote.is_url(cfg.out):
        from .s3write import S3Error, S3Target

        try:
            target = S3Target(cfg.out, cfg.stage, cfg.keep_stage)
        except (S3Error, ValueError) as e:
            print(f"dataprep: {e}", file=sys.stderr)
            return 2
        cfg = replace(cfg, out=str(target.stage))
    n_shards = max(1, math.ceil(sc.rows / K))
    shards_dir = os.path.join(cfg.out, "shards")
    os.makedirs(shards_dir, exist_ok=True)
    mine = list(range(cfg.rank, n_shards, cfg.world_size))
    _clean_tmp(shards_dir, set(mine))
    if target is None:
        return _convert(cfg, sc.shards, n_shards, shards_dir, mine, None)
    try:
        return _convert(cfg, sc.shards, n_shards, shards_dir, mine, target)
    except S3Error as e:
        print(f"dataprep: {e}", file=sys.stderr)
        return 2


def _convert(cfg: ConvertConfig, ranges: dict[int, RowRange], n_shards: int, shards_dir: str, mine: list[int],
             target) -> int:  # fmt: skip
    fp = cfg.shard.fingerprint()
    todo, staged = [], []  # to convert; converted in the stage but not uploaded yet (out = s3://...)
    for k in mine:
        meta = target.shard_meta(k) if target is not None else None
        if meta is None:
            meta = read_shard_meta(os.path.join(shards_dir, shard_name(k)))
            if meta is not None and target is not None:
                staged.append(k)
        if meta is None:
            todo.append(k)
        elif meta["config"] != fp:
            print(f"dataprep: {shard_name(k)} was written with other settings {meta['config']}; "
                  f"use a fresh --out or the same settings", file=sys.stderr)  # fmt: skip
            return 2
    for k in staged:
        target.upload_shard(k)
    metrics = _Metrics(cfg.metrics_port)
    try:
        return _run(cfg, ranges, n_shards, shards_dir, mine, todo, metrics, target)
    finally:
        metrics.close()


def _run(cfg: ConvertConfig, ranges: dict[int, RowRange], n_shards: int, shards_dir: str, mine: list[int],
         todo: list[int], metrics: _Metrics, target=None) -> int:  # fmt: skip
    def meta_of(k: int) -> dict | None:
        return read_shard_meta(os.path.join(shards_dir, shard_name(k))) if target is None else target.shard_meta(k)

    def committed(s: dict) -> None:  # a shard is complete: with an S3 output, upload it now
        if target is not None:
            target.upload_shard(s["shard"])
        metrics.update(s)
    tasks = [(k, cfg.manifest, cfg.root, ranges[k], cfg.shard, shards_dir, cfg.strict) for k in todo]
    total_rows = sum(t[3].last - t[3].first for t in tasks)
    from tqdm import tqdm

    bar = tqdm(total=total_rows, unit="set", desc=f"dataprep rank {cfg.rank}",
               disable=not cfg.progress or total_rows == 0)
    status, pool, rejected = 0, None, 0

    def advance(n: int) -> None:  # per set: the bar and the rows counter
        bar.update(n)
        metrics.row_done(n)

    try:
        if cfg.workers <= 1:
            shard_mod.ON_ROW = lambda: advance(1)
            for s in map(_work, tasks):
                committed(s)
                rejected += sum(s["rejects"].values())
                bar.set_postfix(rejected=rejected)
        else:
            # fork is cheap and safe here: zarr resets its event loop in forked children (register_at_fork)
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            counter, seen = ctx.Value("q", 0), 0
            pool = ctx.Pool(cfg.workers, initializer=_count_rows_into, initargs=(counter,))
            results, left = pool.imap_unordered(_work, tasks), len(tasks)
            while left:
                try:
                    s = results.next(timeout=0.5)
                except mp.TimeoutError:
                    s = None
                now = counter.value
                if now > seen:
                    advance(now - seen)
                    seen = now
                if s is not None:
                    left -= 1
                    committed(s)
                    rejected += sum(s["rejects"].values())
                    bar.set_postfix(rejected=rejected)
            pool.close()
            pool.join()
            if counter.value > seen:
                advance(counter.value - seen)
    except StrictStop as e:
        print(f"dataprep: --strict: {e}", file=sys.stderr)
        if pool is not None:
            pool.terminate()
        return 2
    finally:
        shard_mod.ON_ROW = None
        bar.close()
    if cfg.rank == 0:
        deadline = time.monotonic() + cfg.merge_timeout_s
        done = (lambda k: os.path.isdir(os.path.join(shards_dir, shard_name(k)))) if target is None else \
            target.has_shard  # fmt: skip
        first = 0  # shards [0, first) are present; on S3 each HEAD is asked once, `depth` of them at a time
        depth = 1 if target is None else MERGE_FETCH_THREADS
        while True:
            for present in ahead(done, range(first, n_shards), depth):
                if not present:
                    break
                first += 1
            if first == n_shards:
                break
            if time.monotonic() > deadline:
                print("dataprep: timed out waiting for the other ranks' shards", file=sys.stderr)
                return 2
            time.sleep(1.0)
        try:
            summary = merge(cfg, n_shards, meta_of, prefetch=depth)
        except StrictStop as e:  # a duplicate id: only the merge sees every id
            print(f"dataprep: --strict: {e}", file=sys.stderr)
            return 2
        if target is not None:
            target.upload_dataset_files()
        status = 1 if summary["rejected"] else 0
        print(json.dumps({k: summary[k] for k in ("sets", "rejected", "shards", "rejected_by_kind")}))
    else:
        # Other ranks exit 0 on rejects (rank 0's merged status reports them): a launcher such as deepspeed's
        # kills every rank when one exits non-zero, which would stop rank 0 mid-merge.
        n_rej = sum(len(meta_of(k)["errors"]) for k in mine)
        print(json.dumps({"rank": cfg.rank, "shards": len(mine), "rejected": n_rej}))
    return status


MERGE_BATCH = 1 << 14  # rows per Parquet write in the merge: bounds rank 0's memory whatever the dataset size
MERGE_FETCH_THREADS = 16  # shard metadata objects in flight at once in an object-store merge (latency-bound GETs)


def ahead(fetch: Callable, keys, depth: int):
    """fetch(k) for k in keys, yielded in order, with up to `depth` calls in flight on threads (so an object store's
    per-request latency overlaps the caller's work; memory: `depth` results). depth <= 1: plain map."""
    if depth <= 1:
        yield from map(fetch, keys)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(depth) as pool:
        pending: deque = deque()
        try:
            for k in keys:
                pending.append(pool.submit(fetch, k))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the caller stopped early or a fetch failed: drop what is still queued
            for f in pending:
                f.cancel()


class _BatchedTable:
    """A Parquet file written in batches of MERGE_BATCH rows under a temporary name; `commit` renames it."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.schema, self.tmp = path, schema, path + f".tmp-{os.getpid()}"
        self.writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")
        self.cols: dict[str, list] = {f.name: [] for f in schema}
        self.n = self.rows = 0

    def add(self, row: dict) -> None:
        for name, col in self.cols.items():
            col.append(row[name])
        self.n += 1
        if self.n >= MERGE_BATCH:
            self.flush()

    def add_table(self, t: pa.Table) -> None:
        """Rows as an Arrow table, written as one row group."""
        self.flush()
        self.writer.write_table(t)
        self.rows += len(t)

    def flush(self) -> None:
        if self.n:
            self.writer.write_table(pa.table(self.cols, schema=self.schema))
        self.rows += self.n
        self.cols = {name: [] for name in self.cols}
        self.n = 0

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def commit(self) -> None:
        self.close()
        os.replace(self.tmp, self.path)


def _duplicates(path: str, hashes: array) -> list[dict]:
    """The rows of the index file at `path` whose id an earlier row already has, in file order, each with the
    manifest row of the id's first occurrence ("of"). Candidates come from the ids' 64-bit hashes (8 B a row, so
    21M rows cost 168 MB), confirmed by comparing the ids themselves."""
    h = np.frombuffer(hashes, np.int64)
    s = np.sort(h)
    repeated = s[1:][s[1:] == s[:-1]]
    if not len(repeated):
        return []
    candidate = np.isin(h, repeated)
    first: dict[str, int] = {}
    out, pos = [], 0
    for b in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=MERGE_BATCH,
                                               columns=["id", "manifest_row", "shard", "n_s2", "n_s1"]):  # fmt: skip
        sel = np.nonzero(candidate[pos : pos + len(b)])[0]
        for i, r in zip(sel, b.take(pa.array(sel)).to_pylist()):
            if r["id"] in first:
                out.append({**r, "position": pos + int(i), "of": first[r["id"]]})
            else:
                first[r["id"]] = r["manifest_row"]
        pos += len(b)
    return out


def _drop_duplicates(rows: _BatchedTable, errors: _BatchedTable, dups: list[dict]) -> None:
    """Rewrite the closed index file without the rows `dups`, and the closed errors file with their duplicate_id
    errors in the places a single rank would have put them (shard, then manifest row); both stream in batches."""
    drop = np.zeros(rows.rows, bool)
    drop[[d["position"] for d in dups]] = True
    rows_in, errors_in = rows.tmp + ".in", errors.tmp + ".in"
    os.replace(rows.tmp, rows_in)
    os.replace(errors.tmp, errors_in)
    new_rows = _BatchedTable(rows.path, rows.schema)
    pos = 0
    for b in pq.ParquetFile(rows_in, pre_buffer=False).iter_batches(batch_size=MERGE_BATCH):
        new_rows.add_table(pa.Table.from_batches([b.filter(pa.array(~drop[pos : pos + len(b)]))]))
        pos += len(b)
    new_rows.commit()
    added = [{"id": d["id"], "manifest_row": d["manifest_row"], "shard": d["shard"], "kind": "duplicate_id",
              "message": f"id {d['id']}: duplicate of manifest row {d['of']}", "path": ""} for d in dups]  # fmt: skip
    new_errors, j = _BatchedTable(errors.path, errors.schema), 0
    for b in pq.ParquetFile(errors_in, pre_buffer=False).iter_batches(batch_size=MERGE_BATCH):
        for e in b.to_pylist():
            while j < len(added) and (added[j]["shard"], added[j]["manifest_row"]) < (e["shard"], e["manifest_row"]):
                new_errors.add(added[j])
                j += 1
            new_errors.add(e)
    for e in added[j:]:
        new_errors.add(e)
    new_errors.commit()
    os.remove(rows_in)
    os.remove(errors_in)
    rows.rows, errors.rows = new_rows.rows, new_errors.rows


def merge(cfg: ConvertConfig, n_shards: int, meta_of: Callable[[int], dict | None] | None = None,
          prefetch: int = 1) -> dict:  # fmt: skip
    """Stream every shard's rows, errors and stats (in shard order) into the dataset-level files in cfg.out;
    `meta_of(k)`: shard k's metadata (default: read from cfg.out/shards), `prefetch` of them fetched at once."""
    shards_dir = os.path.join(cfg.out, "shards")
    if meta_of is None:
        meta_of = lambda k: read_shard_meta(os.path.join(shards_dir, shard_name(k)))  # noqa: E731
    source = os.path.basename(cfg.manifest)
    rows = _BatchedTable(os.path.join(cfg.out, "index.parquet"), INDEX_SCHEMA)
    errors = _BatchedTable(os.path.join(cfg.out, "errors.parquet"), ERRORS_SCHEMA)
    acc = {m: {"count": 0, "sum": None, "sumsq": None} for m in ("hr", "s2", "s1")}
    frames = {"s2": 0, "s1": 0}
    by_kind: dict[str, int] = {}
    hashes = array("q")  # of every row's id, for the duplicate check (no rank saw the other ranks' ids)
    for k, meta in enumerate(ahead(meta_of, range(n_shards), prefetch)):
        for r in meta["rows"]:
            rows.add({**ROW_DEFAULTS, **r, "shard": k, "source": source})
            hashes.append(hash(r["id"]))
            frames["s2"] += r["n_s2"]
            frames["s1"] += r["n_s1"]
        for e in meta["errors"]:
            errors.add({**e, "shard": k})
            by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
        for m, st in meta["stats"].items():
            a = acc[m]
            a["count"] = a["count"] + np.array(st["count"])  # per band (older shards: one count for all)
            a["sum"] = np.array(st["sum"]) if a["sum"] is None else a["sum"] + np.array(st["sum"])
            a["sumsq"] = np.array(st["sumsq"]) if a["sumsq"] is None else a["sumsq"] + np.array(st["sumsq"])
        del meta
    rows.close()
    errors.close()
    dups = _duplicates(rows.tmp, hashes)
    del hashes
    if dups and cfg.strict:
        os.remove(rows.tmp)
        os.remove(errors.tmp)
        d = dups[0]
        raise StrictStop(f"manifest row {d['manifest_row']} (id {d['id']!r}): duplicate_id: "
                         f"id {d['id']}: duplicate of manifest row {d['of']}")  # fmt: skip
    if dups:  # their sets stay in the shards unlisted; the band statistics include their pixels
        _drop_duplicates(rows, errors, dups)
        by_kind["duplicate_id"] = by_kind.get("duplicate_id", 0) + len(dups)
        for d in dups:
            frames["s2"] -= d["n_s2"]
            frames["s1"] -= d["n_s1"]
    else:
        os.replace(rows.tmp, rows.path)
        os.replace(errors.tmp, errors.path)
    index.ensure(cfg.out)  # the row index the trainer's reader reads (dataprep.index)
    stats = {}
    for m, a in acc.items():
        c = np.maximum(a["count"], 1)
        mean = a["sum"] / c
        std = np.sqrt(np.maximum(a["sumsq"] / c - mean**2, 0.0))
        stats[m] = {"mean": mean.tolist(), "std": std.tolist(), "pixels_per_band": np.asarray(a["count"]).tolist()}
    summary = {
        "schema_version": SCHEMA_VERSION,
        "layout": "shards/shard-NNNNN.zarr (Zarr v3); see docs/dataprep.md",
        "bands": {"hr": list(HR_BANDS), "s2": list(S2_BANDS), "s1": list(S1_BANDS)},
        "dtypes": {"hr": "uint8", "s2": "uint16", "s1": "float32", "osm": "uint8"},
        "units": {"s2": "reflectance x 1e4", "s1": "backscatter dB", "dates": "days since 1970-01-01"},
        "hr_size": cfg.shard.hr_size,
        "s2_size": cfg.shard.s2_size,
        "shard_size": cfg.shard.shard_size,
        "has_osm": cfg.shard.has_osm,
        "stats": stats,
        "sets": rows.rows,
        "rejected": errors.rows,
        "rejected_by_kind": dict(sorted(by_kind.items())),
        "frames": frames,
        "shards": n_shards,
        "region": {"grid_deg": REGION_DEG, "n_regions": n_regions()},
        "manifest": {"name": source, "sha256": sha256_file(cfg.manifest), "rows": rows.rows + errors.rows},
        "config": cfg.shard.fingerprint(),
    }
    tmp = os.path.join(cfg.out, f"dataset.json.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(cfg.out, "dataset.json"))
    return summary
