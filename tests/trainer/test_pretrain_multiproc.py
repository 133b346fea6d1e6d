"""The walking skeleton end to end on 2 CPU ranks through launch/pretrain.sh and the deepspeed launcher.

One uninterrupted run (A) and one run killed with SIGKILL after its first checkpoint and relaunched (B): the loss is
finite and falls, every expert of the expert-parallel MoE is in the checkpoint, and B ends bit-identical to A. A third
run (C) with in-training k-NN every 4 steps has A's loss sequence exactly.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS, CKPT_EVERY = 12, 6


def launch(data: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", "launch/pretrain.sh", "--num-ranks", "2", "--master-port", str(free_port()), "--recipe", "tiny",
           "--data", str(data), "--set", f"train.max_steps={STEPS}", "--run-dir", str(run_dir),
           "--set", "metrics.port=0", "--set", f"train.ckpt_every={CKPT_EVERY}", "--set", "model.moe.ep_size=2", *extra]
    log = open(run_dir.parent / f"{run_dir.name}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, run_dir: Path, timeout: float = 420) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    log = (run_dir.parent / f"{run_dir.name}.log").read_text(errors="replace")
    assert rc == 0, f"pretrain.sh exited {rc}:\n{log[-4000:]}"


def records(run_dir: Path) -> dict[int, dict]:
    """Step -> the last record logged for it (a resumed run logs the steps after its checkpoint again)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def checkpoint_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a DeepSpeed checkpoint: dense module states plus each expert file."""
    out = {}
    for f in sorted(tag_dir.glob("*model_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        state = state.get("module", state)  # expert files hold the expert's tensors directly
        out.update({f"{f.name}:{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


@pytest.fixture(scope="module")
def uninterrupted(skeleton_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("a") / "run"
    run.parent.mkdir(exist_ok=True)
    wait(launch(skeleton_dataset, run), run)
    return run


def test_loss_finite_and_falls(uninterrupted):
    recs = records(uninterrupted)
    assert sorted(recs) == list(range(1, STEPS + 1))
    losses = [recs[s]["loss/total"] for s in sorted(recs)]
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, f"loss did not fall: {losses}"
    assert all(recs[s]["samples_per_s"] > 0 and recs[s]["tflops"] > 0 for s in recs)
    config = json.loads((uninterrupted / "config.json").read_text())
    assert config["recipe"] == "tiny" and config["world_size"] == 2 and config["git_revision"]


def test_console_shows_only_our_lines(uninterrupted):
    """Issue 12: without --verbose the console holds our logger lines and nothing else (no DeepSpeed INFO lines, no
    launcher spawn commands, no bare prints from DeepSpeed's MoE group set-up, no FutureWarnings)."""
    log = (uninterrupted.parent / f"{uninterrupted.name}.log").read_text(errors="replace")
    ours = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (trainer|dataprep|kernels)(\.\w+)*: ")
    foreign = [line for line in log.splitlines() if line.strip() and not ours.match(line)]
    assert not foreign, "lines not from our loggers:\n" + "\n".join(foreign[:20])
    assert re.search(rf"trainer: step {STEPS}/{STEPS} loss", log), log[-2000:]


def test_checkpoint_holds_every_expert(uninterrupted):
    tag = uninterrupted / "checkpoints" / (uninterrupted / "checkpoints" / "latest").read_text().strip()
    assert tag.name == f"step{STEPS:08d}"
    config = json.loads((uninterrupted / "config.json").read_text())
    experts = config["model"]["moe"]["num_experts"]
    layers = 2 * config["model"]["moe"]["num_layers"]  # student and teacher each hold the MoE blocks
    for layer in range(layers):
        for e in range(experts):  # ep_size=2: experts 2,3 live on rank 1 and must still be saved
            assert (tag / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt").exists(), (layer, e)
    assert {p.name for p in tag.glob("rng_rank*.pt")} == {"rng_rank00000.pt", "rng_rank00001.pt"}
    assert len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) >= 2


def test_killed_run_resumes_exactly(skeleton_dataset, uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = launch(skeleton_dataset, run)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 420
    while not (latest.exists() and latest.read_text().strip() == f"step{CKPT_EVERY:08d}"):
        assert proc.poll() is None, "run B ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within the time limit"
        time.sleep(0.2)
    time.sleep(1.0)  # let it get into the following steps before the kill
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    wait(launch(skeleton_dataset, run), run)

    a, b = records(uninterrupted), records(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert b[step]["loss/total"] == a[step]["loss/total"], step
    tag = f"step{STEPS:08d}"
    ta, tb = checkpoint_tensors(uninterrupted / "checkpoints" / tag), checkpoint_tensors(run / "checkpoints" / tag)
    assert ta.keys() == tb.keys() and len(ta) > 50
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, different[:5]


def test_in_training_knn_leaves_the_loss_sequence_unchanged(skeleton_dataset, uninterrupted, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 40, 40), (40, 200, 40))):  # two separable classes of noisy colour patches
        (tmp_path / "labelled" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            img = np.clip(np.array(colour) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "labelled" / f"class{c}" / f"{i}.png")
    run = tmp_path / "run"
    wait(launch(skeleton_dataset, run, "--set", "eval.every=4", "--set", f"eval.data={tmp_path / 'labelled'}",
                "--set", "eval.k=3"), run)
    a, c = records(uninterrupted), records(run)
    assert [c[s]["loss/total"] for s in sorted(c)] == [a[s]["loss/total"] for s in sorted(a)]
    evaluated = [s for s in sorted(c) if "health/knn_top1" in c[s]]
    assert evaluated == [1, 4, 8, 12] and all(0 <= c[s]["health/knn_top1"] <= 100 for s in evaluated)
