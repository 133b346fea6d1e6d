"""The memory-mapped index columns (dataprep.index) hold exactly what pyarrow reads from index.parquet."""

from __future__ import annotations

import json
import mmap
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep import index
from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import run_dataprep


def _assert_equal_to_parquet(root):
    t = pq.read_table(root / "index.parquet")
    cols = index.IndexColumns(root)
    assert len(cols) == t.num_rows
    for name, dt in index.COLUMNS.items():
        got = cols.cols[name]
        assert got.dtype == np.dtype(dt) and got.tolist() == t.column(name).to_pylist(), name
    assert [cols.id(i) for i in range(len(cols))] == t.column("id").to_pylist()
    want = t.select(list(index.COLUMNS)).to_pylist()
    assert [cols.row(i) for i in range(len(cols))] == want and cols.row(-1) == want[-1]
    for m in ("s2", "s1"):
        lists = t.column(f"{m}_dates").to_pylist()
        assert [cols.dates_of(m, i).tolist() for i in range(len(cols))] == lists
        assert [cols.meta(i)[f"{m}_dates"].tolist() for i in range(len(cols))] == lists
    with pytest.raises(IndexError, match="outside an index"):
        cols.row(len(cols))
    return cols


def test_columns_equal_pyarrow_and_are_mapped(dataset):
    cols = _assert_equal_to_parquet(dataset)
    assert cols.path.parent == dataset  # written by convert's merge, beside index.parquet
    for a in cols.cols.values():  # file pages, read-only: forked workers share them, nothing is copied on access
        base = a
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(getattr(base, "obj", base), mmap.mmap) and not a.flags.writeable


def test_reading_rows_maps_nothing(tmp_path):
    """Per-row reads go through pread: the reader's process maps no index pages, however many rows it reads."""
    from dataprep.bench_scale import simulate_index

    simulate_index(str(tmp_path / "sim"), 3000)
    r = DatasetReader(tmp_path / "sim")
    for i in range(0, 3000, 7):
        r.meta(i)
    maps = (tmp_path / "sim").resolve()
    with open("/proc/self/maps") as f:
        assert not [line for line in f if str(maps) in line]


def test_batches_unicode_and_empty_lists(dataset, tmp_path, monkeypatch):
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    for old in d.glob("index-*.cols"):
        shutil.rmtree(old)
    t = pq.read_table(d / "index.parquet")
    ids = [f"зона-{i}-北京-{'x' * (i % 5)}" for i in range(t.num_rows)]
    s1 = [[] if i % 3 == 0 else v for i, v in enumerate(t.column("s1_dates").to_pylist())]
    t = t.set_column(0, "id", pa.array(ids, pa.string()))
    t = t.set_column(t.schema.get_field_index("s1_dates"), "s1_dates", pa.array(s1, pa.list_(pa.int32())))
    t = t.set_column(t.schema.get_field_index("n_s1"), "n_s1", pa.array([len(v) for v in s1], pa.int32()))
    pq.write_table(t, d / "index.parquet", row_group_size=5)
    monkeypatch.setattr(index, "BATCH_ROWS", 4)  # batch boundaries inside and across row groups
    _assert_equal_to_parquet(d)


def test_old_dataset_builds_on_first_open_and_stale_cache_is_replaced(dataset, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    for old in d.glob("index-*.cols"):
        shutil.rmtree(old)  # a dataset written before the columns existed: index.parquet only
    r = DatasetReader(d)
    first = list(d.glob("index-*.cols"))
    assert len(first) == 1 and not list(d.glob(".index-*"))
    t = pq.read_table(d / "index.parquet")
    assert [r.meta(i)["id"] for i in range(len(r))] == t.column("id").to_pylist()
    labels = [7 + i for i in range(t.num_rows)]
    t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    pq.write_table(t, d / "index.parquet")  # a rewritten index must never meet the old columns
    r2 = DatasetReader(d)
    assert [r2.meta(i)["label"] for i in range(len(r2))] == labels
    now = list(d.glob("index-*.cols"))
    assert len(now) == 1 and now != first


def test_pickle_carries_no_index(tmp_path):
    from dataprep.bench_scale import simulate_index

    simulate_index(str(tmp_path / "sim"), 5000)
    r = DatasetReader(tmp_path / "sim")
    size = sum(f.stat().st_size for f in next((tmp_path / "sim").glob("index-*.cols")).iterdir())
    blob = pickle.dumps(r)
    assert len(blob) < 20_000 < size // 20  # a pickled mapping would copy every row into each spawned worker
    r2 = pickle.loads(blob)
    t = pq.read_table(tmp_path / "sim" / "index.parquet", columns=["id", "s2_dates"])
    for i in (0, 2499, 4999):
        assert r2.meta(i)["id"] == t.column("id")[i].as_py()
        assert r2.meta(i)["s2_dates"].tolist() == t.column("s2_dates")[i].as_py()


@pytest.mark.slow
def test_bench_scale_small(tmp_path):
    p = run_dataprep("bench-scale", "--rows", "3000", "--workers", "2", "--reads", "300", check=0, timeout=600)
    res = json.loads(p.stdout[p.stdout.index("{") :])
    assert res["rows"] == 3000 and len(res["with_workers"]["workers"]) == 2
    assert res["second_open"]["rows"] == 3000 and res["with_workers"]["total_pss_MB"] > 0
