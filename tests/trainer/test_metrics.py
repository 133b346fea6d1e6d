"""Prometheus metrics scraped over HTTP, the JSON-lines log, and the run summary built from it."""

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from trainer.metrics import Metrics, peak_tflops
from trainer.summary import summarise


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def record(m: Metrics, step: int, loss: float):
    return m.record(step=step, samples=8, tokens=4000, flops=2e12, times={"step": 2.0, "data": 0.5, "forward": 1.0},
                    losses={"total": loss, "image/hr": loss / 2}, lr=1e-3, grad_norm=1.5, momentum=0.99,
                    moe={"stages.3.blocks.0.ffn": {"expert_counts": [5, 0, 3], "dropped": 2}})


def test_endpoint_serves_what_was_recorded(tmp_path):
    port = free_port()
    m = Metrics(rank=0, port=port, run_dir=tmp_path, peak=10.0)
    record(m, 1, 4.0)
    record(m, 2, 3.0)
    got = scrape(port)
    r0 = (("rank", "0"),)
    assert got[("skysense_samples_per_second", r0)] == pytest.approx(8 / 2.0)
    assert got[("skysense_tokens_per_second", r0)] == pytest.approx(4000 / 2.0)
    assert got[("skysense_tflops", r0)] == pytest.approx(2e12 / 2.0 / 1e12)
    assert got[("skysense_mfu", r0)] == pytest.approx(1.0 / 10.0)
    assert got[("skysense_loss", (("rank", "0"), ("term", "total")))] == 3.0
    assert got[("skysense_step_seconds", (("phase", "data"), ("rank", "0")))] == 0.5
    assert got[("skysense_samples_total", r0)] == 16  # a counter: two steps of 8
    assert got[("skysense_moe_dropped_tokens_total", r0)] == 4
    key = ("skysense_expert_tokens", (("expert", "2"), ("layer", "stages.3.blocks.0.ffn"), ("rank", "0")))
    assert got[key] == 3.0
    m.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and lines[1]["loss/total"] == 3.0


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
    assert peak_tflops(123.0) == 123.0
    assert peak_tflops(0.0) == 0.0  # CPU: unknown, MFU left at 0


def test_busy_port_warns_and_training_goes_on(tmp_path, caplog):
    import socket

    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = Metrics(rank=0, port=port, run_dir=tmp_path, peak=0.0)
    assert m.port is None and "no Prometheus endpoint" in caplog.text
    record(m, 1, 2.0)  # still records and logs
    m.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss/total"] == 2.0
