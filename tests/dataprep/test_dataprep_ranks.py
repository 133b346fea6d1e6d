"""Issue 11: each convert rank decodes only its own shards' manifest rows; the merge rejects duplicate ids."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from dataprep import DatasetReader, manifest
from dataprep.manifest import plan_rows, read_rows, scan
from dataprep.verify import verify
from tests.dataprep.dp_helpers import convert_inproc, tree_bytes

# shard size 5 and 2 ranks: rank 0 owns rows 0-4 and 10-14, rank 1 rows 5-9
RANK_OF = {r: (r // 5) % 2 for r in range(15)}
POSITIONAL = ("row", "s2_start", "s1_start")  # where a set sits in its shard: moves when a duplicate stays stored


@pytest.fixture(scope="module")
def dup_manifest(raw, tmp_path_factory):
    """The 12 sample rows plus three duplicates: row 7 repeats row 1 (rank 1 repeats rank 0), row 13 repeats row 8
    (rank 0 repeats rank 1), row 14 repeats row 0 (within rank 0)."""
    lines = (raw / "manifest.jsonl").read_text().splitlines()
    lines = lines[:7] + [lines[1]] + lines[7:]
    lines += [lines[8], lines[0]]
    path = raw / "manifest-dups.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _convert_ranks(man, out, world_size, **kw) -> list[int]:
    return [convert_inproc(man, out, rank=r, world_size=world_size, **kw) for r in reversed(range(world_size))]


def test_a_rank_decodes_only_its_own_rows(dup_manifest, monkeypatch):
    decoded = []
    loads = json.loads
    monkeypatch.setattr(manifest.json, "loads", lambda s, *a, **k: decoded.append(s) or loads(s, *a, **k))
    sc = scan(dup_manifest, 5, keep=lambda k: k % 2 == 1)
    lines = dup_manifest.read_text().splitlines()
    assert sc.rows == 15 and sc.has_osm and list(sc.shards) == [1]
    # row 0 is decoded only to learn that a row names an osm file; after that the scan only counts lines
    assert [bytes(d).decode() for d in decoded] == [lines[0] + "\n"]
    decoded.clear()
    items = plan_rows(dup_manifest, None, sc.shards[1])
    assert [d.rstrip("\n") for d in decoded] == lines[5:10]  # the rank's workers decode their own rows only
    assert [it.row for it in items] == [5, 6, 7, 8, 9]
    assert [it.id for it in items] == [json.loads(x)["id"] for x in lines[5:10]]


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_scanned_ranges_read_the_same_rows_as_the_whole_file(tmp_path, fmt):
    """Every shard's RowRange yields exactly the rows a whole-file read yields there, in every format, with
    malformed rows, blank lines and (CSV) quoted newlines in the way; has_osm from rows never decoded."""
    import pyarrow as pa

    rows = [{"id": f"r{i}", "lon": float(i), "lat": 1.0, "osm": "o.png" if i == 11 else None,
             "note": 'two\nlines, "quoted"' if i % 4 == 1 else "x"} for i in range(13)]  # fmt: skip
    path = tmp_path / f"m.{fmt}"
    if fmt == "jsonl":
        text = [json.dumps(r) for r in rows]
        text[6] = '{"id": "r6", "lon": '  # truncated: still a row, and an error
        path.write_text("\n".join(text[:3] + [""] + text[3:]) + "\n")  # a blank line is not a row
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows[:6])
            f.write("r6,6.0\n")  # wrong column count
            w.writerows(rows[7:])
    else:
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    whole = list(read_rows(path))
    assert [r.row for r in whole] == list(range(13))
    assert whole[6].data is None if fmt != "parquet" else whole[6].data["id"] == "r6"
    assert whole[5].data["note"] == 'two\nlines, "quoted"'
    for keep in (lambda k: k % 2 == 0, lambda k: k % 2 == 1):
        sc = scan(path, 5, keep)
        assert sc.rows == 13 and sc.has_osm  # row 11, in shard 2, names osm
        for k, r in sc.shards.items():
            want = whole[5 * k : 5 * k + 5]
            assert [(g.row, g.data, g.error) for g in read_rows(path, r)] == [(w.row, w.data, w.error) for w in want]
    assert not scan(path, 5, keep=lambda k: False).shards


def test_duplicates_are_rejected_by_the_merge_alike_on_one_and_two_ranks(dup_manifest, raw, tmp_path):
    one, two, ref = tmp_path / "one", tmp_path / "two", tmp_path / "ref"
    assert _convert_ranks(dup_manifest, one, 1) == [1]
    assert _convert_ranks(dup_manifest, two, 2) == [0, 1]  # rank 1 exits 0; rank 0 reports the merged rejects
    assert tree_bytes(two) == tree_bytes(one)  # the bytes do not depend on the number of ranks
    errors = pq.read_table(one / "errors.parquet").to_pylist()
    ids = [json.loads(x)["id"] for x in dup_manifest.read_text().splitlines()]
    assert [(e["manifest_row"], e["kind"], e["message"]) for e in errors] == [
        (7, "duplicate_id", f"id {ids[1]}: duplicate of manifest row 1"),
        (13, "duplicate_id", f"id {ids[8]}: duplicate of manifest row 8"),
        (14, "duplicate_id", f"id {ids[0]}: duplicate of manifest row 0")]  # fmt: skip
    assert [e["shard"] for e in errors] == [1, 2, 2]
    # the sets listed are those of the manifest without its duplicates, converted on their own
    assert convert_inproc(raw / "manifest.jsonl", ref) == 0
    moved = ["shard", "manifest_row", "source", *POSITIONAL]  # the duplicates shift rows; another manifest name
    i1, i0 = (pq.read_table(p / "index.parquet").drop_columns(moved) for p in (one, ref))
    assert i1.equals(i0) and i1.num_rows == 12
    d1, d0 = (json.loads((p / "dataset.json").read_text()) for p in (one, ref))
    assert (d1["sets"], d1["rejected"], d1["rejected_by_kind"]) == (12, 3, {"duplicate_id": 3})
    assert d1["frames"] == d0["frames"]
    r1, r0 = DatasetReader(one), DatasetReader(ref)
    for i in range(len(r0)):
        for m in ("hr", "s2", "s1"):
            assert np.array_equal(r1.read(i, m), r0.read(i, m)), (i, m)
    report = io.StringIO()
    assert verify(str(one), report) == 0, report.getvalue()  # the shards' unlisted duplicates are not problems


def test_strict_stops_on_a_duplicate_across_ranks(dup_manifest, tmp_path, capsys):
    lines = dup_manifest.read_text().splitlines()[:8]  # only the cross-rank duplicate (row 7 repeats row 1)
    man = dup_manifest.parent / "manifest-strict.jsonl"  # beside the rasters its paths name
    man.write_text("\n".join(lines) + "\n")
    assert _convert_ranks(man, tmp_path / "out", 2, strict=True) == [0, 2]
    assert "manifest row 7 (id " in capsys.readouterr().err
    assert not (tmp_path / "out" / "index.parquet").exists() and not (tmp_path / "out" / "dataset.json").exists()


def test_osm_on_one_rank_only_gives_every_shard_an_osm_array(raw, tmp_path):
    """Rows naming osm only in rank 1's shard: rank 0 must still write osm arrays (has_osm is dataset-wide)."""
    lines = [json.loads(s) for s in (raw / "manifest.jsonl").read_text().splitlines()]
    with_osm = [r for r in lines if r.get("osm")]
    if not with_osm:
        pytest.skip("the sample manifest has no osm rows")
    rows = [{k: v for k, v in r.items() if k != "osm"} for r in lines]
    rows[6]["osm"] = with_osm[0]["osm"]
    man = raw / "manifest-osm1.jsonl"
    man.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out, ref = tmp_path / "two", tmp_path / "one"
    assert _convert_ranks(man, out, 2) == [0, 0]
    assert _convert_ranks(man, ref, 1) == [0]
    assert json.loads((out / "dataset.json").read_text())["has_osm"]
    assert tree_bytes(out) == tree_bytes(ref)  # rank 0's shards hold osm arrays too, as one rank writes them


def test_ahead_keeps_order_bounds_requests_in_flight_and_stops_early():
    """The merge's object-store reads: in order, at most `depth` at once, none started long after the caller stops."""
    import threading
    import time

    from dataprep.convert import ahead

    lock, state, started = threading.Lock(), {"now": 0, "max": 0}, []

    def fetch(k):
        with lock:
            started.append(k)
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.01 * (k % 3))  # out-of-order completion
        with lock:
            state["now"] -= 1
        return k * k

    assert list(ahead(fetch, range(40), 4)) == [k * k for k in range(40)]
    assert 1 < state["max"] <= 4
    started.clear()
    for i, _ in enumerate(ahead(fetch, range(1000), 4)):
        if i == 2:
            break
    assert len(started) <= 3 + 4  # the ones yielded, plus at most `depth` already asked
    assert list(ahead(fetch, range(5), 1)) == [0, 1, 4, 9, 16]
