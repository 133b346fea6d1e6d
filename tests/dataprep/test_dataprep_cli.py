"""CLI pieces: Prometheus counters, the sample generator's structure, the benchmark's read amplification."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from tests.dataprep.dp_helpers import run_dataprep


def test_metrics_counters_served():
    from dataprep.convert import _Metrics
    from tests.conftest import free_port

    port = free_port()
    m = _Metrics(port)
    try:
        m.update({"sets": 7, "rows": 9, "bytes_in": 1000, "bytes_out": 600, "rejects": {"missing_file": 2}})
        for n in (4, 1, 4):  # rows are counted as sets finish (row_done), not from the shard's summary
            m.row_done(n)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        m.close()
    assert "dataprep_sets_total 7.0" in text and "dataprep_rows_total 9.0" in text
    assert "dataprep_bytes_in_total 1000.0" in text and "dataprep_bytes_out_total 600.0" in text
    assert 'dataprep_rejects_total{kind="missing_file"} 2.0' in text


def test_sample_structure(raw):
    """Classes are shared by the modalities and separable: per-class mean S2 spectra differ, the OSM raster's
    dominant class is the label, and S1 is speckled (dB variance within one class well above zero)."""
    from PIL import Image

    from dataprep.sample import S2_SPECTRA

    rows = [json.loads(x) for x in (raw / "manifest.jsonl").read_text().splitlines()]
    assert len({r["label"] for r in rows}) >= 3
    for r in rows:
        osm = np.asarray(Image.open(raw / r["osm"]))
        assert np.bincount(osm.ravel(), minlength=6).argmax() == r["label"]
        if r.get("s2"):
            s2 = np.stack([np.load(raw / f["path"]) for f in r["s2"]]).astype(float).mean(0)  # seasons averaged
            lab = osm[2::4, 2::4]
            cls = r["label"]
            mean = s2[:, lab == cls].mean(1)
            # the closest class spectrum is the set's own class
            d = [np.abs(mean - s).sum() for s in S2_SPECTRA]
            assert int(np.argmin(d)) == cls
        if r.get("s1"):
            s1 = np.load(raw / r["s1"][0]["path"])
            assert s1[0][osm[2::4, 2::4] == r["label"]].std() > 1.0  # speckle


@pytest.mark.slow
def test_bench_small():
    # S2/S1 at the real 64 px: with toy 16 px frames the shard index (16 B a frame) outweighs the chunks
    p = run_dataprep("bench", "--sets", "6", "--hr-size", "128", "--s2-size", "64", check=0, timeout=600)
    res = json.loads(p.stdout[p.stdout.index("{") :])
    for m in ("hr", "s2", "s1"):
        assert res["read_amplification"][m] <= 1.2, res["read_amplification"]
        assert res["compression_ratio"][m] > 1.0
    assert res["convert_1w"]["sets_per_s"] > 0 and res["codec_only"]["sets_per_s"] > 0


def test_bench_read_prints_both_readers_and_the_ratio():
    p = run_dataprep("bench-read", "--sets", "4", "--hr-size", "128", "--s2-size", "32", "--crop", "64",
                     "--samples", "20", check=0, timeout=300)  # fmt: skip
    res = json.loads(p.stdout[p.stdout.index("{") :])
    for name in ("tensorstore", "tensorstore_sync", "direct", "zarr"):
        assert res[name]["samples_per_s"] > 0 and res[name]["cpu_ms_per_sample"] > 0, res
    want = res["tensorstore"]["samples_per_s"] / res["direct"]["samples_per_s"]
    assert abs(res["tensorstore_vs_direct"] - want) < 0.02 * want + 0.01, res


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_and_rows_counter_advance_per_set(raw, tmp_path, monkeypatch, workers):
    """Issue 11: the bar and `dataprep_rows_total` move per set, not per shard (12 rows in shards of 6); with pool
    workers the parent polls a shared count, so several sets may arrive in one update, but every row is counted once."""
    from dataprep import convert as convert_mod
    from tests.dataprep.dp_helpers import convert_inproc

    calls = []
    monkeypatch.setattr(convert_mod._Metrics, "row_done", lambda self, n=1: calls.append(n))
    assert convert_inproc(raw / "manifest.jsonl", tmp_path / "out", shard_size=6, workers=workers) in (0, 1)
    rows = len((raw / "manifest.jsonl").read_text().splitlines())
    assert sum(calls) == rows == 12
    if workers == 1:
        assert calls == [1] * rows  # one update per set


def test_write_shard_reports_every_row(raw, tmp_path, monkeypatch):
    from dataprep import shard
    from dataprep.manifest import plan_rows
    from tests.dataprep.dp_helpers import HR, S2

    items = plan_rows(str(raw / "manifest.jsonl"), str(raw))[:5]
    seen = []
    monkeypatch.setattr(shard, "ON_ROW", lambda: seen.append(1))
    cfg = shard.ShardConfig(hr_size=HR, s2_size=S2, shard_size=5, frames_per_chunk_shard=8)
    (tmp_path / "shards").mkdir()
    summary = shard.write_shard(0, items, cfg, str(tmp_path / "shards"))
    assert len(seen) == summary["rows"] == len(items) == 5
