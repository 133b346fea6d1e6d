"""`python -m dataprep bench-scale --rows N`: index memory and load time at scale, on a simulated index.

Writes a dataset folder holding only dataset.json and an N-row index.parquet (today's schema; ~75 S2 and ~10 S1
dates a row, as in the paper's data), then, each in a fresh process so nothing leaks between the figures:
first open (builds whatever the reader builds), second open (the load time a training run sees), and a parent
with W forked workers each reading the metadata of R random rows, as DataLoader workers do. Memory comes from
/proc/PID/smaps_rollup: RSS, PSS (shared pages split between the processes that map them) and anonymous
(private heap) memory, per process and summed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

BATCH = 1 << 18


def simulate_index(root: str, rows: int, seed: int = 0) -> None:
    """dataset.json + index.parquet of `rows` rows (INDEX_SCHEMA), written in bounded batches."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .convert import INDEX_SCHEMA

    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    shard_size = 256
    with pq.ParquetWriter(os.path.join(root, "index.parquet"), INDEX_SCHEMA, compression="zstd") as w:
        for lo in range(0, rows, BATCH):
            n = min(BATCH, rows - lo)
            i = np.arange(lo, lo + n)
            cols: dict = {"id": pa.array([f"sim-{k:09d}" for k in i.tolist()], pa.string()),
                          "shard": (i // shard_size).astype(np.int32), "row": (i % shard_size).astype(np.int32),
                          "manifest_row": i.astype(np.int64), "lon": rng.uniform(-180, 180, n),
                          "lat": rng.uniform(-60, 70, n), "region": rng.integers(0, 400, n, dtype=np.int32),
                          "label": np.full(n, -1, np.int32), "has_hr": rng.random(n) < 0.95,
                          "has_osm": np.zeros(n, bool)}  # fmt: skip
            for m, lo_t, hi_t in (("s2", 60, 91), ("s1", 5, 16)):
                t = rng.integers(lo_t, hi_t, n).astype(np.int32)
                offs = np.concatenate([[0], np.cumsum(t)]).astype(np.int32)
                vals = (18000 + rng.integers(0, 1500, int(offs[-1]))).astype(np.int32)
                cols[f"n_{m}"] = t
                cols[f"{m}_start"] = (np.cumsum(t) - t).astype(np.int64)
                cols[f"{m}_dates"] = pa.ListArray.from_arrays(pa.array(offs), pa.array(vals))
            for m in ("hr", "s2", "s1"):
                cols[f"{m}_crc32c"] = rng.integers(0, 2**32, n, dtype=np.uint32)
            cols["source"] = pa.array(["sim.parquet"] * n, pa.string())
            for f in INDEX_SCHEMA:  # the per-frame quality columns stay null (unknown) here
                if f.name not in cols:
                    cols[f.name] = pa.nulls(n, f.type)
            w.write_table(pa.table(cols, schema=INDEX_SCHEMA))
    zero = {m: {"mean": [0.0] * c, "std": [1.0] * c} for m, c in (("hr", 3), ("s2", 10), ("s1", 2))}
    with open(os.path.join(root, "dataset.json"), "w") as f:
        json.dump({"hr_size": 2048, "s2_size": 64, "has_osm": False, "stats": zero, "sets": rows}, f)


def simulate_shards(out: str, rows: int, shard_size: int = 256, seed: int = 0) -> int:
    """Shard folders holding only the dataprep metadata a merge reads (rows, errors, stats), like convert's."""
    from .shard import ShardConfig, shard_name

    rng = np.random.default_rng(seed)
    cfg = ShardConfig(shard_size=shard_size).fingerprint()
    n_shards = -(-rows // shard_size)
    stats = {m: {"count": 1, "sum": [1.0] * c, "sumsq": [1.0] * c} for m, c in (("hr", 3), ("s2", 10), ("s1", 2))}
    for k in range(n_shards):
        lo, hi = k * shard_size, min(rows, (k + 1) * shard_size)
        recs, starts = [], {"s2": 0, "s1": 0}
        for j, i in enumerate(range(lo, hi)):
            d = {m: (18000 + np.cumsum(rng.integers(1, 10, int(rng.integers(a, b))))).tolist()
                 for m, a, b in (("s2", 60, 91), ("s1", 5, 16))}  # fmt: skip
            recs.append({"id": f"sim-{i:09d}", "row": j, "manifest_row": i, "lon": 1.0, "lat": 2.0, "region": 3,
                         "label": -1, "has_hr": True, "has_osm": False, "n_s2": len(d["s2"]), "n_s1": len(d["s1"]),
                         "s2_start": starts["s2"], "s1_start": starts["s1"], "s2_dates": d["s2"], "s1_dates": d["s1"],
                         "hr_crc32c": 1, "s2_crc32c": 2, "s1_crc32c": 3})  # fmt: skip
            starts = {m: starts[m] + len(d[m]) for m in starts}
        path = os.path.join(out, "shards", shard_name(k))
        os.makedirs(path, exist_ok=True)
        meta = {"shard": k, "config": cfg, "rows": recs, "errors": [], "stats": stats}
        with open(os.path.join(path, "zarr.json"), "w") as f:
            json.dump({"zarr_format": 3, "node_type": "group", "attributes": {"dataprep": meta}}, f)
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        f.write("{}\n")
    return n_shards


def _merge(out: str, n_shards: int) -> dict:
    """Rank 0's merge over simulated shard metadata: wall time and peak RSS of this fresh process."""
    import resource

    from .convert import ConvertConfig, merge

    t = time.perf_counter()
    s = merge(ConvertConfig(manifest=os.path.join(out, "manifest.jsonl"), out=out), n_shards)
    return {"merge_s": round(time.perf_counter() - t, 1), "sets": s["sets"],
            "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip


def simulate_manifest(path: str, rows: int, seed: int = 0) -> None:
    """A JSONL manifest of `rows` rows in the shape of the paper's sets: an HR file, an osm file, ~75 S2 and ~10 S1
    frames (file path and date each). Nothing it names exists: planning a manifest does no file I/O."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(rows):
            n = {"s2": int(rng.integers(60, 91)), "s1": int(rng.integers(5, 16))}
            fr = {m: [{"path": f"{m}/{i:09d}_{j:03d}.tif", "date": f"2021-{1 + j % 12:02d}-{1 + j // 12:02d}"}
                      for j in range(n[m])] for m in n}  # fmt: skip
            f.write(json.dumps({"id": f"sim-{i:09d}", "lon": 1.0, "lat": 2.0, "hr": f"hr/{i:09d}.png",
                                "osm": f"osm/{i:09d}.png", **fr}) + "\n")  # fmt: skip


def _plan_rank(path: str, shard_size: int, rank: int, world_size: int) -> dict:
    """What a convert rank does with the manifest before and while converting: scan it, then plan its own shards'
    rows one shard at a time (as its workers do); wall time of each and peak RSS."""
    import resource

    from .manifest import plan_rows, scan

    t = time.perf_counter()
    sc = scan(path, shard_size, keep=lambda k: k % world_size == rank)
    t_scan = time.perf_counter() - t
    own = sum(len(plan_rows(path, None, r)) for r in sc.shards.values())
    t_own = time.perf_counter() - t - t_scan
    return {"world_size": world_size, "scan_s": round(t_scan, 1), "plan_own_s": round(t_own, 1), "rows": sc.rows,
            "own_rows": own,
            "peak_rss_MB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip


def _merge_s3(out: str, n_shards: int, endpoint: str, url: str, depth: int) -> dict:
    """Rank 0's wait-for-shards check and merge reading the shards' metadata from S3 (`url` on `endpoint`), with
    `depth` requests in flight, as convert runs them."""
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    from .convert import ConvertConfig, ahead, merge
    from .s3write import S3Target

    target = S3Target(url, stage=out)
    t = time.perf_counter()
    present = sum(ahead(target.has_shard, range(n_shards), depth))
    t_wait = time.perf_counter() - t
    s = merge(ConvertConfig(manifest=os.path.join(out, "manifest.jsonl"), out=out), n_shards, target.shard_meta,
              prefetch=depth)  # fmt: skip
    t_merge = time.perf_counter() - t - t_wait
    return {"depth": depth, "present": present, "wait_s": round(t_wait, 1), "merge_s": round(t_merge, 1),
            "sets": s["sets"], "ms_per_shard": round((t_wait + t_merge) / n_shards * 1e3, 1)}  # fmt: skip


def _mem() -> dict:
    """This process's smaps_rollup in MB: rss, pss, anon (private heap), pss_file."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss_MB": round(out.get("Rss", 0), 1), "pss_MB": round(out.get("Pss", 0), 1),
            "anon_MB": round(out.get("Anonymous", 0), 1), "pss_file_MB": round(out.get("Pss_File", 0), 1)}


def _worker(reader, k: int, reads: int, q, go) -> None:
    rng = np.random.default_rng([7, k])
    t, c = time.perf_counter(), time.process_time()
    n = 0
    for i in rng.integers(0, len(reader), reads).tolist():
        m = reader.meta(i)
        n += len(m["s2_dates"]) + len(m["id"])
    # CPU per read is the steady figure on a shared machine; reads/s there measures the scheduler
    q.put({"worker": k, "meta_per_s": round(reads / (time.perf_counter() - t)),
           "meta_cpu_us": round((time.process_time() - c) / reads * 1e6, 1), **_mem(), "check": n})
    go.wait(600)  # stay alive until the parent has measured everyone (PSS splits shared pages among the living)


def _measure(root: str, workers: int, reads: int) -> dict:
    """One fresh process: open the reader, fork the workers, measure everyone while all are alive."""
    from .reader import DatasetReader

    base = _mem()
    t = time.perf_counter()
    r = DatasetReader(root)
    load_s = time.perf_counter() - t
    r.meta(0)
    after_open = _mem()
    ctx = mp.get_context("fork")
    q, go = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_worker, args=(r, k, reads, q, go)) for k in range(workers)]
    for p in procs:
        p.start()
    per = sorted((q.get(timeout=1200) for _ in procs), key=lambda d: d["worker"])
    parent = _mem()
    go.set()
    for p in procs:
        p.join(60)
    everyone = [parent] + per
    return {"load_s": round(load_s, 3), "interpreter": base, "parent_after_open": after_open,
            "parent_with_workers": parent, "workers": per,
            "total_pss_MB": round(sum(d["pss_MB"] for d in everyone), 1),
            "total_anon_MB": round(sum(d["anon_MB"] for d in everyone), 1),
            "max_rss_MB": max(d["rss_MB"] for d in everyone)}  # fmt: skip


def _fresh(fn: str, *args) -> dict:
    """Run `_measure`/`_open` in a new interpreter (nothing of this process's memory in its figures)."""
    code = f"import json, sys; from dataprep.bench_scale import {fn}; print(json.dumps({fn}(*json.loads(sys.argv[1]))))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(__file__)),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"bench-scale {fn} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _open(root: str) -> dict:
    from .reader import DatasetReader

    t = time.perf_counter()
    r = DatasetReader(root)
    return {"open_s": round(time.perf_counter() - t, 3), "rows": len(r), **_mem()}


def bench_scale(rows: int, workers: int = 4, reads: int = 20000, workdir: str | None = None, seed: int = 0,
                merge_rows: int = 0, manifest_rows: int = 0, world_size: int = 16,
                s3: bool = False) -> int:  # fmt: skip
    """Print the figures as JSON. workdir keeps the simulated index (and what the reader built) between runs.
    merge_rows > 0: instead, rank 0's merge (peak RSS, time) over that many rows of simulated shard metadata; with
    s3, also read from a moto S3 server, one request at a time and 16 in flight.
    manifest_rows > 0: instead, a convert rank's planning of a manifest that long, as rank 0 of `world_size` and
    alone (world size 1), each in a fresh process."""
    tmp = workdir or tempfile.mkdtemp(prefix="dataprep-bench-scale-")
    root = os.path.join(tmp, f"sim-{rows}")
    if manifest_rows:
        path = os.path.join(tmp, f"manifest-{manifest_rows}.jsonl")
        try:
            t = time.perf_counter()
            os.makedirs(tmp, exist_ok=True)
            if not os.path.exists(path):
                simulate_manifest(path, manifest_rows, seed)
            res = {"manifest_rows": manifest_rows, "manifest_MB": round(os.path.getsize(path) / 2**20, 1),
                   "simulate_s": round(time.perf_counter() - t, 1),
                   "ranks": [_fresh("_plan_rank", path, 256, 0, w) for w in (world_size, 1)]}  # fmt: skip
        finally:
            if workdir is None:
                shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(res, indent=1))
        return 0
    if merge_rows:
        out = os.path.join(tmp, f"merge-{merge_rows}")
        try:
            t = time.perf_counter()
            n_shards = simulate_shards(out, merge_rows, seed=seed)
            res = {"merge_rows": merge_rows, "shards": n_shards, "simulate_s": round(time.perf_counter() - t, 1),
                   **_fresh("_merge", out, n_shards)}  # fmt: skip
            if s3:  # the same merge reading the shards' metadata objects from a moto server on loopback
                from . import remote

                with remote.local_s3_server() as endpoint:
                    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
                    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
                    os.environ.setdefault("AWS_REGION", "us-east-1")
                    remote.upload(out, "s3://bench/merge", endpoint)
                    res["s3"] = [_fresh("_merge_s3", out, n_shards, endpoint, "s3://bench/merge", d) for d in (1, 16)]
        finally:
            if workdir is None:
                shutil.rmtree(tmp, ignore_errors=True)
        print(json.dumps(res, indent=1))
        return 0
    try:
        t = time.perf_counter()
        if not os.path.exists(os.path.join(root, "dataset.json")):
            simulate_index(root, rows, seed)
        res = {"rows": rows, "workers": workers, "reads_per_worker": reads,
               "simulate_s": round(time.perf_counter() - t, 1),
               "index_parquet_MB": round(os.path.getsize(os.path.join(root, "index.parquet")) / 2**20, 1),
               "first_open": _fresh("_open", root), "second_open": _fresh("_open", root),
               "with_workers": _fresh("_measure", root, workers, reads)}  # fmt: skip
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=1))
    return 0
