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
