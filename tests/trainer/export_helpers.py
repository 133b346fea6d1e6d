"""Checkpoints for tests/trainer/test_export.py.

`fake_checkpoint` lays an `SSLMetaArch` state dict out as DeepSpeed 0.19 does (dense tensors in
mp_rank_00_model_states.pt, one file per MoE layer and global expert), in-process and in a second; the slow tests
check the real layout. Run as a script on every rank (RANK, WORLD_SIZE, MASTER_* in the environment), it saves a
step-0 checkpoint of `Trainer(cfg)`:

    python tests/trainer/export_helpers.py RUN_DIR DATA_DIR [--set key=value ...]
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch

if __name__ == "__main__":  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trainer.config import RunConfig, resolve, to_dict  # noqa: E402

EXPERT = re.compile(r"\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")


def tiny_config(*overrides: str) -> RunConfig:
    return resolve("tiny", list(overrides))


def fake_checkpoint(run: Path, model: torch.nn.Module, cfg: RunConfig, *, step: int = 0) -> Path:
    """Write `model.state_dict()` as RUN/checkpoints/stepNNNNNNNN/ + latest + RUN/config.json; returns the tag."""
    from deepspeed.moe.layer import MoE

    tag = run / "checkpoints" / f"step{step:08d}"
    tag.mkdir(parents=True)
    state = model.state_dict()
    layers = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    dense = {}
    experts: dict[tuple[int, int], dict] = {}
    for k, v in state.items():
        match = EXPERT.search(k)
        if match is None:
            dense[k] = v.clone()
            continue
        layer = next(i for i, name in enumerate(layers) if k.startswith(name + "."))
        experts.setdefault((layer, int(match.group(1))), {})[k] = v.clone()
    torch.save({"module": dense, "ds_config": {"zero_optimization": {"stage": 2}}}, tag / "mp_rank_00_model_states.pt")
    for (layer, e), part in experts.items():
        torch.save(part, tag / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt")
    (tag / "run_state.json").write_text(json.dumps({"step": step, "recipe": cfg.recipe, "git_revision": "test",
                                                    "world_size": 1, "global_batch": cfg.train.global_batch}))
    (run / "checkpoints" / "latest").write_text(tag.name)
    (run / "config.json").write_text(json.dumps({**to_dict(cfg), "git_revision": "test", "world_size": 1}))
    return tag


def save_step0(run_dir: str, data: str, overrides: list[str]) -> None:
    """On every rank: build the Trainer (the DeepSpeed engine) and save its step-0 checkpoint."""
    import torch.distributed as dist

    from trainer.distributed import init_distributed
    from trainer.train import Trainer

    cfg = resolve("tiny", [f"run_dir={run_dir}", f"data.path={data}", "data.num_workers=0", "metrics.port=0",
                           *overrides])
    init_distributed()
    trainer = Trainer(cfg, resume=False)
    try:
        trainer.save()
    finally:
        trainer.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    args = sys.argv[1:]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    save_step0(args[0], args[1], sets)
