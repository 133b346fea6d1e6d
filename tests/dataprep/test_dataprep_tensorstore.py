"""The tensorstore reader (dataprep.tsio) against the hand-written reader (dataprep.shardio) and zarr-python: same
values on every box and frame selection, corruption a clear ChecksumError, fork behaviour, a missing install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorstore as ts

from dataprep.errors import ChecksumError
from dataprep.reader import DatasetReader
from dataprep.shardio import FastArray
from tests.dataprep.dp_helpers import HR, REPO, S2, random_request


def test_tensorstore_reader_equals_old_reader_on_every_box_and_frame_selection(dataset):
    """Value by value, every set and modality, many random boxes and frame selections: tensorstore (one read at a
    time and one sample's reads in flight together) equals the hand-written reader; zarr-python checks a subset."""
    new, old, ref = (DatasetReader(dataset, backend=b) for b in ("tensorstore", "direct", "zarr"))
    rng = np.random.default_rng(7)
    n_checked = 0
    for i in range(len(new)):
        backend, arrs = new._arrays(new.meta(i)["shard"])
        assert backend == "tensorstore" and all(isinstance(a, ts.TensorStore) for a in arrs.values())
        assert all(isinstance(a, FastArray) for a in old._arrays(old.meta(i)["shard"])[1].values())
        for _ in range(6):
            reqs = [random_request(rng, new, i, m) for m in ("hr", "osm", "s2", "s1", "s2")]
            want = [old.read(i, *q) for q in reqs]
            for q, a, b, c in zip(reqs, new.read_many(i, reqs), [new.read(i, *q) for q in reqs], want):
                assert c.dtype == a.dtype == b.dtype and a.shape == b.shape == c.shape, (i, q)
                assert np.array_equal(a, c) and np.array_equal(b, c), (i, q)
                n_checked += 1
        for q in reqs:
            assert np.array_equal(ref.read(i, *q), old.read(i, *q)), (i, q)
    assert n_checked == len(new) * 30


def _flip(path, offset: int, n: int = 1) -> None:
    b = bytearray(path.read_bytes())
    b[offset : offset + n] = bytes(x ^ 0xFF for x in b[offset : offset + n])
    path.write_bytes(bytes(b))


def _chunk_span(obj, n_inner: int, j: int) -> tuple[int, int]:
    """(offset, nbytes) of inner chunk j from the shard index at the end of a shard object (read independently)."""
    b = obj.read_bytes()
    idx = np.frombuffer(b[-(16 * n_inner + 4) : -4], "<u8").reshape(n_inner, 2)
    return int(idx[j, 0]), int(idx[j, 1])


@pytest.fixture()
def copy(dataset, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    r = DatasetReader(d)
    i = next(j for j in range(len(r)) if r.meta(j)["has_hr"] and len(r.meta(j)["s2_dates"]) >= 2)
    return d, i, r.meta(i)


@pytest.mark.parametrize("where", ["data", "data_head", "stored_crc", "index"])
def test_corrupt_hr_chunk_is_a_checksum_error(copy, where):
    """Flipped bytes in the compressed data (the digest catches it; near the head of a blosc chunk the decoder
    fails first, before the digest is checked), in the chunk's stored crc32c (the bytes still decode: only the
    digest catches it) or in the shard index."""
    d, i, meta = copy
    obj = d / "shards" / f"shard-{meta['shard']:05d}.zarr" / "hr" / f"c.{meta['row']}.0.0.0"
    off, nb = _chunk_span(obj, 1, 0)
    at = {"data": off + nb // 2, "data_head": off + 100, "stored_crc": off + nb - 2, "index": obj.stat().st_size - 12}
    _flip(obj, at[where], 16 if where == "data_head" else 4)
    r = DatasetReader(d)
    with pytest.raises(ChecksumError, match=rf"/hr: corrupt chunk .*c\.{meta['row']}\.0\.0\.0") as e:
        r.read(i, "hr", (0, 0, 8, 8))
    assert ("Digest mismatch" in str(e.value)) == (where != "data_head"), str(e.value)
    with pytest.raises(ChecksumError, match="checksum mismatch"):  # the reference agrees it is corrupt
        DatasetReader(d, backend="direct").read(i, "hr", (0, 0, 8, 8))
    assert r.read(i, "s2").shape[0] == len(meta["s2_dates"])  # other arrays of the shard still read


def test_corrupt_s2_frame_fails_the_batched_read_only_where_it_is(copy):
    d, i, meta = copy
    r0 = DatasetReader(d)
    first = r0._index.row(i)["s2_start"] + 1  # the set's second frame
    fps = 8  # frames_per_chunk_shard in the test dataset (dp_helpers.convert_inproc)
    obj = d / "shards" / f"shard-{meta['shard']:05d}.zarr" / "s2" / f"c.{first // fps}.0.0.0"
    off, nb = _chunk_span(obj, fps, first % fps)
    _flip(obj, off + nb - 3, 2)  # its stored crc32c
    r = DatasetReader(d)
    want_hr = DatasetReader(d, backend="direct").read(i, "hr")
    with pytest.raises(ChecksumError, match="s2: corrupt chunk"):
        r.read_many(i, [("hr", None, None), ("s2", None, [0, 1])])
    got = r.read_many(i, [("hr", None, None), ("s2", None, [0])])
    assert np.array_equal(got[0], want_hr) and got[1].shape == (1, 10, S2, S2)


def _run(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


FORK = """
    import multiprocessing as mp
    import numpy as np
    from dataprep.reader import DatasetReader
    r = DatasetReader({root!r})
    i = next(j for j in range(len(r)) if len(r.meta(j)["s2_dates"]))
    def child(q):
        q.put((r._arrays(r.meta(i)["shard"])[0], int(r.read(i, "s2").sum())))
    want = int(DatasetReader({root!r}, backend="direct").read(i, "s2").sum())
    if {parent_reads}:
        assert int(r.read(i, "s2").sum()) == want
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    backend, got = q.get(timeout=60)
    p.join(60)
    assert p.exitcode == 0 and got == want, (p.exitcode, got, want)
    print(backend)
"""


def test_forked_workers_open_tensorstore_after_fork(dataset):
    """A parent that has not read pixels (the training loader's parent) hands workers a reader that opens its own
    tensorstore handles after fork."""
    assert _run(FORK.format(root=str(dataset), parent_reads=False)) == "tensorstore"


def test_fork_after_tensorstore_ran_reads_with_the_reference_reader(dataset):
    """tensorstore aborts a process forked after it ran (its threads do not survive fork): such a worker reads
    with dataprep.shardio instead, the same values, instead of dying."""
    assert _run(FORK.format(root=str(dataset), parent_reads=True)) == "direct"


def test_missing_tensorstore_is_a_clear_error(dataset, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # `import tensorstore` raises ImportError
    with pytest.raises(ImportError, match=r"pip install tensorstore==0\.1\.86.*backend='direct'"):
        DatasetReader(dataset).read(0, "osm")
    assert DatasetReader(dataset, backend="direct").read(0, "osm").shape == (HR, HR)
