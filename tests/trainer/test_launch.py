"""launch/pretrain.sh: the deepspeed command it builds, its errors, and a two-node hostfile world on one machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def print_only(*args: str, env: dict | None = None) -> str:
    out = subprocess.run(["bash", "launch/pretrain.sh", "--print-only", *args], cwd=REPO, env=env or ENV,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_local_ranks_and_passthrough():
    cmd = print_only("--num-ranks", "3", "--master-port", "1234", "--recipe", "tiny", "--set", "optim.lr=1e-3")
    assert "--num_gpus 3" in cmd and "--master_port 1234" in cmd and "--master_addr 127.0.0.1" in cmd
    assert cmd.endswith("launch/pretrain.sh --recipe tiny --set optim.lr=1e-3")


def test_hostfile_flags(tmp_path):
    one = tmp_path / "one"
    one.write_text("# comment\nnodeA slots=2\n")
    assert "--no_ssh_check" in print_only("--hostfile", str(one))  # a single node needs no ssh
    two = tmp_path / "two"
    two.write_text("nodeA slots=1\nnodeB slots=1\n")
    cmd = print_only("--hostfile", str(two), "--master-addr", "nodeA")
    assert f"--hostfile {two}" in cmd and "--master_addr nodeA" in cmd and "--no_ssh" not in cmd
    cmd = print_only("--hostfile", str(two), "--no-ssh", "--node-rank", "1", "--master-addr", "nodeA")
    assert "--no_ssh --node_rank 1" in cmd


def test_errors_are_clear(tmp_path):
    r = subprocess.run(["bash", "launch/pretrain.sh", "--hostfile", str(tmp_path / "nope")], cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not found" in r.stderr
    hf = tmp_path / "hf"
    hf.write_text("a slots=1\nb slots=1\n")
    r = subprocess.run(["bash", "launch/pretrain.sh", "--hostfile", str(hf), "--no-ssh"], cwd=REPO, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--node-rank" in r.stderr


def test_python_side_rejects_bad_config(tmp_path):
    """The file run as Python (what every rank executes) parses arguments like trainer.pretrain."""
    r = subprocess.run([sys.executable, "launch/pretrain.sh", "--recipe", "tiny", "--data", str(tmp_path)],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "not a dataprep dataset" in r.stderr
    r = subprocess.run([sys.executable, "launch/pretrain.sh", "--recipe", "tiny", "--set", "model.dept=1"],
                       cwd=REPO, env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean depths" in r.stderr


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_nodes_without_ssh_form_one_world(tmp_path, skeleton_dataset):
    """Two launchers (node ranks 0 and 1) from one hostfile join one 2-rank world; --dry-run builds everything."""
    hf = tmp_path / "hostfile"
    hf.write_text("node0 slots=1\nnode1 slots=1\n")
    port = free_port()
    procs = [subprocess.Popen(["bash", "launch/pretrain.sh", "--hostfile", str(hf), "--no-ssh", "--node-rank", str(r),
                               "--master-addr", "127.0.0.1", "--master-port", str(port), "--recipe", "tiny",
                               "--data", str(skeleton_dataset), "--run-dir", str(tmp_path / "run"),
                               "--set", "metrics.port=0", "--dry-run"],
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "dry run: built tiny on 2 ranks" in outs[0]
    assert (tmp_path / "run" / "config.json").exists()


@pytest.mark.multiproc
@pytest.mark.slow
def test_launcher_first_form(tmp_path, skeleton_dataset):
    """`deepspeed --num_gpus 2 launch/pretrain.sh ARGS`, as operators type it: every rank runs the file as Python."""
    r = subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port",
                        str(free_port()), "launch/pretrain.sh", "--recipe", "tiny", "--data", str(skeleton_dataset),
                        "--run-dir", str(tmp_path / "run"), "--set", "metrics.port=0", "--dry-run"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dry run: built tiny on 2 ranks" in r.stdout
