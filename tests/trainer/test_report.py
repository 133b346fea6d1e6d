"""`python -m trainer.report RUN`: every PNG exists and is a real, non-blank image; the text summary fits a screen."""

import json

import numpy as np
import pytest
from PIL import Image

from trainer.report import expert_load, main
from trainer.summary import main as summary_main

LAYER = "stages.2.blocks.1.ffn"


def write_run(run, steps=12, knn=True):
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(f"step{steps:08d}")
    (run / "config.json").write_text(json.dumps({"recipe": "tiny", "world_size": 2, "metrics": {"port": 0}}))
    lines = []
    for i in range(1, steps + 1):
        rec = {"step": i, "samples_per_s": 4.0 + i % 3, "tokens_per_s": 4000.0 + 100 * i, "step_s": 1.0 + 0.1 * i,
               "tflops": 0.05 + 0.001 * i, "mfu": 0.0, "loss/total": 10.0 / i, "loss/image/hr": 5.0 / i,
               "loss/moe_aux": 0.01, "time/data": 0.1, "time/forward": 0.4, "time/backward": 0.5, "time/step": 1.1,
               "health/teacher_entropy": 3.0 - 0.1 * i, "health/feature_std": 0.5 + 0.02 * i,
               "health/moe_max_over_mean": 1.5,
               f"moe/student/hr/{LAYER}": {"counts": [i, 10, 20 - i, 5], "dropped": 1},
               f"moe/student/s2/{LAYER}": {"counts": [1, 1, 1, 1], "dropped": 0},
               f"moe/teacher/hr/{LAYER}": {"counts": [5, 5, 5, 5], "dropped": 0}}
        if knn and i % 4 == 0:
            rec["health/knn_top1"], rec["health/knn_top5"] = 0.2 + 0.05 * i, 0.5 + 0.03 * i
        lines.append(json.dumps(rec))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_expert_load_sums_modalities_per_layer(tmp_path):
    write_run(tmp_path / "run", steps=2)
    from trainer.report import load

    labels, steps, share = expert_load(load(tmp_path / "run"))["student"]
    assert labels == [f"{LAYER} e{e}" for e in range(4)] and list(steps) == [1, 2]
    # step 1: hr [1, 10, 19, 5] + s2 [1, 1, 1, 1] = [2, 11, 20, 6] of 39 tokens
    np.testing.assert_allclose(share[:, 0], np.array([2, 11, 20, 6]) / 39)


@pytest.mark.parametrize("knn", [True, False])
def test_report_writes_non_blank_pngs_and_a_summary(tmp_path, capsys, knn):
    run = tmp_path / "run"
    write_run(run, knn=knn)
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    report = run / "report"
    expected = {"losses", "throughput", "mfu", "step_time", "expert_load", "health"} | ({"knn"} if knn else set())
    assert {p.stem for p in report.glob("*.png")} == expected
    for png in report.glob("*.png"):
        img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
        assert img.shape[0] >= 200 and img.shape[1] >= 300, png
        # Not blank: many colours and real contrast (a white canvas with only axes has few of either).
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50 and img.std() > 10, png
    assert len(out.splitlines()) <= 24 and max(map(len, out.splitlines())) <= 100 + len(str(report))
    assert "first 10.0000 -> last 0.8333" in out and str(report) in out
    assert ("k-NN top-1  0.400 (step 4) -> 0.800 (step 12)" in out) == knn
    assert (report / "summary.txt").read_text() == out
    assert summary_main([str(run)]) == 0
    assert f"plots          {report}/" in capsys.readouterr().out  # the demo's summary says where the PNGs are


def test_report_of_a_run_without_logs_fails_clearly(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "config.json").write_text("{}")
    assert main([str(tmp_path)]) == 1
    assert "error:" in capsys.readouterr().err
