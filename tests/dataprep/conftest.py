"""Fixtures for the dataprep tests: a small synthetic raw dataset and its conversion."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dataprep.dp_helpers import HR, S2, convert_inproc


@pytest.fixture(scope="session")
def raw(tmp_path_factory) -> Path:
    """12 synthetic sets (HR 64 px, S2/S1 16 px), some with a modality missing."""
    from dataprep.sample import write_sample

    out = tmp_path_factory.mktemp("raw")
    write_sample(out, 12, seed=3, hr_size=HR, s2_size=S2, missing_rate=0.3)
    return out


@pytest.fixture(scope="session")
def dataset(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    assert convert_inproc(raw / "manifest.jsonl", out) == 0
    return out
