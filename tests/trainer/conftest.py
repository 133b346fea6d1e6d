"""A small dataprep dataset shared by the trainer's multi-process tests (built once per session)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def skeleton_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("skeleton")
    py = sys.executable
    subprocess.run([py, "-m", "dataprep", "sample", "--out", str(root / "raw"), "--sets", "24", "--seed", "1"],
                   check=True, cwd=REPO, capture_output=True)
    subprocess.run([py, "-m", "dataprep", "convert", "--manifest", str(root / "raw" / "manifest.jsonl"), "--out",
                    str(root / "data"), "--shard-size", "8"], check=True, cwd=REPO, capture_output=True)
    return root / "data"
