"""Scrape config from a hostfile, and the Grafana dashboard only querying metrics the trainer serves."""

import json
import re
import shutil
import subprocess

import pytest

from tests.conftest import REPO
from trainer.metrics import Metrics
from trainer.monitoring import main, read_hostfile, scrape_config


def test_hostfile_parsing(tmp_path):
    hf = tmp_path / "hf"
    hf.write_text("# cluster\nnode-a slots=8\n\nnode-b slots=2  # trailing comment\nnode-c\n")
    assert read_hostfile(hf) == [("node-a", 8), ("node-b", 2), ("node-c", 1)]
    for bad, msg in (("node-a slots=x\n", "expected 'host slots=N'"), ("a slots=1\na slots=2\n", "listed twice"),
                     ("# nothing\n", "no hosts")):
        hf.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            read_hostfile(hf)


def test_scrape_config_targets_every_rank(tmp_path):
    yaml = pytest.importorskip("yaml")
    text = scrape_config([("node-a", 3), ("node-b", 1)], port=9500)
    cfg = yaml.safe_load(text)
    groups = cfg["scrape_configs"][0]["static_configs"]
    assert groups[0]["targets"] == ["node-a:9500", "node-a:9501", "node-a:9502"]
    assert groups[1] == {"targets": ["node-b:9500"], "labels": {"host": "node-b"}}
    out = tmp_path / "prometheus.yml"
    hf = tmp_path / "hf"
    hf.write_text("n1 slots=2\n")
    assert main(["--hostfile", str(hf), "--port", "9400", "--out", str(out)]) == 0
    assert yaml.safe_load(out.read_text())["scrape_configs"][0]["static_configs"][0]["targets"][1] == "n1:9401"
    if shutil.which("promtool"):
        r = subprocess.run(["promtool", "check", "config", str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_only_served_metrics():
    dash = json.loads((REPO / "launch" / "monitoring" / "grafana-dashboard.json").read_text())
    m = Metrics(rank=0, port=0, run_dir=None, peak=0.0)
    m.record(step=1, samples=1, tokens=1, flops=1.0, times={"step": 1.0}, losses={"total": 1.0}, lr=1.0,
             grad_norm=1.0, momentum=1.0, moe={"l": {"expert_counts": [1], "dropped": 0}})
    served = {s.name for fam in m.registry.collect() for s in fam.samples}
    queried = {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"skysense_\w+", t["expr"])}
    assert queried and not queried - served, queried - served
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
