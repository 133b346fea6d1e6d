"""Shared test fixtures: the real-data folder (../shared/data, never copied into the repo) and free ports."""

import os
from pathlib import Path

import pytest

from trainer.distributed import free_port  # noqa: F401 - re-exported for the tests

os.environ.setdefault("DS_ACCELERATOR", "cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip: a user's fresh clone does not have the real samples."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real remote-sensing samples not found at {SHARED_DATA} (only present on the dev machines)")
    return SHARED_DATA

