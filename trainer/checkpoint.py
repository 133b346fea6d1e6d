"""DeepSpeed checkpoints plus what DeepSpeed does not keep: step, data position and every rank's RNG states.

Layout: RUN/checkpoints/step00000050/ (DeepSpeed's files, `rng_rank00000.pt` per rank, `run_state.json`) and
RUN/checkpoints/latest. A checkpoint is written as tmp-step00000050/ and renamed, and `latest` moves to it, only once
every rank's files are there: a run killed while saving resumes from the previous checkpoint.
The data position is the step itself: the sampler's order depends only on (seed, global_batch, step).
`run_state.json` also holds the dataset fingerprint and the schedule settings, checked on resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer import reshard

TMP_PREFIX = "tmp-"
# Settings that shape the per-step schedules (trainer/schedules.py): resuming with other values changes the run.
SCHEDULE_KEYS = {"train": ("max_steps",), "optim": ("lr", "min_lr", "warmup_steps", "weight_decay", "weight_decay_end",
                                                     "momentum_start", "momentum_end"),
                 "loss": ("teacher_temp", "teacher_temp_warmup", "teacher_temp_warmup_steps")}


def dataset_fingerprint(root: str | Path) -> dict:
    """What identifies a dataprep dataset, cheaply at any size: dataset.json's hash and index.parquet's footer.

    The Parquet footer (schema, row count, every row group's offsets and column statistics) changes with any rewrite of
    the index and is a few KB to MB even at 21M rows; reading it is one seek. File times are left out on purpose: a
    copy to a node's local disk keeps the bytes but not the mtime. Shards are not read (300 TB).
    """
    from dataprep import remote

    root = remote.mirror(root) if remote.is_url(root) else Path(root)  # s3://...: the fetched metadata files
    meta = (root / "dataset.json").read_bytes()
    index = root / "index.parquet"
    size = index.stat().st_size
    with open(index, "rb") as f:
        f.seek(size - 8)
        footer_len, magic = struct.unpack("<I4s", f.read(8))
        if magic != b"PAR1":
            raise ValueError(f"{index} is not a Parquet file (no PAR1 footer)")
        f.seek(size - 8 - footer_len)
        footer = f.read(footer_len)
    import pyarrow.parquet as pq

    rows = pq.read_metadata(index).num_rows
    digest = hashlib.sha256(meta + struct.pack("<Q", size) + footer).hexdigest()[:16]
    return {"fingerprint": digest, "rows": rows, "index_bytes": size,
            "dataset_json_sha256": hashlib.sha256(meta).hexdigest()[:16]}


def schedule_settings(config: dict) -> dict:
    """The schedule-shaping values of a resolved config tree (`to_dict(cfg)`), flattened to dotted keys."""
    return {f"{sec}.{k}": config[sec][k] for sec, keys in SCHEDULE_KEYS.items() for k in keys}


def check_resume(saved: dict, current: dict, *, allow_data_change: bool, allow_schedule_change: bool,
                 where: Path) -> None:
    """Refuse to resume when the dataset or the schedules differ from the checkpoint's (unless allowed)."""
    if saved.get("global_batch") is not None and saved["global_batch"] != current["global_batch"]:
        raise ResumeError(f"checkpoint {where} used train.global_batch={saved['global_batch']}, this run "
                          f"{current['global_batch']}: the data order would change")
    old, new = saved.get("dataset"), current.get("dataset")
    if old and new and old["fingerprint"] != new["fingerprint"] and not allow_data_change:
        what = [k for k in ("rows", "index_bytes", "dataset_json_sha256") if old.get(k) != new.get(k)]
        raise ResumeError(f"checkpoint {where} was trained on another dataset (fingerprint {old['fingerprint']} vs "
                          f"{new['fingerprint']}; differs in {', '.join(what) or 'index.parquet footer'}; rows "
                          f"{old.get('rows')} -> {new.get('rows')}): pass --set train.allow_data_change=true to resume "
                          f"on it anyway, or start a new run directory")
    old, new = saved.get("schedule"), current.get("schedule")
    if old and new and not allow_schedule_change:
        diff = [f"{k} {old.get(k)} -> {new[k]}" for k in new if k in old and old[k] != new[k]]
        if diff:
            raise ResumeError(f"checkpoint {where} has other schedules ({'; '.join(diff)}): --max-steps N stops "
                              f"early without changing them; pass --set train.allow_schedule_change=true to resume "
                              f"with the new ones anyway")


class ResumeError(RuntimeError):
    """A checkpoint this run must not (or cannot) continue from; the message says why."""


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


def _assert_finite(engine) -> None:
    """Refuse (on every rank together) to write a checkpoint holding NaN or inf weights or buffers."""
    bad = [n for n, t in (*engine.module.named_parameters(), *engine.module.named_buffers())
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    flag = torch.tensor([float(len(bad))])
    if dist.is_initialized():
        dist.all_reduce(flag)
    if flag.item() > 0:
        raise RuntimeError(f"refusing to write a checkpoint: non-finite values in {bad[:3] or 'another rank'}")


def save(engine, ckpt_dir: Path, *, step: int, client_state: dict, rank: int, keep: int,
         config: dict | None = None) -> Path:
    """Save the engine (student, teacher, optimizer, experts) and this rank's RNG; keep the newest `keep` tags.

    Written under tmp-TAG; rank 0 renames it to TAG and points `latest` at it once every rank's files are there.
    `config` (the resolved config tree, as RUN/config.json) is written as TAG/config.json by rank 0, so that a tag
    copied away from its run directory still says which model it holds (trainer.weights reads it first).
    """
    _assert_finite(engine)
    world = dist.get_world_size() if dist.is_initialized() else 1
    tag = tag_for(step)
    tmp, final = ckpt_dir / (TMP_PREFIX + tag), ckpt_dir / tag
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed half-way at this step before
    if dist.is_initialized():
        dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=TMP_PREFIX + tag, client_state={**client_state, "step": step},
                           save_latest=False)
    torch.save(_rng_state(), tmp / f"rng_rank{rank:05d}.pt")
    if rank == 0:  # readable without torch, and checked before DeepSpeed touches the files
        (tmp / "run_state.json").write_text(json.dumps({**client_state, "step": step}, indent=1))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        missing = missing_files(tmp, world)
        if missing:
            raise RuntimeError(f"checkpoint {tmp} is incomplete after every rank saved: missing {missing[:5]}")
        shutil.rmtree(final, ignore_errors=True)  # left by a run that died before moving `latest` to it
        os.replace(tmp, final)
        _write_atomic(ckpt_dir / "latest", tag)
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # no rank goes on (or exits) before `latest` names a complete checkpoint
    return final


def _write_atomic(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    with open(part, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def missing_files(tag_dir: Path, world_size: int) -> list[str]:
    """The files a complete checkpoint of `world_size` ranks has and `tag_dir` lacks (names relative to it)."""
    if not tag_dir.is_dir():
        return [f"{tag_dir.name}/ (the directory itself)"]
    names = {p.name for p in tag_dir.iterdir()}
    need = ["run_state.json", "mp_rank_00_model_states.pt", *(f"rng_rank{r:05d}.pt" for r in range(world_size))]
    missing = [n for n in need if n not in names]
    if any(n.endswith("optim_states.pt") for n in names) or world_size > 1:  # ZeRO: one optimizer shard per rank
        missing += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)
                    if not any(n.endswith(f"_rank_{r}_mp_rank_00_optim_states.pt") for n in names)]
    return missing


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


def read_run_state(ckpt_dir: Path, tag: str | None = None) -> tuple[str, dict]:
    """(tag, run_state.json) of `tag` (default: latest), with a clear error when either is missing."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
    state_file = ckpt_dir / tag / "run_state.json"
    if not state_file.exists():
        raise ResumeError(f"checkpoint {ckpt_dir / tag} cannot be loaded: missing run_state.json")
    return tag, json.loads(state_file.read_text())


def load(engine, ckpt_dir: Path, *, rank: int, world_size: int, tag: str | None = None,
         current: dict | None = None, allow_data_change: bool = False, allow_schedule_change: bool = False) -> dict:
    """Load `tag` (default: latest) into the engine and restore this rank's RNG; returns the client state.

    `current` ({global_batch, dataset, schedule} of this run) is compared with the checkpoint's before DeepSpeed
    reads anything (`check_resume`); so are the world size and the presence of every rank's files.
    """
    tag, saved = read_run_state(ckpt_dir, tag)
    where = ckpt_dir / tag
    if current is not None:
        check_resume(saved, current, allow_data_change=allow_data_change,
                     allow_schedule_change=allow_schedule_change, where=where)
    if reshard.needed(engine, where, world_size):  # another world size or ep_size: through a universal checkpoint
        return reshard.load(engine, ckpt_dir, tag, rank=rank, world_size=world_size)
    missing = missing_files(where, world_size)
    if missing:
        raise ResumeError(f"checkpoint {where} cannot be loaded: missing {', '.join(missing)}")
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load checkpoint {where}")
    _reload_frozen_experts(engine, ckpt_dir, tag)
    _set_rng_state(torch.load(where / f"rng_rank{rank:05d}.pt", weights_only=False))
    return client
