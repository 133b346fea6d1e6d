"""DeepSpeed checkpoints plus what DeepSpeed does not keep: step, data position and every rank's RNG states.

Layout: RUN/checkpoints/step00000050/ (DeepSpeed's files, `rng_rank00000.pt` per rank) and RUN/checkpoints/latest.
The data position is the step itself: the sampler's order depends only on (seed, global_batch, step).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, *, step: int, client_state: dict, rank: int, keep: int,
         config: dict | None = None) -> Path:
    """Save the engine (student, teacher, optimizer, experts) and this rank's RNG; keep the newest `keep` tags.

    `config` (the resolved config tree, as RUN/config.json) is written as TAG/config.json by rank 0, so that a tag
    copied away from its run directory still says which model it holds (trainer.weights reads it first).
    """
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, "step": step})
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank:05d}.pt")
    if rank == 0:  # readable without torch, and checked before DeepSpeed touches the files
        (ckpt_dir / tag / "run_state.json").write_text(json.dumps({**client_state, "step": step}, indent=1))
        if config is not None:
            (ckpt_dir / tag / "config.json").write_text(json.dumps(config, indent=2))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and keep > 0:
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt_dir / tag


def _reload_frozen_experts(engine, ckpt_dir: Path, tag: str) -> None:
    """Load frozen expert params (the teacher's) again from their per-expert files.

    Under ZeRO-2, DeepSpeed 0.19 also restores every frozen parameter from `frozen_param_fragments`, which rank 0
    alone writes and which names experts by LOCAL index: with expert parallelism, ranks > 0 get rank 0's experts in
    place of their own (found by the resume test; trainable experts escape because ZeRO restores them from the
    optimizer's fp32 partitions). DeepSpeed's own per-expert loader, run again, puts the right ones back.
    """
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    frozen = {n: p for n, p in engine.module.named_parameters() if not p.requires_grad and is_moe_param(p)}
    if not frozen or not engine.has_moe_layers:
        return
    state: dict = {}
    DeepSpeedEngine.load_moe_state_dict(str(ckpt_dir), tag, state_dict=state, old_moe_load=False,
                                        model=engine.module, num_experts=engine.num_experts,
                                        checkpoint_engine=engine.checkpoint_engine)
    missing = sorted(set(frozen) - set(state))
    if missing:
        raise RuntimeError(f"checkpoint {ckpt_dir / tag} lacks expert tensors {missing[:3]}")
    with torch.no_grad():
        for name, p in frozen.items():
            p.copy_(state[name])


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    return f.read_text().strip() if f.exists() else None


def load(engine, ckpt_dir: Path, *, rank: int, world_size: int, tag: str | None = None) -> dict:
    """Load `tag` (default: latest) into the engine and restore this rank's RNG; returns the client state."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
    state_file = ckpt_dir / tag / "run_state.json"
    if state_file.exists():
        saved_world = json.loads(state_file.read_text()).get("world_size", world_size)
        if saved_world != world_size:
            raise RuntimeError(
                f"checkpoint {ckpt_dir / tag} was written by {saved_world} ranks and this run has {world_size}: "
                f"ZeRO optimizer state is partitioned per rank, so resume on {saved_world} ranks (moving a run "
                f"to another world size needs a universal checkpoint, not supported yet), or start a new run "
                f"directory")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    _reload_frozen_experts(engine, ckpt_dir, tag)
    rng_file = ckpt_dir / tag / f"rng_rank{rank:05d}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client
