"""`python -m dataprep verify DIR|URL`: read every chunk (crc32c checked by the codec) and cross-check
index.parquet, errors.parquet and dataset.json against the shard stores. Each problem is printed on its own line.
A local folder and a URL on object storage go through the same checks (dataprep.store reads either)."""

from __future__ import annotations

import itertools
import sys

import numpy as np

from .shard import crc, shard_name
from .store import LocalStore, RemoteStore, open_store


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


def _verify_shard(args: tuple[LocalStore | RemoteStore, int, list[dict], set[int]]) -> tuple[list[str], int]:
    """One shard's checks: its row list against the index, offsets and dates, every chunk read (crc32c), every
    set's checksums. `unlisted`: manifest rows the merge rejected as duplicate ids, whose sets the shard stores
    without an index row. Returns (problems, sets checked)."""
    store, k, rows, unlisted = args
    problems: list[str] = []
    n_checked = 0
    meta = store.shard_meta(shard_name(k))
    if meta is None:
        problems.append(f"{shard_name(k)}: missing or has no dataprep metadata")
        return problems, n_checked
    listed = [r for r in meta["rows"] if r["manifest_row"] not in unlisted]
    stored = rows  # the rows the arrays hold, in order: the index's, and the shard's own for unlisted duplicates
    if [r["id"] for r in rows] != [r["id"] for r in listed]:
        problems.append(f"{shard_name(k)}: index rows differ from the shard's own row list")
    elif len(listed) < len(meta["rows"]):
        it = iter(rows)
        stored = [r if r["manifest_row"] in unlisted else next(it) for r in meta["rows"]]
    try:
        arrs = store.shard_arrays(shard_name(k))
    except Exception as e:  # noqa: BLE001
        problems.append(f"{shard_name(k)}: cannot open arrays: {type(e).__name__}: {e}")
        return problems, n_checked
    if arrs["hr"].shape[0] != len(stored):
        problems.append(f"{shard_name(k)}/hr: {arrs['hr'].shape[0]} images for {len(stored)} stored rows")
    for m in ("s2", "s1"):
        offs = _read(arrs[f"{m}_offsets"], 0, len(stored) + 1, f"{shard_name(k)}/{m}_offsets", problems)
        dates = _read(arrs[f"{m}_dates"], 0, arrs[f"{m}_dates"].shape[0], f"{shard_name(k)}/{m}_dates", problems)
        want = np.concatenate([[0], np.cumsum([r[f"n_{m}"] for r in stored])]).astype(np.int64)
        if offs is not None and not np.array_equal(offs, want):
            problems.append(f"{shard_name(k)}/{m}_offsets disagree with index n_{m}")
        want_d = np.array([d for r in stored for d in r[f"{m}_dates"]], np.int32)
        if dates is not None and not np.array_equal(dates, want_d):
            problems.append(f"{shard_name(k)}/{m}_dates disagree with index {m}_dates")
        if arrs[m].shape[0] != want[-1]:
            problems.append(f"{shard_name(k)}/{m}: {arrs[m].shape[0]} frames, index says {want[-1]}")
    if "osm" in arrs:
        _read(arrs["osm"], 0, arrs["osm"].shape[0], f"{shard_name(k)}/osm", problems)
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
    return problems, n_checked


def verify(root: str, out=sys.stdout, *, workers: int = 1, rank: int = 0, world_size: int = 1,
           progress: bool = False) -> int:  # fmt: skip
    """Returns 0 when the dataset at `root` (folder or URL) is intact, 1 when any problem was found (each printed).

    `workers` processes check shards in parallel; with `world_size` > 1 this rank checks shards k with
    k % world_size == rank (as convert writes them) and rank 0 also the dataset-wide files.
    """
    store = open_store(root)
    problems: list[str] = []
    try:
        info, idx, errs = store.dataset_files()
        idx, errs = idx.to_pylist(), errs.to_pylist()
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
    if rank != 0:  # the dataset-wide checks are rank 0's; every rank checks its own shards
        problems = []
    mine = [k for k in range(info["shards"]) if k % world_size == rank]
    dups: dict[int, set[int]] = {}  # shard -> manifest rows rejected by the merge as duplicate ids
    for e in errs:
        if e["kind"] == "duplicate_id":
            dups.setdefault(e["shard"], set()).add(e["manifest_row"])
    tasks = [(store, k, sorted(by_shard.get(k, []), key=lambda r: r["row"]), dups.get(k, set())) for k in mine]
    n_checked = 0
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t[2]) for t in tasks), unit="set", desc="verify", disable=not progress,
               file=sys.stderr)  # fmt: skip
    pool = None
    try:
        if workers > 1 and len(tasks) > 1:
            import multiprocessing as mp

            ctx = mp.get_context(store.mp_context)
            pool = ctx.Pool(min(workers, len(tasks)))
            results = pool.imap(_verify_shard, tasks)  # in shard order: the report reads the same either way
        else:
            results = map(_verify_shard, tasks)
        for (found, n), task in zip(results, tasks, strict=True):
            problems.extend(found)
            n_checked += n
            bar.update(len(task[2]))
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    if rank == 0:
        extra = sorted(n for n in store.shard_names(shard_name(info["shards"])) if n.endswith(".zarr")
                       and not n.startswith(".") and int(n[6:11]) >= info["shards"])  # fmt: skip
        problems.extend(f"{n}: shard store beyond dataset.json's {info['shards']} shards" for n in extra)
    for p in problems:
        print(f"FAIL {p}", file=out)
    part = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    print(f"verify {root}{part}: {n_checked} sets in {len(mine)} shards checked, {len(problems)} problem(s)",
          file=out)  # fmt: skip
    return 1 if problems else 0
