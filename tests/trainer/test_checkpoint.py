"""Checkpoint guards that act before DeepSpeed reads anything."""

import json

import pytest

from trainer import checkpoint


def test_other_world_size_is_refused_before_loading(tmp_path):
    tag = tmp_path / "step00000010"
    tag.mkdir()
    (tmp_path / "latest").write_text("step00000010\n")
    (tag / "run_state.json").write_text(json.dumps({"step": 10, "world_size": 4, "global_batch": 8}))
    with pytest.raises(RuntimeError, match="written by 4 ranks and this run has 2"):
        checkpoint.load(None, tmp_path, rank=0, world_size=2)  # engine None: must fail before touching it


def test_no_checkpoint_is_a_clear_error(tmp_path):
    assert checkpoint.latest_tag(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        checkpoint.load(None, tmp_path, rank=0, world_size=1)
