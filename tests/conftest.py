"""Shared test fixtures: the real-data folder (../shared/data, never copied into the repo) and free ports."""

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: a user's fresh clone does not have the real samples."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real remote-sensing samples not found at {SHARED_DATA} (only present on the dev machines)")
    return SHARED_DATA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
