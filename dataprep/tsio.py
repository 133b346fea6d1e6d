"""Shard reads through tensorstore (`driver: zarr3`): Zarr v3 sharding, the crc32c codec and batched async reads.

One tensorstore Context per process, created on first use: tensorstore's thread pools do not survive fork(), so
nothing here runs at import time and DatasetReader opens handles lazily in each process. A process forked *after*
tensorstore ran in its parent cannot use tensorstore at all (tensorstore aborts the process on first use);
`usable()` says so, and the reader then reads that process's shards with dataprep.shardio instead.

tensorstore verifies the crc32c codec of every chunk and of every shard index it reads. A corrupt chunk shows up
as a digest mismatch (DATA_LOSS) or, when the damage breaks the decompressor before the digest is checked, as a
decode error (FAILED_PRECONDITION); both become ChecksumError, naming the array, the stored object and the cause.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .errors import ChecksumError

_state = {"used_in": None, "inherited": False, "ctx": None, "ctx_pid": None}


def _after_fork_in_child() -> None:
    _state["inherited"] = _state["inherited"] or _state["used_in"] is not None
    _state["ctx"] = _state["ctx_pid"] = None


os.register_at_fork(after_in_child=_after_fork_in_child)

# Per process: no cache of decoded chunks (random crops rarely read a chunk again, and a training process should
# not grow a chunk cache), but shard indexes (16 bytes per inner chunk) and metadata are kept across reads in a
# separate pool (`metadata_cache_pool`), as the hand-written reader kept its indexes: one read per chunk.
INDEX_CACHE_BYTES = 64 << 20
CORRUPT_CODES = ("DATA_LOSS", "FAILED_PRECONDITION")


def usable() -> bool:
    """False in a process forked after tensorstore ran in its parent (tensorstore would abort it)."""
    return not _state["inherited"]


def ran_here() -> bool:
    """True once tensorstore has run in this very process."""
    return _state["used_in"] == os.getpid()


def _ts():
    try:
        import tensorstore as ts
    except ImportError as e:  # a main dependency: a broken environment, not a choice to make silently
        raise ImportError("dataprep reads shards with tensorstore: `pip install tensorstore==0.1.86` (pinned in "
                          "launch/constraints.txt), or DatasetReader(..., backend='direct') for the "
                          "hand-written reader") from e
    return ts


def context():
    """This process's tensorstore Context (created on first use, never inherited across fork)."""
    if not usable():
        raise RuntimeError("tensorstore ran in the parent of this forked process: it cannot run here")
    if _state["ctx"] is None or _state["ctx_pid"] != os.getpid():
        ts = _ts()
        _state["ctx"] = ts.Context({"cache_pool": {"total_bytes_limit": 0},
                                    "cache_pool#index": {"total_bytes_limit": INDEX_CACHE_BYTES}})
        _state["ctx_pid"] = _state["used_in"] = os.getpid()
    return _state["ctx"]


def kvstore(path: str) -> dict:
    """tensorstore kvstore spec of a local array folder."""
    return {"driver": "file", "path": os.path.abspath(path)}


def open_arrays(kvstores: dict[str, dict]) -> dict:
    """name -> opened read-only zarr3 TensorStore, all opened concurrently."""
    ts = _ts()
    ctx = context()
    # recheck_* False: a committed shard never changes (written under a temporary name, then renamed)
    futs = {n: ts.open({"driver": "zarr3", "kvstore": kv, "metadata_cache_pool": "cache_pool#index",
                        "recheck_cached_data": False, "recheck_cached_metadata": False}, read=True, context=ctx)
            for n, kv in kvstores.items()}  # fmt: skip
    return {n: f.result() for n, f in futs.items()}


def read_future(a, first: np.ndarray, box: tuple[int, int, int, int]):
    """Start reading a[first, ..., y0:y1, x0:x1]; returns a future (finish with `result`). first: (K,) int64."""
    y0, x0, y1, x1 = box
    mid = (slice(None),) * (a.rank - 3)
    if np.all(np.diff(first) == 1):  # one element or contiguous frames: a plain slice
        return a[(slice(int(first[0]), int(first[-1]) + 1), *mid, slice(y0, y1), slice(x0, x1))].read()
    return a.oindex[(np.asarray(first, np.int64), *mid, slice(y0, y1), slice(x0, x1))].read()


def result(fut, what: str) -> np.ndarray:
    """The array of a read future; a corrupt chunk raises ChecksumError (`what` names the array)."""
    try:
        return fut.result()
    except ValueError as e:
        msg = str(e)
        if msg.startswith(CORRUPT_CODES):
            raise ChecksumError(f"{what}: corrupt chunk (crc32c mismatch or undecodable bytes): {msg}") from None
        raise


def read_all(futs: Sequence, whats: Sequence[str]) -> list[np.ndarray]:
    """Wait for every future (all already in flight) in order."""
    return [result(f, w) for f, w in zip(futs, whats, strict=True)]
