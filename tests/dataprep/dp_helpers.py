"""Helpers shared by the dataprep tests (imported by name: tests/ has no packages)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def convert_inproc(manifest: Path, out: Path, **kw) -> int:
    from dataprep.convert import ConvertConfig, convert
    from dataprep.shard import ShardConfig

    shard_kw = {k: kw.pop(k) for k in list(kw) if k in ShardConfig.__slots__}
    shard = ShardConfig(**{"hr_size": HR, "s2_size": S2, "shard_size": 5, "frames_per_chunk_shard": 8, **shard_kw})
    return convert(ConvertConfig(manifest=str(manifest), out=str(out), shard=shard, progress=False, **kw))
