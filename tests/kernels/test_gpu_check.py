"""launch/gpu-check.sh and its driver trainer/gpu_check.py: step orchestration (time boxes, failures that do not stop
later steps, dependencies), the loss comparison, the out-of-memory guard, the CUDA setup's pins, and the whole flow
in --dry-run mode on CPU with its JSON and text reports."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer import gpu_check
from trainer.gpu_check import Step, compare_losses, guarded, run_steps

REPO = Path(__file__).resolve().parents[2]


def test_steps_fail_time_out_and_skip_without_stopping_the_rest(tmp_path):
    steps = [
        Step(name="broken", cmd=[sys.executable, "-c", "raise SystemExit('RuntimeError: simulated failure')"]),
        Step(name="slow", cmd=[sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
             cap_s=2),
        Step(name="dependent", cmd=["true"], needs=("broken",)),
        Step(name="fine", cmd=[sys.executable, "-c", "print('hello')"]),
        Step(name="inline", inline=lambda: ("pass", "computed", {"x": 1})),
        Step(name="judged", cmd=["true"], judge=lambda rc, text: ("skipped", "nothing to do", {})),
    ]  # fmt: skip
    t = time.monotonic()
    res = {r["name"]: r for r in run_steps(steps, tmp_path / "logs", time.monotonic() + 120)}
    assert time.monotonic() - t < 40, "the timed-out step was not killed"
    assert res["broken"]["status"] == "fail" and "simulated failure" in res["broken"]["reason"]
    assert res["slow"]["status"] == "fail" and res["slow"]["reason"].startswith("timed out after 2 s")
    assert res["dependent"]["status"] == "skipped" and "needs broken (fail)" in res["dependent"]["reason"]
    assert res["fine"]["status"] == "pass" and (tmp_path / "logs" / "fine.log").read_text() == "hello\n"
    assert res["inline"] == {**res["inline"], "status": "pass", "reason": "computed", "details": {"x": 1}}
    assert res["judged"]["status"] == "skipped"


def test_budget_spent_skips_the_remaining_steps(tmp_path):
    res = run_steps([Step(name="late", cmd=["true"])], tmp_path, time.monotonic() + 1)
    assert res[0]["status"] == "skipped" and res[0]["reason"] == "time budget spent"


def test_compare_losses():
    ref = [5.0, 4.0, 3.0]
    ok, d = compare_losses([5.01, 4.0, 3.0], ref, 3, 5e-3)
    assert ok and d["max_rel_diff"] == pytest.approx(0.002)
    ok, d = compare_losses([5.0, 4.5, 3.0], ref, 3, 5e-3)
    assert not ok and "steps [2]" in d["reason"]
    ok, d = compare_losses([5.0, float("nan"), 3.0], ref, 3, 5e-3)
    assert not ok, "a NaN loss must fail the comparison"
    ok, d = compare_losses([5.0, 4.0], ref, 3, 5e-3)
    assert not ok and "expected 3 steps" in d["reason"]


def test_out_of_memory_is_reported_as_does_not_fit():
    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    result = {"fits": True}
    assert not guarded("step", oom, result)
    assert result["fits"] is False and result["reason"].startswith("does not fit: out of memory during step")
    assert guarded("build", lambda: None, result)

    def bug():
        raise ValueError("a real bug")

    with pytest.raises(ValueError):  # only out-of-memory is a result; anything else is a failure
        guarded("step", bug, {})


def test_setup_status_from_the_shell(tmp_path):
    log = tmp_path / "setup.log"
    log.write_text("Collecting deepspeed\nERROR: No matching distribution found for deepspeed\nsetup: pip failed\n")
    ns = lambda rc: type("A", (), {"setup_rc": rc, "setup_seconds": 3.0, "setup_log": str(log)})  # noqa: E731
    assert gpu_check.setup_result(ns("0"))["status"] == "pass"
    assert gpu_check.setup_result(ns("skipped"))["status"] == "skipped"
    bad = gpu_check.setup_result(ns("124"))
    assert bad["status"] == "fail" and bad["reason"].startswith("timed out")
    assert "pip failed" in gpu_check.setup_result(ns("1"))["reason"]


def test_cuda_setup_keeps_the_installed_torch_and_triton():
    spec = importlib.util.spec_from_file_location("cuda_deps", REPO / "launch" / "cuda_deps.py")
    cuda_deps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_deps)
    pyproject = (REPO / "pyproject.toml").read_text()
    constraints = (REPO / "launch" / "constraints.txt").read_text()
    reqs, cons = cuda_deps.plan(pyproject, constraints, "2.6.0a0+ecf3bae40a", ("pytorch-triton", "3.2.0+git4b3bb1f8"))
    names = {cuda_deps._name(r) for r in reqs}
    assert "deepspeed" in names and "pytest" in names and not names & {"torch", "triton"}
    assert "torch==2.6.0a0+ecf3bae40a" in cons and "pytorch-triton==3.2.0+git4b3bb1f8" in cons
    assert not any(c.startswith("triton==") for c in cons), "the CPU machines' triton pin must not reach CUDA"
    assert "deepspeed==0.19.8" in cons
    _, cons = cuda_deps.plan(pyproject, constraints, "2.5.1+cu124", None)
    assert cons[-1] == "torch==2.5.1+cu124" and not any("triton" in c for c in cons)


@pytest.mark.slow
@pytest.mark.multiproc
def test_dry_run_whole_flow_on_cpu(tmp_path):
    out = tmp_path / "check"
    cmd = ["bash", "launch/gpu-check.sh", "--dry-run", "--no-setup", "--out", str(out), "--budget", "1500",
           "--gpu-tests", "tests/kernels/test_kernels_apm_merge.py", "--bench-ops", "window_attention,apm_merge",
           "--steps", "1"]  # one interpreted tiny step per backend: test_kernels_convergence.py compares longer runs
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1700)
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dry-run" and report["schema"] == 1
    status = {s["name"]: s["status"] for s in report["steps"]}
    assert list(status) == list(gpu_check.STEPS), status
    expected = dict.fromkeys(gpu_check.STEPS, "pass") | {"setup": "skipped", "gpu-tests": "skipped"}
    assert status == expected, json.dumps(report["steps"], indent=1)[-6000:] + res.stdout[-2000:]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    by = {s["name"]: s for s in report["steps"]}
    assert by["setup"]["reason"].startswith("--no-setup")
    assert "no gpu test ran" in by["gpu-tests"]["reason"]
    assert report["env"]["torch"] == torch.__version__ and "warnings" in report["env"]
    smoke = by["kernel-smoke"]["details"]["results"]["cpu float32"]
    assert set(smoke) == {"window_attention", "apm_merge", "moe_routing"} and not any(smoke.values())
    bench = by["bench"]["details"]
    assert bench["shapes"] == "smoke" and bench["failures"] == 0 and len(bench["rows"]) == 4
    assert bench["drift"] and bench["drift"][0]["qkv_bitwise_identical"]
    cmp = by["tiny-compare"]["details"]
    assert len(cmp["triton"]) == len(cmp["reference"]) == 1 and cmp["max_rel_diff"] <= 1e-4
    probe = by["huge-probe"]["details"]
    assert probe["fits"] and probe["recipe"] == "tiny" and len(probe["step_s"]) == 1
    assert "model.activation_checkpointing=true" in probe["overrides"] and "train.micro_batch=1" in probe["overrides"]
    text = (out / "report.txt").read_text()
    for name in gpu_check.STEPS:
        assert any(line.startswith(name) for line in text.splitlines()), name
