"""Helpers shared by the dataprep tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO / ".." / "shared" / "data"

HR, S2 = 64, 16  # small sizes keep the suite fast on 2 cores


def run_dataprep(*args: str, check: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "dataprep", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=timeout)  # fmt: skip
    if check is not None:
        assert p.returncode == check, f"rc={p.returncode}\nstdout:{p.stdout}\nstderr:{p.stderr[-3000:]}"
    return p


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root (relative path -> bytes), for byte-identity comparisons."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def flip(path: Path, where: float) -> None:
    """Invert 4 bytes of a file at fraction `where` of its length (a corrupt chunk when inside one)."""
    b = bytearray(path.read_bytes())
    i = int(len(b) * where)
    b[i : i + 4] = bytes(x ^ 0xFF for x in b[i : i + 4])
    path.write_bytes(bytes(b))


def convert_inproc(manifest: Path, out: Path, **kw) -> int:
    from dataprep.convert import ConvertConfig, convert
    from dataprep.shard import ShardConfig

    shard_kw = {k: kw.pop(k) for k in list(kw) if k in ShardConfig.__slots__}
    shard = ShardConfig(**{"hr_size": HR, "s2_size": S2, "shard_size": 5, "frames_per_chunk_shard": 8, **shard_kw})
    return convert(ConvertConfig(manifest=str(manifest), out=str(out), shard=shard, progress=False, **kw))


LOADER = """
import numpy as np, torch
from torch.utils.data import DataLoader
from trainer.config import DataConfig
from trainer.data import PretrainViews, ResumableSampler
cfg = DataConfig(path={url!r}, local_crops=1, photometric=False, num_workers=2)
ds = PretrainViews({url!r}, cfg)  # opens the dataset in this (parent) process: metadata only
sampler = ResumableSampler(global_batch=4, micro_batch=4, rank=0, world_size=1)
loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, multiprocessing_context="fork")
ref = PretrainViews({local!r}, cfg)
for k, batch in zip(range(3), loader):
    for j, q in enumerate(sampler.positions(k)):
        want = ref[q]
        assert batch["index"][j] == want["index"]
        for v in range(2):
            for m in ("hr", "s2", "s1"):
                assert np.array_equal(batch["views"][v][m][j].numpy(), want["views"][v][m]), (k, j, v, m)
print("ok")
"""


def run_loader(url: str, local: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The training loader (2 forked DataLoader workers) over the dataset at `url`, in a fresh process with `env`,
    checked batch by batch against the same samples cut from the local copy `local`; prints "ok" when all match."""
    return subprocess.run([sys.executable, "-c", LOADER.format(url=url, local=str(local))], cwd=REPO,
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


SIZES = {"hr": HR, "osm": HR, "s2": S2, "s1": S2}


def assert_reads_equal(r, local, rng, whole: bool = False) -> None:
    """Every set of reader r against `local` (read independently): the metadata, and random box/frame reads (and
    each modality whole, with `whole`), values and dtypes."""
    assert len(r) == len(local) and r.stats == local.stats
    for i in range(len(r)):
        assert {k: np.asarray(v).tolist() for k, v in r.meta(i).items()} == \
               {k: np.asarray(v).tolist() for k, v in local.meta(i).items()}  # fmt: skip
        reqs = [(m, None, None) for m in ("hr", "osm", "s2", "s1")] if whole else []
        reqs += [random_request(rng, r, i, m) for m in ("hr", "osm", "s2", "s1", "s2", "s1")]
        for q, a in zip(reqs, r.read_many(i, reqs)):
            b = local.read(i, *q)
            assert a.dtype == b.dtype and np.array_equal(a, b), (i, q)


def assert_mirror_refetched_only_on_change(dataset: Path, url: str, put) -> None:
    """The metadata mirror of the dataset at `url` (a copy of the local `dataset`): opened again, nothing is fetched;
    after put(key, bytes) rewrites dataset.json, only that file is fetched again and its new generation recorded."""
    import json

    from dataprep import remote
    from dataprep.reader import DatasetReader

    d = DatasetReader(url).root

    def state():
        return {n: ((d / n).stat().st_mtime_ns, (d / f".{n}.generation").read_bytes()) for n in remote.META_FILES}

    before = state()
    assert DatasetReader(url).root == d and state() == before
    info = json.loads((dataset / "dataset.json").read_text())
    info["note"] = "rewritten"
    put(f"{url.split('/', 3)[3]}/dataset.json", json.dumps(info).encode())
    r = DatasetReader(url)
    after = state()
    assert r.info["note"] == "rewritten" and json.loads((d / "dataset.json").read_text())["note"] == "rewritten"
    assert after["index.parquet"] == before["index.parquet"]
    assert after["dataset.json"][1] != before["dataset.json"][1]  # the new generation is recorded


def assert_corrupt_chunk_raises(dataset: Path, url: str, put) -> None:
    """One HR chunk of the dataset at `url` (a copy of the local `dataset`) overwritten through put(key, bytes) with
    a byte inverted: reading that set's HR raises ChecksumError naming the object."""
    from dataprep.errors import ChecksumError
    from dataprep.reader import DatasetReader

    r = DatasetReader(url)
    i = next(j for j in range(len(r)) if r.meta(j)["has_hr"])
    rel = f"shards/shard-{r.meta(i)['shard']:05d}.zarr/hr/c.{r.meta(i)['row']}.0.0.0"
    b = bytearray((dataset / rel).read_bytes())
    b[len(b) // 2] ^= 0xFF
    put(f"{url.split('/', 3)[3]}/{rel}", bytes(b))
    with pytest.raises(ChecksumError, match=f"{url.split('/', 3)[3]}/shards/.*/hr: corrupt chunk"):
        r.read(i, "hr")


def random_request(rng, r, i: int, m: str) -> tuple:
    """A random (modality, box, frames) read of set i: whole, thin, empty and random boxes; all, none, contiguous,
    negative, unsorted and repeated frames."""
    size = SIZES[m]
    kind = rng.integers(4)
    if kind == 0:
        box = None  # whole image
    elif kind == 1:  # one pixel row or column, or an empty box
        y0, x0 = (int(v) for v in rng.integers(0, size, 2))
        box = (y0, x0, y0 + int(rng.integers(0, 2)), size)
    else:
        y0, x0 = (int(v) for v in rng.integers(0, size - 1, 2))
        box = (y0, x0, int(rng.integers(y0 + 1, size + 1)), int(rng.integers(x0 + 1, size + 1)))
    if m not in ("s2", "s1"):
        return m, box, None
    n = len(r.meta(i)[f"{m}_dates"])
    pick = rng.integers(6)
    if n == 0 or pick == 0:
        frames = None  # all
    elif pick == 1:
        frames = []
    elif pick == 2:  # contiguous run
        a = int(rng.integers(n))
        frames = list(range(a, int(rng.integers(a + 1, n + 1))))
    elif pick == 3:  # negative indices
        frames = [-1, -n] if n > 1 else [-1]
    elif pick == 4:  # unsorted, non-contiguous
        frames = rng.permutation(n)[: min(n, 4)].tolist()
    else:  # sorted, with a repeat
        f = sorted(rng.choice(n, size=min(n, 3), replace=False).tolist())
        frames = f + f[-1:]
    return m, box, frames
