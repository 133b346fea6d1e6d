"""A corrupt stored chunk: dataprep's tools name it, the training loader replaces the sample by the next stream
position (deterministically), counts it in batch["skipped_corrupt"] and goes on."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dataprep.errors import ChecksumError
from dataprep.reader import DatasetReader
from tests.dataprep.dp_helpers import REPO
from trainer.config import DataConfig
from trainer.data import PretrainViews, ResumableSampler


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


@pytest.fixture()
def corrupt(dataset, tmp_path):
    """A copy of the dataset with 16 flipped bytes inside one stored HR chunk; returns (root, set index)."""
    d = tmp_path / "d"
    shutil.copytree(dataset, d)
    r = DatasetReader(d)
    i = next(j for j in range(len(r)) if r.meta(j)["has_hr"] and r.meta(j)["shard"] == 1)
    obj = d / "shards" / "shard-00001.zarr" / "hr" / f"c.{r.meta(i)['row']}.0.0.0"
    b = bytearray(obj.read_bytes())
    b[100:116] = bytes(x ^ 0xFF for x in b[100:116])  # the chunk's compressed bytes (its index is at the end)
    obj.write_bytes(bytes(b))
    with pytest.raises(ChecksumError, match=r"shard-00001.zarr/hr: corrupt chunk .*hr/c\.\d+\.0\.0\.0"):
        DatasetReader(d).read(i, "hr")  # a clear error in the reader (tensorstore), naming the array and object
    with pytest.raises(ChecksumError, match=r"hr/c\.\d+\.0\.0\.0: chunk 0 checksum mismatch"):
        DatasetReader(d, backend="direct").read(i, "hr")  # and in the reference reader
    return d, i


def test_corrupt_sample_replaced_by_next_position(dataset, corrupt):
    d, i = corrupt
    cfg = DataConfig(path=str(d), local_crops=1, photometric=False, num_workers=0)
    good, bad = PretrainViews(str(dataset), cfg), PretrainViews(str(d), cfg)
    n = len(good)
    p = next(q for q in range(n) if good.order.index(q) == i)  # the position that lands on the corrupt set
    for q in range(2 * n):  # two epochs: the set is met again, at another position
        got = bad[q]
        if bad.order.index(q) == i:
            want = good[q + 1]  # the next stream position's sample, cut exactly as it is at its own position
            assert got["skipped_corrupt"] == 1 and got["position"] == q and got["index"] == want["index"] != i
            assert _same(got["views"], want["views"]) and _same(got["local_views"], want["local_views"])
        else:
            want = good[q]
            assert got["skipped_corrupt"] == 0 and _same(got, {**want, "skipped_corrupt": 0})
    assert p < n


def loader_counts_and_goes_on(d, i: int) -> None:
    cfg = DataConfig(path=str(d), local_crops=0, photometric=False, num_workers=2)
    ds = PretrainViews(str(d), cfg)
    n = len(ds)
    sampler = ResumableSampler(global_batch=4, micro_batch=2, rank=0, world_size=2)
    loader = DataLoader(ds, batch_size=2, sampler=sampler, num_workers=2, drop_last=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    positions = [q for s in range(2 * n // 4) for q in sampler.positions(s)]
    want_skips = [int(ds.order.index(q) == i) for q in positions]
    got_skips, got_index = [], []
    for k, batch in zip(range(len(positions) // 2), loader):
        assert batch["position"].tolist() == positions[2 * k : 2 * k + 2]
        got_skips += batch["skipped_corrupt"].tolist()
        got_index += batch["index"].tolist()
    assert got_skips == want_skips and sum(want_skips) >= 1
    assert i not in got_index


def test_loader_with_workers_counts_and_goes_on(dataset, corrupt):
    """In this process tensorstore has run before the workers fork: they read with the reference reader."""
    loader_counts_and_goes_on(*corrupt)


def test_loader_with_tensorstore_workers_counts_and_goes_on(corrupt):
    """A fresh parent that reads no pixels: the forked workers read with tensorstore (no fallback warning) and
    skip and count the corrupt sample alike."""
    d, i = corrupt
    code = ("import logging; logging.basicConfig(level=logging.WARNING)\n"
            "from tests.dataprep.test_dataprep_train_skip import loader_counts_and_goes_on\n"
            f"loader_counts_and_goes_on({str(d)!r}, {i})\nprint('ok')")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-3000:]
    assert "corrupt sample skipped" in p.stderr and "reading with dataprep.shardio" not in p.stderr, p.stderr[-3000:]
