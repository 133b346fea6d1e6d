"""Read trained weights without a DeepSpeed engine: training checkpoints, exported safetensors, or a random init.

A checkpoint tag directory (RUN/checkpoints/stepNNNNNNNN/) as DeepSpeed 0.19 writes it for native MoE:
`mp_rank_00_model_states.pt` holds, under "module", every tensor of `SSLMetaArch` except the experts (the gates
`...deepspeed_moe.gate.wg.weight` included), and `layer_{L}_expert_{E}_mp_rank_00_model_states.pt` holds one
expert: L counts the `MoE` modules in `named_modules()` order (so also the order of the gate keys), E is the GLOBAL
expert id (ep_rank * local experts + local id), and the keys already carry E. Each rank writes its own experts, so
whatever world size and ep_size wrote it, merging the files gives the state dict of an ep_size=1 `SSLMetaArch`.

    cfg, state = read_checkpoint("runs/demo")                  # full SSLMetaArch state, experts 0..E-1
    model, mcfg, info = load_backbone("runs/demo")             # teacher backbone, eval mode
    model, mcfg, info = load_backbone("model.safetensors")     # an export (see trainer/export.py)
    model, mcfg, info = load_backbone("random", recipe="tiny")  # the untrained baseline
    model = load_pretrained("model.safetensors")               # safetensors only, no pickle
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, RunConfig, from_dict, resolve
from trainer.model.config import ModelConfig

log = logging.getLogger("trainer")

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_INFIX = ".deepspeed_moe.experts.deepspeed_experts."
GATE_SUFFIX = ".deepspeed_moe.gate.wg.weight"
FUSION_PREFIX = "fusion."  # SkySenseV2.fusion, the temporal fusion transformer
EXPORT_FORMAT = "skysense-v2-backbone"
METADATA_KEY = "skysense"  # safetensors metadata entry holding model.json
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")
# Keys of config.json that are facts about the run, not fields of RunConfig.
_RUN_FACTS = ("git_revision", "world_size")
WEIGHTS = ("teacher", "student")


class WeightsError(RuntimeError):
    """A path that is not a checkpoint or export, or one with missing parts; the message says what and where."""


# ---------------------------------------------------------------------------------------------------------------
# configs


def model_config_ep1(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` with moe.ep_size=1: every expert on one rank, the layout exported and loaded for inference."""
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, ep_size=1))


def run_config_from_json(data: dict, where: Path | str = "config.json") -> RunConfig:
    """config.json (RUN/ or TAG/) -> RunConfig, dropping the run facts that are not config fields."""
    try:
        return from_dict(RunConfig, {k: v for k, v in data.items() if k not in _RUN_FACTS})
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{where} does not match this code's RunConfig: {e}") from None


def model_config_from_dict(data: dict, where: Path | str = "model.json") -> ModelConfig:
    """`dataclasses.asdict(ModelConfig)` (model.json "model") -> ModelConfig."""
    try:
        return from_dict(ModelConfig, data)
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{where} does not match this code's ModelConfig: {e}") from None


# ---------------------------------------------------------------------------------------------------------------
# training checkpoints


def find_tag(path: str | Path) -> Path:
    """A run directory (its latest checkpoint), RUN/checkpoints, or a tag directory -> the tag directory."""
    p = Path(path)
    if not p.exists():
        raise WeightsError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise WeightsError(f"{p} is a file, not a checkpoint: pass a run directory or a checkpoint tag directory")
    if (p / MODEL_STATES).exists():
        return p
    for ckpt_dir in (p / "checkpoints", p):
        latest = ckpt_dir / "latest"
        if latest.is_file():
            tag = latest.read_text().strip()
            if not (ckpt_dir / tag / MODEL_STATES).exists():
                present = sorted(q.name for q in ckpt_dir.glob("step*") if q.is_dir())
                raise WeightsError(f"{latest} names checkpoint {tag!r}, but {ckpt_dir / tag / MODEL_STATES} does "
                                   f"not exist (tags present: {', '.join(present) or 'none'})")
            return ckpt_dir / tag
    if (p / "checkpoints").is_dir():
        raise WeightsError(f"{p / 'checkpoints'} has no 'latest' file: pass one of its tag directories")
    raise WeightsError(f"{p} is not a training checkpoint: expected a run directory (with checkpoints/latest) or a "
                       f"tag directory (with {MODEL_STATES})")


def checkpoint_facts(tag: Path) -> dict[str, Any]:
    """run_state.json of a tag (step, recipe, git_revision, world_size), or {} for a checkpoint written without it."""
    f = tag / "run_state.json"
    return json.loads(f.read_text()) if f.exists() else {}


def checkpoint_config(tag: Path) -> tuple[RunConfig, dict]:
    """(RunConfig, the raw JSON) from TAG/config.json, else RUN/config.json (TAG/../../config.json)."""
    for f in (tag / "config.json", tag.parent.parent / "config.json"):
        if f.is_file():
            data = json.loads(f.read_text())
            return run_config_from_json(data, f), data
    raise WeightsError(f"no config.json for checkpoint {tag} (looked in {tag} and {tag.parent.parent})")


def _torch_load(f: Path) -> dict:
    # Our own training checkpoints, written by DeepSpeed in trainer/checkpoint.py: trusted files. weights_only
    # suffices for what DeepSpeed 0.19 writes on our configs; a config that pickles a class needs the full loader.
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(f, map_location="cpu", weights_only=False)


def _moe_layers(module_state: dict[str, torch.Tensor]) -> list[tuple[str, int]]:
    """[(MoE module name, experts)] in DeepSpeed's layer order; the gate keys follow `named_modules()` order."""
    return [(k[: -len(GATE_SUFFIX)], v.shape[0]) for k, v in module_state.items() if k.endswith(GATE_SUFFIX)]


def read_checkpoint(path: str | Path) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """(run config, full `SSLMetaArch` state dict with experts under their global ids 0..E-1, as ep_size=1 names)."""
    tag = find_tag(path)
    cfg, _ = checkpoint_config(tag)
    if list(tag.glob("mp_rank_0[1-9]_model_states.pt")):
        raise WeightsError(f"{tag} has model-parallel shards (mp_rank > 0): not supported")
    dense = _torch_load(tag / MODEL_STATES)
    stage = (dense.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:  # module states hold empty placeholders; the weights live in the ZeRO-3 partitions
        raise WeightsError(f"{tag} is a ZeRO-3 checkpoint: its weights are partitioned, not supported")
    state = dict(dense["module"])
    layers = _moe_layers(state)
    found = {(int(m.group(1)), int(m.group(2))): f for f in tag.iterdir() if (m := _EXPERT_FILE.fullmatch(f.name))}
    wanted = {(layer, e) for layer, (_, n) in enumerate(layers) for e in range(n)}
    missing = sorted(wanted - set(found))
    if missing:
        names = [f"layer_{lay}_expert_{e}_{MODEL_STATES}" for lay, e in missing]
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        raise WeightsError(f"checkpoint {tag} lacks {len(names)} of its {len(wanted)} expert files: "
                           f"{', '.join(names[:8])}{more}")
    extra = sorted(set(found) - wanted)
    if extra:
        raise WeightsError(f"checkpoint {tag} has expert files for no MoE layer of its model: "
                           f"{', '.join(found[k].name for k in extra[:4])}")
    for (layer, e), f in sorted(found.items()):
        prefix = f"{layers[layer][0]}{EXPERT_INFIX}{e}."
        part = _torch_load(f)
        wrong = [k for k in part if not k.startswith(prefix)]
        if wrong:
            raise WeightsError(f"{f} holds {wrong[0]!r}, expected keys under {prefix!r}")
        state.update(part)
    return cfg, state


def backbone_state(state: dict[str, torch.Tensor], weights: str = "teacher") -> dict[str, torch.Tensor]:
    """`teacher.backbone.*` (or `student.backbone.*`) of an `SSLMetaArch` state dict, prefix removed."""
    if weights not in WEIGHTS:
        raise WeightsError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    prefix = f"{weights}.backbone."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise WeightsError(f"the state dict has no {prefix}* tensors")
    return out


# ---------------------------------------------------------------------------------------------------------------
# building and loading


def build_backbone(cfg: ModelConfig, *, seed: int | None = None, device: str | torch.device = "cpu"):
    """SkySenseV2 of `cfg` with ep_size forced to 1; with `seed`, initialised as `SSLMetaArch` builds its student.

    SSLMetaArch's model is built after `torch.manual_seed(seed)` (train.seed_everything) and its experts are then
    re-initialised from (seed, layer, global id), so this is the step-0 student of a run with that seed.
    """
    from trainer.model import build_model
    from trainer.model.moe import init_experts

    cfg = model_config_ep1(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(cfg, device=device)
    if seed is not None:
        init_experts(model, seed, 0)
    return model


OPTIONAL_SUFFIXES = (".deepspeed_moe.route_bias",)


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], *, where: str,
              allow_missing: tuple[str, ...] = ()) -> None:
    """Copy `tensors` into `model`, refusing missing keys (except under `allow_missing` prefixes), extra keys and
    shape changes, with the names in the message."""
    expected = model.state_dict()
    # Weights written before the MoE routing bias existed route without one: its zero default is exact.
    optional = tuple(k for k in expected.keys() - tensors.keys() if k.endswith(OPTIONAL_SUFFIXES))
    missing = sorted(k for k in expected.keys() - tensors.keys() if not k.startswith(allow_missing)
                     and k not in optional)
    unexpected = sorted(tensors.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & tensors.keys() if expected[k].shape != tensors[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors ({', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors ({', '.join(unexpected[:4])})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} shape mismatches ({k}: {tuple(tensors[k].shape)} vs "
                        f"{tuple(expected[k].shape)} in the model)")
    if problems:
        raise WeightsError(f"{where} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(tensors, strict=False)


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """model.json of an exported .safetensors file: `<stem>.json` beside it, else the file's own metadata."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: no such file" if not p.exists() else f"{p} is not a .safetensors file")
    side = p.with_suffix(".json")
    if side.is_file():
        meta = json.loads(side.read_text())
    else:
        try:
            with safe_open(str(p), framework="pt") as f:
                text = (f.metadata() or {}).get(METADATA_KEY)
        except (SafetensorError, OSError) as e:
            raise WeightsError(f"{p} is not a readable safetensors file: {e}") from None
        if text is None:
            raise WeightsError(f"{p} has no {side.name} beside it and no '{METADATA_KEY}' metadata: not an export")
        meta = json.loads(text)
    if meta.get("format") != EXPORT_FORMAT:
        raise WeightsError(f"{side if side.is_file() else p} is not a {EXPORT_FORMAT} export description")
    return meta


def _read_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{p} is not a readable safetensors file: {e}") from None


def _load_export(p: Path, weights: str | None, device) -> tuple[Any, ModelConfig, dict]:
    meta = read_export_meta(p)
    mcfg = model_config_ep1(model_config_from_dict(meta["model"], p.with_suffix(".json")))
    main = meta.get("weights", "teacher")
    weights = weights or main
    if weights == main:
        prefix = ""
    elif weights == "student" and meta.get("includes", {}).get("student"):
        prefix = "student."
    else:
        raise WeightsError(f"{p} holds the {main} backbone"
                           f"{' and the student' if meta.get('includes', {}).get('student') else ''}, "
                           f"not the {weights} one")
    tensors = _read_safetensors(p)
    if prefix:
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    else:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("student.")}
    fusion = bool(meta.get("includes", {}).get("fusion"))
    model = build_backbone(mcfg, device="cpu")
    load_into(model, tensors, where=str(p), allow_missing=() if fusion else (FUSION_PREFIX,))
    if not fusion:
        log.warning("%s: fusion weights were not exported; model.fusion is NOT loaded (random init), use "
                    "forward_features only", p)
    info = {k: meta.get(k) for k in ("source", "step", "recipe", "git_revision")}
    info.update(weights=weights, fusion_loaded=fusion, export=str(p))
    return model.to(device).eval(), mcfg, info


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """An exported backbone (`python -m trainer.export`) as a SkySenseV2 in eval mode; no DeepSpeed engine, no
    process group, no pickle. `path` is the .safetensors file or a directory holding model.safetensors."""
    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors"
    return _load_export(p, None, device)[0]


def load_backbone(spec: str | Path, *, weights: str = "teacher", recipe: str = "tiny", overrides=(), seed: int = 0,
                  device: str | torch.device = "cpu") -> tuple[Any, ModelConfig, dict[str, Any]]:
    """(SkySenseV2 in eval mode on `device`, its ModelConfig with ep_size=1, info about the source).

    spec: "random" (the architecture of `recipe` + `overrides`, seeded like a run's step 0), a run directory, a
    checkpoint tag directory, or an exported .safetensors file. `weights` picks the teacher or the student.
    """
    if str(spec) == "random":
        try:
            cfg = resolve(recipe, list(overrides))
        except ConfigError as e:
            raise WeightsError(f"random backbone: {e}") from None
        mcfg = model_config_ep1(cfg.model)
        model = build_backbone(mcfg, seed=seed, device=device)
        return model.eval(), mcfg, {"source": "random", "recipe": recipe, "seed": seed, "weights": "random",
                                    "fusion_loaded": True}
    if weights not in WEIGHTS:
        raise WeightsError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    p = Path(spec)
    if p.is_file() and p.suffix == ".safetensors":
        return _load_export(p, weights, device)
    tag = find_tag(p)
    cfg, state = read_checkpoint(tag)
    mcfg = model_config_ep1(cfg.model)
    model = build_backbone(mcfg, device="cpu")
    load_into(model, backbone_state(state, weights), where=f"{tag} ({weights}.backbone)")
    facts = checkpoint_facts(tag)
    info = {"source": str(tag), "step": facts.get("step"), "recipe": cfg.recipe,
            "git_revision": facts.get("git_revision"), "weights": weights, "fusion_loaded": True}
    return model.to(device).eval(), mcfg, info
