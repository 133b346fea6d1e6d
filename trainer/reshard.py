"""Resume a run on another world size or ep_size through DeepSpeed's universal checkpoint, native MoE included.

`python -m trainer.reshard --checkpoint RUN[/checkpoints/stepN]` writes RUN/checkpoints/universal/stepN beside the
original (which is only read); `trainer.checkpoint.load` calls `load` on its own when the checkpoint's world size or
ep_size differs from the run's, converting first if needed. Two fixes make DeepSpeed's converter right for
`deepspeed.moe` (measured in ENVIRONMENT.md; DeepSpeed request #5716):

- Each rank's optimizer file names its experts by LOCAL index (rank 1 of ep_size 2 saves experts 2,3 as 0,1), so the
  converter would concatenate different experts as if they were ZeRO shards of one. A staged copy of the optimizer
  files renames them to GLOBAL ids (ep_rank = dp_rank % ep_size) and the model file lists every global expert's shape.
- On load, the ZeRO optimizer looks a parameter up in `zero/` by `optimizer.param_names[p]`, the local name: under
  ep_size > 1 rank 1 would get experts 0,1. The names are set to global ones for the load and put back after (the
  next checkpoint is written the usual way, by local names).

The universal loader restores only what the optimizer holds (the student's fp32 weights and Adam moments, Adam's
step). The frozen teacher (experts included), buffers (centres) and the student's working copy come from the module
file and the per-expert files, read for this run's expert layout by DeepSpeed's own expert loader.

RNG: the per-rank files belong to the old rank layout. A resharded run restores none of them and reseeds every rank
from (seed, step, rank). It changes no loss: data randomness is seeded by stream position (trainer/data.py) and the
model-side RNG serves drop path and MoE noise, which are off in the tiny recipe (drop_path 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("trainer.reshard")

UNIVERSAL = "universal"
MODEL_FILE = "mp_rank_00_model_states.pt"
DONE_FILE = "reshard.json"  # written last: a universal folder without it is incomplete
EXPERT_RE = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
OPTIM_RE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
EXPERT_FILE_RE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
COPIED = ("run_state.json", "config.json")


def universal_dir(ckpt_dir: Path, tag: str) -> Path:
    return Path(ckpt_dir) / UNIVERSAL / tag


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def saved_layout(tag_dir: Path) -> tuple[int | None, int | None]:
    """(world_size, ep_size) the checkpoint was written with, None where it does not say."""
    world = _read_json(tag_dir / "run_state.json").get("world_size")
    ep = _read_json(tag_dir / "config.json").get("model", {}).get("moe", {}).get("ep_size")
    return world, ep


def engine_ep_size(engine) -> int:
    from deepspeed.moe.layer import MoE

    return next((m.ep_size for m in engine.module.modules() if isinstance(m, MoE)), 1)


def needed(engine, tag_dir: Path, world_size: int) -> bool:
    """True when `tag_dir` was written by another world size or ep_size than this run's (the world size first, so a
    mismatch is found before the engine is looked at)."""
    world, ep = saved_layout(tag_dir)
    if world is not None and world != world_size:
        return True
    return ep is not None and ep != engine_ep_size(engine)


# ---- conversion -----------------------------------------------------------------------------------------------------


def _global_name(name: str, ep_rank: int, num_local: int) -> str:
    return EXPERT_RE.sub(lambda m: f"{m[1]}{ep_rank * num_local + int(m[2])}{m[3]}", name, count=1)


def _inventory(tag_dir: Path) -> tuple[dict[int, Path], int]:
    """Optimizer files by rank and experts per MoE layer; names every missing file in one error."""
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {tag_dir} does not exist")
    optim = {int(m[1]): p for p in tag_dir.iterdir() if (m := OPTIM_RE.match(p.name))}
    experts: dict[int, set[int]] = {}
    for p in tag_dir.iterdir():
        if m := EXPERT_FILE_RE.match(p.name):
            experts.setdefault(int(m[1]), set()).add(int(m[2]))
    missing = [] if (tag_dir / MODEL_FILE).exists() else [MODEL_FILE]
    world = _read_json(tag_dir / "run_state.json").get("world_size") or (max(optim) + 1 if optim else 1)
    missing += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world) if r not in optim]
    num_experts = max((len(v) for v in experts.values()), default=0)
    missing += [f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in sorted(experts)
                for e in range(num_experts) if e not in experts[layer]]
    if missing:
        raise FileNotFoundError(f"checkpoint {tag_dir} is incomplete, missing: {', '.join(missing)}")
    if not optim:
        raise FileNotFoundError(f"checkpoint {tag_dir} has no ZeRO optimizer files (zero_pp_rank_*_optim_states.pt):"
                                f" universal checkpoints need train.zero_stage >= 1")
    return optim, num_experts


def _stage(tag_dir: Path, staging: Path, optim: dict[int, Path], num_experts: int) -> set[str]:
    """Copy of the checkpoint for DeepSpeed's converter with experts renamed to global ids; returns the expert names."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, PARAM_SHAPES, PARAM_SLICE_MAPPINGS

    states = {r: torch.load(p, map_location="cpu", weights_only=False) for r, p in sorted(optim.items())}
    local_ids = {int(m[2]) for sd in states.values() for group in sd[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS]
                 for name in group if (m := EXPERT_RE.search(name))}
    num_local = max(local_ids) + 1 if local_ids else max(num_experts, 1)
    ep_size = max(num_experts // num_local, 1)
    _, saved_ep = saved_layout(tag_dir)
    if saved_ep is not None and num_experts and saved_ep != ep_size:
        raise RuntimeError(f"{tag_dir}: config.json says ep_size={saved_ep} but the optimizer files hold "
                           f"{num_local} of {num_experts} experts per rank (ep_size {ep_size})")
    expert_names: set[str] = set()
    for rank, sd in states.items():
        groups = sd[OPTIMIZER_STATE_DICT][PARAM_SLICE_MAPPINGS]
        for i, group in enumerate(groups):
            renamed = type(group)()
            for name, fragment in group.items():
                if EXPERT_RE.search(name):
                    name = _global_name(name, rank % ep_size, num_local)
                    expert_names.add(name)
                renamed[name] = fragment
            groups[i] = renamed
        torch.save(sd, staging / optim[rank].name)
    model = torch.load(tag_dir / MODEL_FILE, map_location="cpu", weights_only=False)
    for group in model[PARAM_SHAPES]:  # rank 0 wrote it: only its own experts, by local id
        for name, shape in list(group.items()):
            if EXPERT_RE.search(name):
                for ep_rank in range(ep_size):
                    group[_global_name(name, ep_rank, num_local)] = shape
    torch.save(model, staging / MODEL_FILE)
    for p in tag_dir.glob("layer_*_expert_*_model_states.pt"):  # the converter only counts them
        (staging / p.name).symlink_to(p.resolve())
    return expert_names


def convert(tag_dir: Path, out_dir: Path | None = None, *, workers: int = 1) -> Path:
    """RUN/checkpoints/stepN -> RUN/checkpoints/universal/stepN (default `out_dir`); `tag_dir` is only read."""
    tag_dir = Path(tag_dir)
    out_dir = Path(out_dir) if out_dir else universal_dir(tag_dir.parent, tag_dir.name)
    optim, num_experts = _inventory(tag_dir)
    from deepspeed.checkpoint import ds_to_universal  # after the checks: importing DeepSpeed takes seconds

    world, ep = saved_layout(tag_dir)
    log.info("reshard: converting %s (%d ranks, ep_size %s, %d experts per MoE layer) -> %s", tag_dir, len(optim),
             ep, num_experts, out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging, tmp = out_dir.parent / f".{out_dir.name}.staging", out_dir.parent / f".{out_dir.name}.tmp"
    for d in (staging, tmp):
        shutil.rmtree(d, ignore_errors=True)
    staging.mkdir()
    try:
        log.info("reshard: [1/3] renaming experts to global ids in %d optimizer files", len(optim))
        expert_names = _stage(tag_dir, staging, optim, num_experts)
        log.info("reshard: [2/3] DeepSpeed ds_to_universal")
        args = argparse.Namespace(input_folder=str(staging), output_folder=str(tmp), num_extract_workers=workers,
                                  num_merge_workers=workers, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        ds_to_universal.main(args)
        log.info("reshard: [3/3] copying module, expert, RNG and run files")
        missing = [n for n in sorted(expert_names) if not (tmp / "zero" / n / "exp_avg.pt").exists()]
        if missing:
            raise RuntimeError(f"universal conversion of {tag_dir} lost the optimizer state of {missing[:3]}")
        shutil.copy2(tag_dir / MODEL_FILE, tmp / MODEL_FILE)  # the original, local-id param_shapes
        for p in sorted(tag_dir.iterdir()):
            if EXPERT_FILE_RE.match(p.name) or p.name.startswith("rng_rank") or p.name in COPIED:
                shutil.copy2(p, tmp / p.name)
        (tmp / DONE_FILE).write_text(json.dumps({"source": str(tag_dir.resolve()), "world_size": world,
                                                 "ep_size": ep, "num_experts": num_experts,
                                                 "stamp": _stamp(tag_dir)}, indent=1))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        (out_dir.parent / "latest_universal").write_text(out_dir.name)  # the converter wrote the tmp name
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("reshard: wrote %s", out_dir)
    return out_dir


def _stamp(tag_dir: Path) -> list:
    """(name, size, mtime) of the files a conversion reads: a rewritten tag is converted again."""
    files = [p for p in sorted(Path(tag_dir).iterdir()) if p.name == MODEL_FILE or OPTIM_RE.match(p.name)]
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def is_complete(out_dir: Path, tag_dir: Path) -> bool:
    """`out_dir` is a finished conversion of `tag_dir` as it is now."""
    done = _read_json(Path(out_dir) / DONE_FILE)
    return bool(done) and done.get("stamp") == _stamp(tag_dir)


# ---- loading --------------------------------------------------------------------------------------------------------


def _global_param_names(engine) -> dict:
    """Expert param -> name with this rank's GLOBAL expert id, as the universal folder names it."""
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups

    out = {}
    for prefix, m in engine.module.named_modules():
        if not isinstance(m, MoE):
            continue
        ep_rank = groups._get_expert_parallel_rank(m.expert_group_name)
        for name, p in m.named_parameters(prefix=prefix):
            if EXPERT_RE.search(name):
                out[p] = _global_name(name, ep_rank, m.num_local_experts)
    return out


def _load_module(engine, ckpt_root: Path, tag: str) -> None:
    """Teacher, buffers and the student's working weights from the module file and this layout's expert files."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    state = torch.load(ckpt_root / tag / MODEL_FILE, map_location="cpu", weights_only=False)["module"]
    if engine.has_moe_layers:
        DeepSpeedEngine.load_moe_state_dict(str(ckpt_root), tag, state_dict=state, old_moe_load=False,
                                            model=engine.module, num_experts=engine.num_experts,
                                            checkpoint_engine=engine.checkpoint_engine)
    engine.module.load_state_dict(state, strict=True)


def reseed(seed: int, step: int, rank: int) -> None:
    """Model-side RNG of a resharded run: a function of (seed, step, rank), distinct per rank."""
    state = np.random.SeedSequence([seed, 3, step, rank]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


def _convert_on_rank0(tag_dir: Path, out_dir: Path, rank: int) -> None:
    """Rank 0 converts (unless done); every rank raises the same one-line error if it failed."""
    import torch.distributed as dist

    error = None
    if rank == 0 and not is_complete(out_dir, tag_dir):
        try:
            convert(tag_dir, out_dir)
        except Exception as e:  # noqa: BLE001 - passed on to the other ranks, then raised
            error = f"{type(e).__name__}: {e}"
    if dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise RuntimeError(error)


def load(engine, ckpt_dir: Path, tag: str, *, rank: int, world_size: int) -> dict:
    """Load RUN/checkpoints/TAG, written with another world size or ep_size, through its universal copy
    (converted by rank 0 first when absent); restores Adam state. Returns the client state."""
    ckpt_dir = Path(ckpt_dir)
    tag_dir, out_dir = ckpt_dir / tag, universal_dir(ckpt_dir, tag)
    world, ep = saved_layout(tag_dir)
    from trainer.checkpoint import ResumeError  # one `error:` line from `python -m trainer.pretrain`

    try:
        _convert_on_rank0(tag_dir, out_dir, rank)
    except Exception as e:
        raise ResumeError(f"checkpoint {tag_dir} was written by {world} ranks and this run has {world_size} (or "
                           f"another ep_size than {ep}): converting it to a universal checkpoint failed: {e}") from e
    opt = engine.optimizer
    if not hasattr(opt, "param_names") or not hasattr(opt, "load_hp_checkpoint_state_from_checkpoint_dir"):
        raise ResumeError(f"resharding {tag_dir} needs a ZeRO (stage 1/2) or bf16 optimizer, this engine has "
                           f"{type(opt).__name__}: set train.zero_stage >= 1")
    local_names = dict(opt.param_names)
    # DeepSpeed copies the saved param groups' keys over the live ones; the MoE group names follow ep_size.
    kept = [{k: g[k] for k in ("name", "moe") if k in g} for g in opt.param_groups]
    opt.param_names.update(_global_param_names(engine))
    engine._config.load_universal_checkpoint = True
    try:
        path, client = engine.load_checkpoint(str(out_dir.parent), tag=tag)
    finally:
        engine._config.load_universal_checkpoint = False
        opt.param_names.clear()
        opt.param_names.update(local_names)
        for g, k in zip(opt.param_groups, kept):
            g.update(k)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load universal checkpoint {out_dir}")
    _load_module(engine, out_dir.parent, tag)
    seed = _read_json(tag_dir / "config.json").get("train", {}).get("seed", 0)
    reseed(seed, int(client.get("step", 0)), rank)
    if rank == 0:
        log.info("reshard: resumed %s (%s ranks, ep_size %s) on %d ranks, ep_size %d from %s", tag_dir, world, ep,
                 world_size, engine_ep_size(engine), out_dir)
    return client


def _resolve(path: Path) -> Path:
    """RUN, RUN/checkpoints or RUN/checkpoints/stepN -> the tag directory."""
    from trainer.checkpoint import latest_tag

    if (path / MODEL_FILE).exists() or any(OPTIM_RE.match(p.name) for p in path.glob("*optim_states.pt")):
        return path
    for ckpt_dir in (path, path / "checkpoints"):
        if ckpt_dir.is_dir() and (tag := latest_tag(ckpt_dir)):
            return ckpt_dir / tag
    raise FileNotFoundError(f"{path} is neither a checkpoint tag nor a run or checkpoints directory with a 'latest' "
                            f"file")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.reshard", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="RUN, RUN/checkpoints or RUN/checkpoints/stepN")
    p.add_argument("--out", type=Path, help="default: RUN/checkpoints/universal/stepN")
    p.add_argument("--workers", type=int, default=1, help="DeepSpeed's extract/merge processes (default 1)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        out = convert(_resolve(args.checkpoint), args.out, workers=args.workers)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
