"""Prometheus metrics scraped over HTTP (names, labels, promtool), the JSON-lines log, the run summary, MoE step
aggregates against hand-counted routing, FLOPs per network and view, and phase timing."""

import json
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from trainer.metrics import Metrics, PhaseTimer, bind_address, peak_tflops
from trainer.summary import summarise

BASE = (("node", "n0"), ("rank", "0"), ("run", "r1"))
LAYER = "stages.3.blocks.0.ffn"
FLOPS = {("student", "global", "forward"): 1e12, ("student", "global", "backward"): 2e12,
         ("teacher", "global", "forward"): 1e12}


def lab(*extra: tuple[str, str]) -> tuple:
    return tuple(sorted((*BASE, *extra)))


def fetch(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def parse(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def record(m: Metrics, step: int, loss: float, moe=None):
    moe = moe if moe is not None else {("student", "hr", LAYER): {"expert_counts": [5, 0, 3], "dropped": 2,
                                                                   "tokens": 8}}
    return m.record(step=step, samples=8, tokens=4000, flops=FLOPS, times={"step": 2.0, "data": 0.5, "forward": 1.0},
                    losses={"total": loss, "image/hr": loss / 2}, lr=1e-3, grad_norm=1.5, momentum=0.99, moe=moe,
                    health={"feature_std": 0.7, "knn_top1": 0.4, "knn_seconds": 3.0}, queue_depth=3,
                    skipped_steps=step - 1)


def test_endpoint_serves_what_was_recorded(tmp_path):
    port = free_port()
    m = Metrics(rank=0, port=port, run_dir=tmp_path, peak=4.0, run="r1", node="n0")
    record(m, 1, 4.0)
    record(m, 2, 3.0, moe={("teacher", "s2", LAYER): {"expert_counts": [1, 1, 1], "dropped": 0, "tokens": 3}})
    got = parse(fetch(port))
    assert got[("skysense_samples_per_second", BASE)] == pytest.approx(8 / 2.0)
    assert got[("skysense_tokens_per_second", BASE)] == pytest.approx(4000 / 2.0)
    assert got[("skysense_model_flops_per_second", BASE)] == pytest.approx(4e12 / 2.0)
    assert got[("skysense_mfu_ratio", BASE)] == pytest.approx(0.5)  # 4e12 FLOPs in 2 s of a 4 TFLOP/s peak
    assert got[("skysense_peak_flops_per_second", BASE)] == 4e12
    assert got[("skysense_model_flops_total", BASE)] == 8e12
    key = ("skysense_step_flops", lab(("network", "student"), ("view", "global"), ("pass", "backward")))
    assert got[key] == 2e12
    assert got[("skysense_loss", lab(("term", "total")))] == 3.0
    assert got[("skysense_step_seconds", BASE)] == 2.0
    assert got[("skysense_step_phase_seconds", lab(("phase", "data")))] == 0.5
    assert ("skysense_step_phase_seconds", lab(("phase", "step"))) not in got  # the total is its own metric
    assert got[("skysense_samples_total", BASE)] == 16  # a counter: two steps of 8
    assert got[("skysense_tokens_total", BASE)] == 8000
    assert got[("skysense_loader_queued_batches", BASE)] == 3
    assert got[("skysense_skipped_steps_total", BASE)] == 1  # 0 then 1
    assert got[("skysense_knn_seconds", BASE)] == 3.0
    assert got[("skysense_learning_health", lab(("name", "knn_top1")))] == 0.4
    assert ("skysense_learning_health", lab(("name", "knn_seconds"))) not in got  # seconds are not unitless
    assert got[("skysense_resident_memory_bytes", BASE)] > 10e6  # this process' RSS, not 0 on CPU
    hr = (("layer", LAYER), ("modality", "hr"), ("network", "student"))
    assert got[("skysense_moe_dropped_tokens_total", lab(*hr))] == 2
    assert got[("skysense_moe_routed_tokens_total", lab(*hr))] == 8
    # Step 2 had no student call: its expert gauges read 0, not step 1's counts; the teacher's are its own.
    assert got[("skysense_moe_expert_tokens", lab(*hr, ("expert", "2")))] == 0.0
    s2 = (("layer", LAYER), ("modality", "s2"), ("network", "teacher"))
    assert got[("skysense_moe_expert_tokens", lab(*s2, ("expert", "1")))] == 1.0
    assert not [k for k in got if "step" in dict(k[1])]  # the step is a value, never a label
    assert got[("skysense_step", BASE)] == 2
    m.checkpoint_saved(1.5)
    m.checkpoint_saved(0.5)
    got = parse(fetch(port))
    assert got[("skysense_checkpoint_last_save_seconds", BASE)] == 0.5
    assert got[("skysense_checkpoint_save_seconds_total", BASE)] == 2.0
    assert got[("skysense_checkpoint_saves_total", BASE)] == 2
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[1]["loss/total"] == 3.0
    assert lines[0]["tflops"] == pytest.approx(2.0) and lines[0]["flops"] == 4e12
    assert lines[0][f"moe/student/hr/{LAYER}"] == {"counts": [5, 0, 3], "dropped": 2}


def test_every_name_follows_prometheus_conventions_and_promtool_is_clean(tmp_path):
    port = free_port()
    m = Metrics(rank=0, port=port, run_dir=None, peak=0.0, run="r1")
    record(m, 1, 2.0)
    m.checkpoint_saved(1.0)
    text = fetch(port)
    for family in text_string_to_metric_families(text):
        assert family.name.startswith("skysense_"), family.name
        assert not any(u in family.name for u in ("tflops", "_ms", "milli", "_kb", "_mb", "_gb")), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        for s in family.samples:
            assert {"node", "rank", "run"} <= set(s.labels), s
    if not shutil.which("promtool"):
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it)")
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr


def test_summary_from_logs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "tiny", "world_size": 2, "metrics": {"port": 0}}))
    steps = [{"step": i, "samples_per_s": s, "tokens_per_s": 10 * s, "step_s": 1.0 / s, "loss/total": 5.0 - i}
             for i, s in enumerate([0.1, 4.0, 6.0, 5.0], start=1)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in steps))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000004")
    s = summarise(tmp_path)
    # The first (warm-up) step is left out of the medians; throughput is per rank x ranks.
    assert s["steps"] == 4 and s["samples_per_s"] == pytest.approx(2 * 5.0)
    assert s["tokens_per_s"] == pytest.approx(2 * 50.0)
    assert (s["first_loss"], s["last_loss"]) == (4.0, 1.0)
    assert s["checkpoint"].endswith("checkpoints/step00000004")


def test_peak_lookup():
    assert peak_tflops(123.0, "NVIDIA H100 80GB HBM3") == 123.0  # configured wins
    assert peak_tflops(0.0, "NVIDIA H20") == 148.0
    assert peak_tflops(0.0, "NVIDIA H200") == 989.0  # not H20's 148: longest name first
    assert peak_tflops(0.0, "NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops(0.0, "NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops(0.0, "Some CPU") == 0.0  # unknown: MFU left at 0
    if not torch.cuda.is_available():
        assert peak_tflops(0.0) == 0.0


def test_bind_address_loopback_alone_all_interfaces_across_nodes(monkeypatch):
    monkeypatch.delenv("SKYSENSE_METRICS_ADDR", raising=False)
    monkeypatch.delenv("CROSS_SIZE", raising=False)
    assert bind_address() == "127.0.0.1"
    monkeypatch.setenv("CROSS_SIZE", "2")  # the deepspeed launcher's node count, set from the hostfile
    assert bind_address() == "0.0.0.0"
    monkeypatch.setenv("SKYSENSE_METRICS_ADDR", "127.0.0.1")
    assert bind_address() == "127.0.0.1"
    monkeypatch.delenv("CROSS_SIZE")
    port = free_port()
    m = Metrics(rank=0, port=port, run_dir=None, peak=0.0)
    assert m.addr == "127.0.0.1" and "skysense_step" in fetch(port)
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)} - {"127.0.0.1"}
    except OSError:
        addrs = set()
    for addr in sorted(addrs)[:1]:  # another interface of this machine, when it has one: refused on loopback
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=2)


def test_busy_port_warns_and_training_goes_on(tmp_path, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = Metrics(rank=0, port=port, run_dir=tmp_path, peak=0.0, addr="127.0.0.1")
    assert m.port is None and "no Prometheus endpoint" in caplog.text
    record(m, 1, 2.0)  # still records and logs
    m.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss/total"] == 2.0


def test_phase_timer_sums_micro_batches_on_cpu():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("data"):
            time.sleep(0.05)
        with timer.phase("forward"):
            time.sleep(0.02)
    t = timer.times()
    assert set(t) == {"data", "forward"}
    assert 0.1 <= t["data"] < 0.3 and 0.04 <= t["forward"] < 0.2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_phase_timer_charges_async_kernels_to_their_phase_on_cuda():
    x = torch.randn(4096, 4096, device="cuda")
    timer = PhaseTimer(torch.device("cuda"))
    with timer.phase("forward"):
        for _ in range(20):  # launches return at once; the work runs after the block on the host clock
            x = x @ x / 64
        host = time.perf_counter()
    with timer.phase("optimizer"):
        pass
    t = timer.times()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        x = x @ x / 64
    end.record()
    end.synchronize()
    assert host > 0 and t["forward"] == pytest.approx(start.elapsed_time(end) / 1e3, rel=0.5)
    assert t["optimizer"] < t["forward"] / 5
