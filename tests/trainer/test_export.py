"""Export and loading of pretrained backbones: trainer.weights, `python -m trainer.export`, trainer.load_pretrained.

Fast tests use a checkpoint laid out as DeepSpeed writes it (tests/trainer/export_helpers.py); the slow ones use
real checkpoints of a 1-rank run and of a 2-rank expert-parallel (ep_size=2) engine.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import trainer
from tests.conftest import REPO, free_port
from tests.trainer.export_helpers import fake_checkpoint, tiny_config
from trainer import checkpoint
from trainer import export as export_cli
from trainer.config import to_dict
from trainer.meta_arch import SSLMetaArch
from trainer.model import build_model
from trainer.weights import WeightsError, backbone_state, load_backbone, read_checkpoint

SEED = 3


def teacher_like_run(seed: int) -> tuple[SSLMetaArch, object]:
    """An ep_size=1 SSLMetaArch built as Trainer does, with the teacher moved away from the student."""
    cfg = tiny_config(f"train.seed={seed}")
    torch.manual_seed(seed)
    model = SSLMetaArch(cfg)
    with torch.no_grad():  # a teacher equal to the student would hide a teacher/student mix-up
        for p in model.teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, cfg


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> tuple[Path, SSLMetaArch]:
    model, cfg = teacher_like_run(SEED)
    run = tmp_path_factory.mktemp("fake") / "run"
    fake_checkpoint(run, model, cfg, step=7)
    return run, model


@pytest.fixture(scope="module")
def exported(fake_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model.safetensors"
    assert export_cli.main(["--checkpoint", str(fake_run[0]), "--out", str(out)]) == 0
    return out


def hr_input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def features(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_features(hr_input() if x is None else x, "hr")["pooled"]


def strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------------------------
# fast: DeepSpeed's layout written by the helper


def test_read_checkpoint_is_the_full_state(fake_run):
    run, model = fake_run
    cfg, state = read_checkpoint(run)
    expected = model.state_dict()
    assert cfg.train.seed == SEED and cfg.model == model.cfg.model
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    # the tag directory itself works too
    _, again = read_checkpoint(run / "checkpoints" / "step00000007")
    assert again.keys() == expected.keys()


def test_backbone_state_selects_by_prefix(fake_run):
    _, model = fake_run
    state = model.state_dict()
    teacher = backbone_state(state, "teacher")
    assert teacher.keys() == model.teacher["backbone"].state_dict().keys()
    assert torch.equal(teacher["tokenizers.hr.proj.weight"], model.teacher["backbone"].tokenizers.hr.proj.weight)
    student = backbone_state(state, "student")
    assert torch.equal(student["tokenizers.hr.proj.weight"], model.student["backbone"].tokenizers.hr.proj.weight)


def test_export_round_trip(fake_run, exported):
    _, model = fake_run
    meta = json.loads(exported.with_suffix(".json").read_text())
    assert meta["step"] == 7 and meta["weights"] == "teacher" and meta["model"]["moe"]["ep_size"] == 1
    assert meta["includes"] == {"backbone": True, "fusion": False, "student": False}
    tensors = load_file(str(exported))
    teacher = model.teacher["backbone"]
    want = {k: v for k, v in teacher.state_dict().items() if not k.startswith("fusion.")}
    assert tensors.keys() == want.keys()
    assert meta["num_parameters"] == sum(p.numel() for n, p in teacher.named_parameters()
                                         if not n.startswith("fusion."))
    loaded = trainer.load_pretrained(exported)
    assert not loaded.training
    torch.testing.assert_close(features(loaded), features(teacher.eval()), rtol=0, atol=0)


def test_export_with_fusion_and_student(fake_run, tmp_path):
    run, model = fake_run
    out = tmp_path / "full.safetensors"
    assert export_cli.main(["--checkpoint", str(run), "--out", str(out), "--include", "fusion,student"]) == 0
    tensors = load_file(str(out))
    assert any(k.startswith("fusion.") for k in tensors)
    assert torch.equal(tensors["student.fusion.cls_token"], model.student["backbone"].fusion.cls_token)
    assert torch.equal(tensors["fusion.cls_token"], model.teacher["backbone"].fusion.cls_token)
    student, _, info = load_backbone(out, weights="student")
    assert info["weights"] == "student" and info["fusion_loaded"]
    torch.testing.assert_close(features(student), features(model.student["backbone"].eval()), rtol=0, atol=0)
    assert not torch.equal(features(student), features(trainer.load_pretrained(out)))


def test_metadata_alone_is_enough(exported, tmp_path):
    lone = tmp_path / "lone.safetensors"  # no lone.json beside it: the config comes from the file's metadata
    lone.write_bytes(exported.read_bytes())
    torch.testing.assert_close(features(trainer.load_pretrained(lone)), features(trainer.load_pretrained(exported)))


def test_load_pretrained_runs_no_pickle(exported, monkeypatch, fake_run):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading an export")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    model = trainer.load_pretrained(exported)
    monkeypatch.undo()
    torch.testing.assert_close(features(model), features(fake_run[1].teacher["backbone"].eval()), rtol=0, atol=0)


def test_load_pretrained_in_a_fresh_process(exported, fake_run, tmp_path):
    """No DeepSpeed engine, no process group: a bare interpreter loads it and runs forward_features."""
    out = tmp_path / "pooled.pt"
    code = ("import torch, torch.distributed as dist, trainer\n"
            f"m = trainer.load_pretrained({str(exported)!r})\n"
            "x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))\n"
            "with torch.no_grad(): y = m.forward_features(x, 'hr')['pooled']\n"
            "assert not dist.is_initialized()\n"
            f"torch.save(y, {str(out)!r})\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    torch.testing.assert_close(torch.load(out), features(fake_run[1].teacher["backbone"].eval()), rtol=0, atol=0)


def test_random_backbone_is_the_step0_student():
    model, mcfg, info = load_backbone("random", recipe="tiny", seed=SEED)
    assert info["source"] == "random" and not model.training and mcfg.moe.ep_size == 1
    cfg = tiny_config(f"train.seed={SEED}")
    torch.manual_seed(SEED)  # what Trainer does (seed_everything) before building SSLMetaArch
    reference = SSLMetaArch(cfg).student["backbone"].eval()
    torch.testing.assert_close(features(model), features(reference), rtol=0, atol=0)
    other, _, _ = load_backbone("random", recipe="tiny", seed=SEED + 1)
    assert not torch.equal(features(other), features(model))


# ---------------------------------------------------------------------------------------------------------------
# bad inputs


def one_line_error(argv: list[str], capsys) -> str:
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "stuff.txt").write_text("x")
    err = one_line_error(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert "not a training checkpoint" in err
    err = one_line_error(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert "no such file" in err
    with pytest.raises(WeightsError, match="no such file"):
        trainer.load_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match="not an export|not a readable"):
        trainer.load_pretrained(tmp_path / "stuff.txt")


def test_latest_names_a_missing_tag(tmp_path, capsys):
    model, cfg = teacher_like_run(0)
    run = tmp_path / "run"
    fake_checkpoint(run, model, cfg, step=1)
    (run / "checkpoints" / "latest").write_text("step00000099")
    err = one_line_error(["--checkpoint", str(run), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert "step00000099" in err and "step00000001" in err


def test_missing_expert_files_are_named(tmp_path, capsys):
    model, cfg = teacher_like_run(0)
    tag = fake_checkpoint(tmp_path / "run", model, cfg)
    (tag / "layer_3_expert_2_mp_rank_00_model_states.pt").unlink()
    (tag / "layer_0_expert_0_mp_rank_00_model_states.pt").unlink()
    err = one_line_error(["--checkpoint", str(tag), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert "layer_0_expert_0_mp_rank_00_model_states.pt" in err
    assert "layer_3_expert_2_mp_rank_00_model_states.pt" in err and "2 of its 16" in err


def test_safetensors_with_a_missing_tensor(exported, tmp_path):
    tensors = load_file(str(exported))
    victim = next(k for k in tensors if ".deepspeed_experts.3." in k)
    del tensors[victim]
    broken = tmp_path / "model.safetensors"
    save_file(tensors, str(broken))
    (tmp_path / "model.json").write_text(exported.with_suffix(".json").read_text())
    with pytest.raises(WeightsError, match="1 missing tensors") as e:
        trainer.load_pretrained(broken)
    assert victim in str(e.value)
    tensors[victim] = torch.zeros(1)  # wrong shape
    tensors["extra.weight"] = torch.zeros(1)
    save_file(tensors, str(broken))
    with pytest.raises(WeightsError, match="1 unexpected tensors.*1 shape mismatches"):
        trainer.load_pretrained(broken)


def test_fusion_may_be_absent_only_when_not_exported(exported, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="trainer"):
        trainer.load_pretrained(exported)
    assert "fusion" in caplog.text and "NOT loaded" in caplog.text
    # an export that claims fusion but lacks it is refused
    meta = json.loads(exported.with_suffix(".json").read_text())
    meta["includes"]["fusion"] = True
    (tmp_path / "model.json").write_text(json.dumps(meta))
    (tmp_path / "model.safetensors").write_bytes(exported.read_bytes())
    with pytest.raises(WeightsError, match="missing tensors \\(fusion\\."):
        trainer.load_pretrained(tmp_path / "model.safetensors")


def test_bad_cli_options(fake_run, tmp_path, capsys):
    run = str(fake_run[0])
    assert "fusion, student" in one_line_error(["--checkpoint", run, "--out", str(tmp_path / "m.safetensors"),
                                                "--include", "heads"], capsys)
    assert ".safetensors" in one_line_error(["--checkpoint", run, "--out", str(tmp_path / "m.pt")], capsys)
    assert "twice" in one_line_error(["--checkpoint", run, "--out", str(tmp_path / "m.safetensors"),
                                      "--weights", "student", "--include", "student"], capsys)


# ---------------------------------------------------------------------------------------------------------------
# slow: real DeepSpeed checkpoints


def raw_backbone(tag: Path, which: str):
    """The backbone rebuilt straight from DeepSpeed's files, without trainer.weights: the independent path."""
    state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    for f in tag.glob("layer_*_expert_*_mp_rank_00_model_states.pt"):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    cfg = json.loads((tag.parent.parent / "config.json").read_text())["model"]
    mcfg = tiny_config().model
    assert cfg["embed_dim"] == mcfg.embed_dim and cfg["moe"]["num_experts"] == mcfg.moe.num_experts
    model = build_model(mcfg)
    model.load_state_dict(strip(state, f"{which}.backbone."), strict=True)
    return model.eval()


@pytest.mark.slow
def test_real_run_export_round_trip(skeleton_dataset, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "trainer.pretrain", "--recipe", "tiny", "--data", str(skeleton_dataset),
           "--max-steps", "2", "--run-dir", str(run), "--set", "train.global_batch=4", "--set",
           "train.micro_batch=2", "--set", "data.num_workers=0", "--set", "metrics.port=0"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    tag = run / "checkpoints" / "step00000002"
    out = tmp_path / "teacher.safetensors"
    assert export_cli.main(["--checkpoint", str(run), "--out", str(out), "--include", "fusion"]) == 0
    loaded = trainer.load_pretrained(out)
    teacher = raw_backbone(tag, "teacher")
    torch.testing.assert_close(features(loaded), features(teacher), rtol=0, atol=0)
    assert json.loads(out.with_suffix(".json").read_text())["step"] == 2

    out_s = tmp_path / "student.safetensors"
    assert export_cli.main(["--checkpoint", str(tag), "--out", str(out_s), "--weights", "student"]) == 0
    student = trainer.load_pretrained(out_s)
    torch.testing.assert_close(features(student), features(raw_backbone(tag, "student")), rtol=0, atol=0)
    s, t = load_file(str(out_s)), load_file(str(out))
    assert any(not torch.equal(s[k], t[k]) for k in s), "student and teacher weights are identical after 2 steps"


@pytest.mark.slow
@pytest.mark.multiproc
def test_expert_parallel_checkpoint_exports_every_expert(skeleton_dataset, tmp_path):
    run = tmp_path / "run"
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "tests/trainer/export_helpers.py", str(run), str(skeleton_dataset),
               "--set", "model.moe.ep_size=2", "--set", f"train.seed={SEED}", "--set", "train.global_batch=4",
               "--set", "train.micro_batch=2"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode(errors="replace")[-3000:]

    out = tmp_path / "model.safetensors"
    assert export_cli.main(["--checkpoint", str(run), "--out", str(out), "--include", "fusion"]) == 0
    tensors = load_file(str(out))
    cfg = tiny_config()
    experts = cfg.model.moe.num_experts
    layers = sorted({k.split(".deepspeed_moe.")[0] for k in tensors if ".deepspeed_experts." in k})
    assert len(layers) == cfg.model.moe.num_layers
    for layer in layers:
        w = [tensors[f"{layer}.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"] for e in range(experts)]
        assert all(not torch.equal(w[i], w[j]) for i in range(experts) for j in range(i)), layer

    # Step 0: the teacher is the student of an ep_size=1 SSLMetaArch built from the same seed.
    ep1 = tiny_config(f"train.seed={SEED}")
    torch.manual_seed(SEED)
    reference = SSLMetaArch(ep1).teacher["backbone"].state_dict()
    assert tensors.keys() == reference.keys()
    differ = sorted(k for k in reference if not torch.equal(tensors[k], reference[k]))
    assert not differ, f"{len(differ)} tensors differ from the ep_size=1 init, e.g. {differ[:4]}"


def test_tag_config_wins_over_the_run_config(tmp_path):
    model, cfg = teacher_like_run(0)
    tag = fake_checkpoint(tmp_path / "run", model, cfg)
    # RUN/config.json is rewritten by every (re)start; TAG/config.json is the config of this checkpoint
    other = tiny_config("train.seed=11", "model.moe.ep_size=2")
    (tag / "config.json").write_text(json.dumps(to_dict(other)))
    read, state = read_checkpoint(tmp_path / "run")
    assert read.train.seed == 11 and read.model.moe.ep_size == 2
    assert state.keys() == model.state_dict().keys()
    _, mcfg, _ = load_backbone(tag)
    assert mcfg.moe.ep_size == 1  # loaded for inference with every expert local


def test_checkpoint_save_writes_the_tag_config(tmp_path):
    class Engine:  # the part of DeepSpeedEngine that checkpoint.save uses
        module = torch.nn.Linear(2, 2)  # checked for non-finite values before writing

        def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest=True):
            (Path(ckpt_dir) / tag).mkdir(parents=True)
            (Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"")  # what DeepSpeed writes first

    tree = to_dict(tiny_config())
    tag = checkpoint.save(Engine(), tmp_path, step=5, client_state={"recipe": "tiny"}, rank=0, keep=0, config=tree)
    assert json.loads((tag / "config.json").read_text()) == json.loads(json.dumps(tree))
    assert json.loads((tag / "run_state.json").read_text())["step"] == 5
    tag = checkpoint.save(Engine(), tmp_path, step=6, client_state={}, rank=0, keep=0)
    assert not (tag / "config.json").exists()
