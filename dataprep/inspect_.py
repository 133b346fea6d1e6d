"""`python -m dataprep inspect DIR|URL`: counts, sizes, compression per modality, band statistics, dates, rejects.
A URL on object storage is read through dataprep.store and prints what its local copy prints."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from .schema import N_BANDS, days_to_iso
from .shard import shard_name
from .store import open_store


def summarise(root: str) -> dict:
    store = open_store(root)
    info, idx, errs = store.dataset_files()
    H, h = info["hr_size"], info["s2_size"]
    raw = {
        "hr": int(np.sum(idx.column("has_hr").to_numpy())) * 3 * H * H,
        "s2": info["frames"]["s2"] * N_BANDS["s2"] * h * h * 2,
        "s1": info["frames"]["s1"] * N_BANDS["s1"] * h * h * 4,
    }
    mods = ("hr", "s2", "s1", "osm")
    folders = [f"shards/{shard_name(k)}/{m}" for k in range(info["shards"]) for m in mods]
    *per_folder, total = store.bytes_under([*folders, ""])  # a folder that is not there holds 0 bytes
    disk = {m: sum(per_folder[j :: len(mods)]) for j, m in enumerate(mods)}
    out = {
        "sets": info["sets"], "rejected": info["rejected"], "shards": info["shards"],
        "frames": info["frames"], "hr_size": H, "s2_size": h,
        "with_hr": int(np.sum(idx.column("has_hr").to_numpy())),
        "bytes_on_disk": {m: v for m, v in disk.items()}, "bytes_raw": raw,
        "compression_ratio": {m: round(raw[m] / disk[m], 3) if disk[m] else None for m in raw},
        "total_bytes": total,
        "stats": {m: {"mean": [round(x, 3) for x in s["mean"]], "std": [round(x, 3) for x in s["std"]]}
                  for m, s in info["stats"].items()},
        "rejected_by_kind": dict(Counter(errs.column("kind").to_pylist())),
        "labels": dict(sorted(Counter(idx.column("label").to_pylist()).items())),
        "regions": len(set(idx.column("region").to_pylist())),
    }  # fmt: skip
    for m in ("s2", "s1"):
        d = idx.column(f"{m}_dates").combine_chunks().values.to_numpy()
        n = idx.column(f"n_{m}").to_numpy()
        out[f"{m}_dates"] = {"first": days_to_iso(d.min()) if d.size else None,
                             "last": days_to_iso(d.max()) if d.size else None,
                             "frames_per_set": {"min": int(n.min()) if n.size else 0,
                                                "mean": round(float(n.mean()), 2) if n.size else 0,
                                                "max": int(n.max()) if n.size else 0}}  # fmt: skip
    return out


def inspect_dataset(root: str, as_json: bool = False) -> int:
    s = summarise(root)
    if as_json:
        print(json.dumps(s, indent=1))
        return 0
    print(f"{root}: {s['sets']} sets ({s['with_hr']} with HR), {s['rejected']} rejected, {s['shards']} shards, "
          f"{s['total_bytes'] / 2**20:.2f} MiB; HR {s['hr_size']} px, S2/S1 {s['s2_size']} px")  # fmt: skip
    for m in ("hr", "s2", "s1", "osm"):
        raw = s["bytes_raw"].get(m)
        ratio = s["compression_ratio"].get(m)
        extra = f", raw {raw / 2**20:.2f} MiB, ratio {ratio}" if raw else ""
        print(f"  {m:4s} on disk {s['bytes_on_disk'][m] / 2**20:8.2f} MiB{extra}")
    for m in ("s2", "s1"):
        d = s[f"{m}_dates"]
        print(f"  {m} frames {s['frames'][m]}, per set {d['frames_per_set']}, dates {d['first']} .. {d['last']}")
    for m, st in s["stats"].items():
        print(f"  {m} mean {st['mean']}\n  {m} std  {st['std']}")
    print(f"  labels {s['labels']}; regions {s['regions']}")
    print(f"  rejected by kind: {s['rejected_by_kind'] or 'none'}")
    return 0
