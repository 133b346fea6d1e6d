"""`python -m dataprep verify DIR`: read every chunk (crc32c checked by the codec) and cross-check
index.parquet, errors.parquet and dataset.json against the shard stores. Each problem is printed on its own line."""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np

from .shard import crc, read_shard_meta, shard_name


def _locate(arr, lo: int, hi: int) -> list[str]:
    """Find the corrupt inner chunks of arr[lo:hi] (first axis) one chunk at a time."""
    bad = []
    ch = arr.chunks
    ranges = [range(lo // ch[0], -(-hi // ch[0]))] + [range(-(-s // c)) for s, c in zip(arr.shape[1:], ch[1:])]
    for idx in itertools.product(*ranges):
        sl = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, ch, arr.shape))
        try:
            arr[sl]
        except Exception as e:  # noqa: BLE001 - any decode failure is a finding
            bad.append(f"chunk {'/'.join(map(str, idx))} (elements {[(s.start, s.stop) for s in sl]}): "
                       f"{type(e).__name__}: {e}")  # fmt: skip
    return bad or [f"elements [{lo}:{hi}] unreadable, but no single chunk fails (shard index?)"]


def _read(arr, lo: int, hi: int, where: str, problems: list[str]):
    try:
        return arr[lo:hi]
    except Exception:  # noqa: BLE001
        problems.extend(f"{where}: corrupt {c}" for c in _locate(arr, lo, hi))
        return None


def verify(root: str, out=sys.stdout) -> int:
    """Returns 0 when the dataset is intact, 1 when any problem was found (each printed)."""
    import pyarrow.parquet as pq
    import zarr

    problems: list[str] = []
    try:
        with open(os.path.join(root, "dataset.json")) as f:
            info = json.load(f)
        idx = pq.read_table(os.path.join(root, "index.parquet")).to_pylist()
        errs = pq.read_table(os.path.join(root, "errors.parquet")).to_pylist()
    except (OSError, ValueError) as e:
        print(f"FAIL {root}: dataset files unreadable: {e}", file=out)
        return 1
    if len(idx) != info["sets"] or len(errs) != info["rejected"]:
        problems.append(f"dataset.json counts sets={info['sets']} rejected={info['rejected']} but index has "
                        f"{len(idx)} rows and errors {len(errs)}")  # fmt: skip
    if len(idx) + len(errs) != info["manifest"]["rows"]:
        problems.append(f"index + errors = {len(idx) + len(errs)} rows, manifest has {info['manifest']['rows']}")
    rows_seen = sorted(r["manifest_row"] for r in idx + errs)
    if rows_seen != list(range(len(rows_seen))):
        problems.append("manifest rows are missing or repeated across index.parquet and errors.parquet")
    ids = [r["id"] for r in idx]
    if len(set(ids)) != len(ids):
        problems.append("duplicate ids in index.parquet")
    by_shard: dict[int, list[dict]] = {}
    for r in idx:
        by_shard.setdefault(r["shard"], []).append(r)
    n_checked = 0
    for k in range(info["shards"]):
        path = os.path.join(root, "shards", shard_name(k))
        meta = read_shard_meta(path)
        if meta is None:
            problems.append(f"{shard_name(k)}: missing or has no dataprep metadata")
            continue
        rows = sorted(by_shard.get(k, []), key=lambda r: r["row"])
        if [r["id"] for r in rows] != [r["id"] for r in meta["rows"]]:
            problems.append(f"{shard_name(k)}: index rows differ from the shard's own row list")
        try:
            g = zarr.open_group(path, mode="r", zarr_format=3)
            arrs = {n: g[n] for n in ("hr", "s2", "s1", "s2_offsets", "s1_offsets", "s2_dates", "s1_dates")}
        except Exception as e:  # noqa: BLE001
            problems.append(f"{shard_name(k)}: cannot open arrays: {type(e).__name__}: {e}")
            continue
        if arrs["hr"].shape[0] != len(rows):
            problems.append(f"{shard_name(k)}/hr: {arrs['hr'].shape[0]} images for {len(rows)} index rows")
        for m in ("s2", "s1"):
            offs = _read(arrs[f"{m}_offsets"], 0, len(rows) + 1, f"{shard_name(k)}/{m}_offsets", problems)
            dates = _read(arrs[f"{m}_dates"], 0, arrs[f"{m}_dates"].shape[0], f"{shard_name(k)}/{m}_dates", problems)
            want = np.concatenate([[0], np.cumsum([r[f"n_{m}"] for r in rows])]).astype(np.int64)
            if offs is not None and not np.array_equal(offs, want):
                problems.append(f"{shard_name(k)}/{m}_offsets disagree with index n_{m}")
            want_d = np.array([d for r in rows for d in r[f"{m}_dates"]], np.int32)
            if dates is not None and not np.array_equal(dates, want_d):
                problems.append(f"{shard_name(k)}/{m}_dates disagree with index {m}_dates")
            if arrs[m].shape[0] != want[-1]:
                problems.append(f"{shard_name(k)}/{m}: {arrs[m].shape[0]} frames, index says {want[-1]}")
        if "osm" in g:
            _read(g["osm"], 0, g["osm"].shape[0], f"{shard_name(k)}/osm", problems)
        for r in rows:
            where = f"{shard_name(k)} row {r['row']} (id {r['id']})"
            a = _read(arrs["hr"], r["row"], r["row"] + 1, f"{shard_name(k)}/hr", problems)
            if a is not None:
                if r["has_hr"] and crc(a[0]) != r["hr_crc32c"]:
                    problems.append(f"{where}: hr checksum mismatch with index")
                if not r["has_hr"] and a.any():
                    problems.append(f"{where}: has_hr is false but the hr image is not zero")
            for m in ("s2", "s1"):
                lo = r[f"{m}_start"]
                a = _read(arrs[m], lo, lo + r[f"n_{m}"], f"{shard_name(k)}/{m}", problems)
                if a is not None and crc(a) != r[f"{m}_crc32c"]:
                    problems.append(f"{where}: {m} checksum mismatch with index")
            n_checked += 1
    extra = sorted(n for n in os.listdir(os.path.join(root, "shards")) if n.endswith(".zarr")
                   and not n.startswith(".") and int(n[6:11]) >= info["shards"])  # fmt: skip
    problems.extend(f"{n}: shard store beyond dataset.json's {info['shards']} shards" for n in extra)
    for p in problems:
        print(f"FAIL {p}", file=out)
    print(f"verify {root}: {n_checked} sets in {info['shards']} shards checked, {len(problems)} problem(s)", file=out)
    return 1 if problems else 0
