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


def served_names(m: Metrics) -> set[str]:
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def dashboard_names(dash: dict) -> set[str]:
    return {name for p in dash["panels"] for t in p["targets"] for name in re.findall(r"skysense_\w+", t["expr"])}


def test_dashboard_queries_only_served_metrics():
    """Every metric a panel queries is served by a rank after one step (the live endpoints of a real run are
    checked the same way in test_prometheus_multiproc.py), and the panels operators need are there."""
    dash = json.loads((REPO / "launch" / "monitoring" / "grafana-dashboard.json").read_text())
    m = Metrics(rank=0, port=0, run_dir=None, peak=0.0)
    m.record(step=1, samples=1, tokens=1, flops={("student", "global", "forward"): 1.0},
             times={"step": 1.0, "data": 0.1}, losses={"total": 1.0}, lr=1.0, grad_norm=1.0, momentum=1.0,
             health={"knn_top1": 0.5},
             moe={("student", "hr", "l"): {"expert_counts": [1], "dropped": 0, "tokens": 1}})
    queried = dashboard_names(dash)
    assert queried and not queried - served_names(m), queried - served_names(m)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    exprs = {p["title"]: " ".join(t["expr"] for t in p["targets"]) for p in dash["panels"]}
    for needed in ("skysense_samples_per_second", "skysense_mfu_ratio", "skysense_loss", "skysense_learning_health",
                   "skysense_step_phase_seconds", "skysense_moe_expert_tokens"):
        assert any(needed in e for e in exprs.values()), needed
    heat = [p for p in dash["panels"] if p["type"] == "heatmap"]
    assert heat and all("skysense_moe_expert_tokens" in t["expr"] for p in heat for t in p["targets"])


def test_scrape_config_passes_promtool_with_a_short_interval(tmp_path):
    if not shutil.which("promtool"):
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    out = tmp_path / "prometheus.yml"
    out.write_text(scrape_config([("localhost", 2)], port=9500, interval_s=1))  # timeout must not exceed it
    r = subprocess.run(["promtool", "check", "config", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
