"""A real Prometheus scraping a 2-rank training run: scrape config generated from a hostfile, both ranks' series
queried back through Prometheus' HTTP API; every live endpoint passes `promtool check metrics`, serves the
node/rank/run labels, and serves every metric the Grafana dashboard queries."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.trainer.test_monitoring import dashboard_names
from trainer.monitoring import main as scrape_main

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def get(url: str, timeout: float = 5) -> str:
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


def query(prom: str, expr: str) -> list[dict]:
    out = json.loads(get(f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"))
    assert out["status"] == "success", out
    return out["data"]["result"]


def free_port_pair() -> int:
    """A port p with p + 1 free too (rank 1 serves on port + 1)."""
    for _ in range(50):
        p = free_port()
        try:
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def prometheus(tmp_path):
    binary = shutil.which("prometheus")
    if not binary or not shutil.which("promtool"):
        pytest.skip("prometheus/promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    metrics_port, prom_port = free_port_pair(), free_port()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    config = tmp_path / "prometheus.yml"
    assert scrape_main(["--hostfile", str(hostfile), "--port", str(metrics_port), "--interval", "1",
                        "--out", str(config)]) == 0
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "prometheus.log", "wb"), start_new_session=True)  # noqa: SIM115
    url = f"http://127.0.0.1:{prom_port}"
    deadline = time.time() + 60
    while True:
        try:
            if "Ready" in get(f"{url}/-/ready", timeout=2):
                break
        except OSError:
            pass
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
        time.sleep(0.3)
    yield url, metrics_port
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_prometheus_scrapes_both_ranks_of_a_training_run(prometheus, skeleton_dataset, tmp_path):
    prom, port = prometheus
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("SKYSENSE_METRICS_ADDR", None)  # one machine: loopback
    cmd = ["bash", "launch/pretrain.sh", "--num-ranks", "2", "--master-port", str(free_port()), "--recipe", "tiny",
           "--data", str(skeleton_dataset), "--max-steps", "4", "--run-dir", str(run), "--no-resume",
           "--set", f"metrics.port={port}", "--set", "train.ckpt_every=100", "--set", "model.moe.ep_size=2"]
    log = tmp_path / "train.log"
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    texts: dict[int, str] = {}
    try:
        deadline = time.time() + 600  # start-up alone takes minutes on a loaded 2-core machine
        while len(texts) < 2:  # both endpoints, live, after at least two steps (every labelled series exists)
            assert proc.poll() is None, f"training ended before both endpoints were read:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, log.read_text()[-3000:]
            for rank in (0, 1):
                try:
                    text = get(f"http://127.0.0.1:{port + rank}/metrics", timeout=2)
                except OSError:
                    continue
                if any(line.startswith("skysense_step{") and float(line.split()[-1]) >= 2 for line in
                       text.splitlines()):
                    texts[rank] = text
            time.sleep(0.5)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0, log.read_text()[-3000:]

    dashboard = json.loads((REPO / "launch" / "monitoring" / "grafana-dashboard.json").read_text())
    for rank, text in texts.items():
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), f"rank {rank}: {r.stdout}{r.stderr}"
        assert f'rank="{rank}"' in text and f'run="{run.name}"' in text and 'node="' in text
        served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"}
        assert not dashboard_names(dashboard) - served, dashboard_names(dashboard) - served
        assert 'network="teacher"' in text and 'network="student"' in text  # expert load of both networks

    # Prometheus kept both ranks' throughput (last_over_time: the targets are gone, their series marked stale).
    expr = f'last_over_time(skysense_samples_per_second{{job="skysense", run="{run.name}"}}[10m])'
    deadline = time.time() + 30
    while {s["metric"]["rank"] for s in query(prom, expr)} != {"0", "1"} and time.time() < deadline:
        time.sleep(1)
    series = query(prom, expr)
    assert {s["metric"]["rank"] for s in series} == {"0", "1"}, series
    assert all(float(s["value"][1]) > 0 and s["metric"]["host"] == "localhost" for s in series)
    steps = query(prom, f'max_over_time(skysense_step{{run="{run.name}"}}[10m])')
    assert {s["metric"]["rank"] for s in steps} == {"0", "1"}
    assert all(float(s["value"][1]) >= 2 for s in steps)  # not 4: the last step may end between two scrapes
