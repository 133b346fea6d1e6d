"""Long-run engine guards: resume refusals, non-finite steps, preemption, a dead rank, clear start-up errors, Slurm.

The multi-rank tests run tiny 2-rank jobs through launch/pretrain.sh and compare with one uninterrupted reference run:
a run stopped by SIGTERM (to the whole process group, launcher included), resumed as two "nodes" (two launchers,
--no-ssh) and killed by SIGKILL of one rank, then relaunched on two nodes, logs exactly the reference's per-step losses
and ends with bit-identical tensors.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import REPO, free_port
from trainer import checkpoint

STEPS, SCHEDULE, CKPT_EVERY = 10, 20, 3
# The process-group timeout also bounds the start-up rendezvous: short, yet above a loaded 2-core CI's start-up.
TIMEOUT_S = 90
# One thread per rank everywhere: a local launch and a two-launcher one must compute bit for bit alike.
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
       "OMP_NUM_THREADS": "1"}


def launch(data: Path, run_dir: Path, *extra: str, env: dict | None = None, node: int | None = None,
           port: int | None = None) -> subprocess.Popen:
    """A 2-rank tiny run: one launcher with 2 local ranks, or (node 0|1) one of two launchers with one rank each."""
    if node is None:
        where, log_name = ["--num-ranks", "2", "--master-port", str(free_port())], f"{run_dir.name}.log"
    else:
        hostfile = run_dir.parent / "hostfile"
        hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
        where = ["--hostfile", str(hostfile), "--no-ssh", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                 "--master-port", str(port)]
        log_name = f"{run_dir.name}.node{node}.log"
    cmd = ["bash", "launch/pretrain.sh", *where, "--recipe", "tiny", "--data", str(data), "--max-steps", str(STEPS),
           "--run-dir", str(run_dir), "--set", f"train.max_steps={SCHEDULE}", "--set", "metrics.port=0",
           "--set", f"train.ckpt_every={CKPT_EVERY}", "--set", "train.keep_ckpts=10", "--set", "model.moe.ep_size=2",
           "--set", f"train.collective_timeout_s={TIMEOUT_S}", *extra]
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(run_dir.parent / log_name, "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.log = run_dir.parent / log_name
    return proc


def two_nodes(data: Path, run_dir: Path) -> list[subprocess.Popen]:
    port = free_port()
    # Each of two launchers on one machine would bind its rank to every core (OMP_NUM_THREADS=2, another reduction
    # order than the local launch's one thread per rank): no binding, so ENV's one thread holds.
    return [launch(data, run_dir, node=n, port=port, env={"BIND_CORES": "0"}) for n in (0, 1)]


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 900) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return rc, proc.log.read_text(errors="replace")


def wait_for_tag(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 900) -> None:
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while not (latest.exists() and latest.read_text().strip() >= checkpoint.tag_for(step)):
        assert proc.poll() is None, f"run ended before checkpoint {step}"
        assert time.time() < deadline, f"no checkpoint {step} within {timeout} s"
        time.sleep(0.2)


def records(run_dir: Path) -> dict[int, dict]:
    """Step -> the last record logged for it (a resumed run logs the steps after its checkpoint again)."""
    return {rec["step"]: rec for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint (student, teacher, objective buffers, each expert file)."""
    out = {}
    for f in sorted(tag_dir.glob("*model_states.pt")):
        state = torch.load(f, map_location="cpu", weights_only=False)
        state = state.get("module", state)
        out.update({f"{f.name}:{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def expected_lr(step: int, cfg: dict) -> float:
    """The lr of 0-based `step` for linear warm-up then cosine over train.max_steps, written out independently."""
    o, n = cfg["optim"], cfg["train"]["max_steps"]
    if step < o["warmup_steps"]:
        return o["lr"] * step / o["warmup_steps"]
    t = (step - o["warmup_steps"]) / (n - o["warmup_steps"] - 1)
    return o["min_lr"] + 0.5 * (o["lr"] - o["min_lr"]) * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------------------------
# (A) resume guards, without an engine: they act before DeepSpeed reads anything


def test_fingerprint_follows_content_not_copies(skeleton_dataset, tmp_path):
    fp = checkpoint.dataset_fingerprint(skeleton_dataset)
    assert fp["rows"] == pq.read_metadata(skeleton_dataset / "index.parquet").num_rows == 24
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("dataset.json", "index.parquet"):
        shutil.copy(skeleton_dataset / name, copy / name)  # new mtimes, same bytes
    assert checkpoint.dataset_fingerprint(copy) == fp
    table = pq.read_table(copy / "index.parquet")
    pq.write_table(table.slice(0, 23), copy / "index.parquet")
    fewer = checkpoint.dataset_fingerprint(copy)
    assert fewer["fingerprint"] != fp["fingerprint"] and fewer["rows"] == 23
    shutil.copy(skeleton_dataset / "index.parquet", copy / "index.parquet")
    meta = json.loads((copy / "dataset.json").read_text())
    meta["hr_size"] += 1
    (copy / "dataset.json").write_text(json.dumps(meta))
    assert checkpoint.dataset_fingerprint(copy)["dataset_json_sha256"] != fp["dataset_json_sha256"]


def _tag(tmp_path: Path, state: dict) -> Path:
    tag = tmp_path / "step00000010"
    tag.mkdir()
    (tmp_path / "latest").write_text("step00000010\n")
    (tag / "run_state.json").write_text(json.dumps({"step": 10, "world_size": 2, **state}))
    return tag


def test_resume_refused_on_other_dataset_or_schedule(tmp_path):
    data = {"fingerprint": "aaaa", "rows": 24, "index_bytes": 100, "dataset_json_sha256": "x"}
    sched = {"train.max_steps": 50, "optim.lr": 1e-3}
    _tag(tmp_path, {"global_batch": 8, "dataset": data, "schedule": sched})
    other = {**data, "fingerprint": "bbbb", "rows": 23}
    current = {"global_batch": 8, "dataset": other, "schedule": sched}
    with pytest.raises(checkpoint.ResumeError, match=r"another dataset .*rows 24 -> 23.*allow_data_change"):
        checkpoint.load(None, tmp_path, rank=0, world_size=2, current=current)
    current = {"global_batch": 8, "dataset": data, "schedule": {**sched, "train.max_steps": 80}}
    with pytest.raises(checkpoint.ResumeError, match=r"train.max_steps 50 -> 80.*allow_schedule_change"):
        checkpoint.load(None, tmp_path, rank=0, world_size=2, current=current)
    with pytest.raises(checkpoint.ResumeError, match="global_batch=8, this run 16"):
        checkpoint.load(None, tmp_path, rank=0, world_size=2, current={**current, "global_batch": 16})
    # allowed: the guards pass and the next check (the files) speaks
    with pytest.raises(checkpoint.ResumeError, match="cannot be loaded: missing mp_rank_00_model_states.pt"):
        checkpoint.load(None, tmp_path, rank=0, world_size=2, current={**current, "dataset": other},
                        allow_data_change=True, allow_schedule_change=True)


def test_incomplete_checkpoint_names_what_is_missing(tmp_path):
    tag = _tag(tmp_path, {"global_batch": 8})
    for name in ("mp_rank_00_model_states.pt", "rng_rank00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        (tag / name).write_bytes(b"")
    with pytest.raises(checkpoint.ResumeError, match=r"missing rng_rank00001.pt, zero_pp_rank_1_mp_rank_00_optim"):
        checkpoint.load(None, tmp_path, rank=0, world_size=2)
    (tag / "run_state.json").unlink()
    with pytest.raises(checkpoint.ResumeError, match="missing run_state.json"):
        checkpoint.load(None, tmp_path, rank=0, world_size=2)


# ---------------------------------------------------------------------------------------------------------------
# (F) Slurm, without Slurm: a stub scontrol / srun on PATH


def _stubs(tmp_path: Path) -> dict:
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    # scontrol show hostnames "gpu[07-08]" -> one name per line (the only call the scripts make). The pause makes a
    # reader that stops after the first line (`| head -n 1`) close the pipe before the second: SIGPIPE, every time.
    (bin_ / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] || exit 9\n'
                                   'echo gpu07\nsleep 0.3\necho gpu08\n')
    # srun: run the command once per node, as Slurm's task on that node would (SLURM_NODEID set)
    (bin_ / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                               'for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    return {**ENV, "PATH": f"{bin_}:{ENV['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "42",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_PER_NODE": "h100:4", "TMPDIR": str(tmp_path),
            "SLURM_SUBMIT_DIR": str(REPO)}


def test_slurm_hostfile_and_per_node_launch(tmp_path):
    env = _stubs(tmp_path)
    subprocess.run(["bash", "-n", "launch/slurm/pretrain.sbatch"], cwd=REPO, check=True)
    subprocess.run(["bash", "launch/slurm/hostfile.sh", str(tmp_path / "hf")], cwd=REPO, env=env, check=True)
    assert (tmp_path / "hf").read_text() == "gpu07 slots=4\ngpu08 slots=4\n"
    r = subprocess.run(["bash", str(REPO / "launch/slurm/pretrain.sbatch"), "--print-only", "--recipe", "huge"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout
    for node, line in enumerate(lines):  # what each node's launcher would run
        assert f"--hostfile {tmp_path}/skysense-42.hostfile --master_addr gpu07" in line
        assert f"--no_ssh --node_rank {node}" in line and line.endswith("launch/pretrain.sh --recipe huge")
    r = subprocess.run(["bash", "launch/slurm/hostfile.sh", str(tmp_path / "x")], cwd=REPO, capture_output=True,
                       text=True, env={k: v for k, v in env.items() if k != "SLURM_JOB_NODELIST"})
    assert r.returncode != 0 and "not inside a Slurm job" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# multi-rank runs

multiproc = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def reference(skeleton_dataset, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    rc, log = finish(launch(skeleton_dataset, run), run)
    assert rc == 0, log[-4000:]
    return run


@pytest.mark.multiproc
@pytest.mark.slow
def test_max_steps_stops_without_shrinking_the_schedule(reference):
    recs = records(reference)
    assert sorted(recs) == list(range(1, STEPS + 1))
    cfg = json.loads((reference / "config.json").read_text())
    assert cfg["train"]["max_steps"] == SCHEDULE and cfg["train"]["stop_step"] == STEPS
    for step, rec in recs.items():
        assert rec["lr"] == pytest.approx(expected_lr(step - 1, cfg), rel=1e-6), step
    assert (reference / "checkpoints" / "latest").read_text().strip() == checkpoint.tag_for(STEPS)
    assert not list((reference / "checkpoints").glob("tmp-*"))


@pytest.mark.multiproc
@pytest.mark.slow
def test_sigterm_then_dead_node_then_resume_is_exact(skeleton_dataset, reference, tmp_path):
    run = tmp_path / "run"
    # 1. SIGTERM to every process of the job at once (launcher, ranks, loader workers), as Slurm does.
    proc = launch(skeleton_dataset, run)
    wait_for_tag(proc, run, CKPT_EVERY)
    os.killpg(proc.pid, signal.SIGTERM)
    rc, log = finish(proc, run)
    assert rc == 0, log[-4000:]
    stopped = int((run / "checkpoints" / "latest").read_text().strip()[4:])
    assert CKPT_EVERY < stopped < STEPS - 1, f"stopped at {stopped}"
    assert "stop requested by a signal" in log
    assert set(records(run)) == set(range(1, stopped + 1))

    # 2. Resume as two "nodes" (two launchers, --no-ssh), then SIGKILL node 1's rank: node 0's rank finds its peer
    # gone in a collective, so both launchers end (no hang), leaving the last complete checkpoint.
    procs = two_nodes(skeleton_dataset, run)
    next_ckpt = (stopped // CKPT_EVERY + 1) * CKPT_EVERY
    wait_for_tag(procs[0], run, next_ckpt)
    ranks = [p for p in psutil.Process(procs[1].pid).children(recursive=True)
             if "--local_rank=0" in p.cmdline() and p.name() != "pt_data_worker"]  # not its loader workers
    assert len(ranks) == 1, [p.cmdline() for p in psutil.Process(procs[1].pid).children(recursive=True)]
    start = time.time()
    ranks[0].kill()
    bound = 2 * TIMEOUT_S + 60  # a collective's timeout, the launcher's 30 s grace, slack
    codes = [finish(p, run, timeout=bound)[0] for p in procs]
    assert all(c != 0 for c in codes) and time.time() - start < bound, codes
    assert (run / "checkpoints" / "latest").read_text().strip() == checkpoint.tag_for(next_ckpt)

    # 3. Relaunch on two nodes: the per-step losses and the final tensors are the uninterrupted run's.
    procs = two_nodes(skeleton_dataset, run)
    for p in procs:
        rc, log = finish(p, run)
        assert rc == 0, log[-4000:]
    a, b = records(reference), records(run)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert [b[s]["loss/total"] for s in sorted(b)] == [a[s]["loss/total"] for s in sorted(a)]
    assert b[next_ckpt + 1]["resume_s"] > 0 and "resume_s" not in b[next_ckpt + 2]  # the load time, logged once
    ta, tb = (tensors(r / "checkpoints" / checkpoint.tag_for(STEPS)) for r in (reference, run))
    assert ta.keys() == tb.keys() and len(ta) > 50
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]


@pytest.mark.multiproc
@pytest.mark.slow
def test_resume_with_another_schedule_is_one_clear_error(reference, tmp_path):
    """One rank, so that the schedule guard (checked before the world size) is what speaks."""
    run = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", run / "checkpoints")
    cmd = [sys.executable, "-m", "trainer.pretrain", "--recipe", "tiny", "--run-dir", str(run), "--dry-run",
           "--data", json.loads((reference / "config.json").read_text())["data"]["path"], "--set", "metrics.port=0",
           "--set", f"train.max_steps={SCHEDULE + 1}", "--set", "data.num_workers=0"]
    r = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"error: checkpoint {run / 'checkpoints' / checkpoint.tag_for(STEPS)} has other schedules " \
           f"(train.max_steps {SCHEDULE} -> {SCHEDULE + 1})" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.multiproc
@pytest.mark.slow
def test_nonfinite_steps_are_skipped_together_and_k_in_a_row_stop(skeleton_dataset, reference, tmp_path):
    """Step 2: NaN gradient on rank 1 only; steps 4 and 5: NaN loss everywhere, with train.max_bad_steps=2."""
    run = tmp_path / "run"
    proc = launch(skeleton_dataset, run, "--set", "train.ckpt_every=1", "--set", "train.max_bad_steps=2",
                  env={"SKYSENSE_INJECT_NONFINITE": "2:1:grad,4:*:loss,5:*:loss"})
    rc, log = finish(proc, run)
    assert rc == 1, log[-4000:]
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss or gradients in 2 optimizer steps in a row (steps 4-5" in errors[0]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == checkpoint.tag_for(4)  # nothing written after the stop
    recs, ref = records(run), records(reference)
    assert recs[1]["loss/total"] == ref[1]["loss/total"]
    assert [recs[s]["health/step_skipped"] for s in range(1, 6)] == [0, 1, 0, 1, 1]
    assert recs[5]["health/skipped_steps"] == 3
    t1, t2, t3, t4 = (tensors(ckpts / checkpoint.tag_for(s)) for s in (1, 2, 3, 4))
    assert any("teacher" in k for k in t1) and any("student" in k for k in t1)
    assert not [k for k in t1 if not torch.equal(t1[k], t2[k])]  # student, EMA teacher, centres, experts
    assert [k for k in t2 if not torch.equal(t2[k], t3[k])]  # step 3 trained again
    assert not [k for k in t3 if not torch.equal(t3[k], t4[k])]
    o1, o2 = (optimizer_tensors(ckpts / checkpoint.tag_for(s)) for s in (1, 2))  # Adam moments and fp32 masters
    assert o1.keys() == o2.keys() and any("exp_avg" in k for k in o1)
    assert not [k for k in o1 if not torch.equal(o1[k], o2[k])]


def optimizer_tensors(tag_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(tag_dir.glob("*optim_states.pt")):
        osd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        out.update({f"{f.name}:fp32:{i}": t for i, t in enumerate(osd["single_partition_of_fp32_groups"])})
        for i, st in osd["base_optimizer_state"]["state"].items():
            out.update({f"{f.name}:{i}:{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


@pytest.mark.multiproc
@pytest.mark.slow
def test_data_config_mismatch_is_one_error_line(skeleton_dataset, tmp_path):
    run = tmp_path / "run"
    rc, log = finish(launch(skeleton_dataset, run, "--set", "data.hr_crop=512", "--dry-run"), run)
    assert rc == 2, log[-4000:]
    errors = [line for line in log.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: dataset ") and "data.hr_crop=512 is larger than the " \
        "dataset's 256 px HR images" in errors[0], log[-3000:]
    assert "Traceback" not in log
