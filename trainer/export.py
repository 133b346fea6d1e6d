"""`python -m trainer.export --checkpoint CKPT --out model.safetensors`: the pretrained backbone for downstream use.

Writes the teacher (or `--weights student`) `SkySenseV2` state dict, prefix-free and with every expert gathered
(an ep_size=1 model, whatever ep_size trained it), through `safetensors.torch.save_file`, and `model.json` beside
it (`<out stem>.json`; also stored in the file's metadata under "skysense"): the ModelConfig, the source
checkpoint, step, recipe, git revision and the parts included. `trainer.load_pretrained(out)` reads it back.

    --include fusion     also the temporal fusion weights (`fusion.*`; left out by default)
    --include student    also the student backbone under a `student.` prefix
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch

from trainer.weights import (
    EXPORT_FORMAT,
    FUSION_PREFIX,
    METADATA_KEY,
    WEIGHTS,
    WeightsError,
    backbone_state,
    checkpoint_facts,
    find_tag,
    model_config_ep1,
    read_checkpoint,
)

PARTS = ("fusion", "student")


def export_tensors(state: dict[str, torch.Tensor], *, weights: str = "teacher",
                   include: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """SSLMetaArch state -> the tensors of the export: `weights`' backbone prefix-free, optional parts added."""
    unknown = set(include) - set(PARTS)
    if unknown:
        raise WeightsError(f"--include takes {', '.join(PARTS)}; got {', '.join(sorted(unknown))}")
    if "student" in include and weights == "student":
        raise WeightsError("--include student with --weights student would store the student twice")

    def pick(which: str) -> dict[str, torch.Tensor]:
        part = backbone_state(state, which)
        if "fusion" not in include:
            part = {k: v for k, v in part.items() if not k.startswith(FUSION_PREFIX)}
        # save_file refuses tensors sharing storage and non-contiguous ones; the copy also drops DeepSpeed's views.
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in part.items()}

    out = pick(weights)
    if "student" in include:
        out.update({f"student.{k}": v for k, v in pick("student").items()})
    return out


def export(checkpoint: str | Path, out: str | Path, *, weights: str = "teacher",
           include: tuple[str, ...] = ()) -> dict[str, Any]:
    """Write `out` (.safetensors) and `<out stem>.json` from a run or tag directory; returns model.json's dict."""
    from safetensors.torch import save_file

    if weights not in WEIGHTS:
        raise WeightsError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise WeightsError(f"--out {out}: the file name must end in .safetensors")
    if out.is_dir():
        raise WeightsError(f"--out {out} is a directory")
    tag = find_tag(checkpoint)
    cfg, state = read_checkpoint(tag)
    tensors = export_tensors(state, weights=weights, include=tuple(include))
    facts = checkpoint_facts(tag)
    mcfg = model_config_ep1(cfg.model)
    # Parameters only: the MoE routing-bias buffers travel in the file but are routing state, not weights.
    main = [v for k, v in tensors.items() if not k.startswith("student.") and not k.endswith(".route_bias")]
    meta = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "model": dataclasses.asdict(mcfg),
        "weights": weights,
        "includes": {"backbone": True, "fusion": "fusion" in include, "student": "student" in include},
        "source": str(tag.resolve()),
        "step": facts.get("step"),
        "recipe": facts.get("recipe", cfg.recipe),
        "git_revision": facts.get("git_revision", "unknown"),
        "num_parameters": sum(v.numel() for v in main),
        "num_experts": mcfg.moe.num_experts if mcfg.moe.enabled else 0,
        "file": out.name,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta, indent=1)
    save_file(tensors, str(out), metadata={METADATA_KEY: json.dumps(meta)})
    out.with_suffix(".json").write_text(text + "\n")
    return meta


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or a tag directory")
    p.add_argument("--out", required=True, help="the .safetensors file to write (model.json goes beside it)")
    p.add_argument("--include", default="", help="comma-separated extra parts: fusion, student")
    p.add_argument("--weights", default="teacher", choices=WEIGHTS, help="which backbone (default: teacher)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    include = tuple(s.strip() for s in args.include.split(",") if s.strip())
    try:
        meta = export(args.checkpoint, args.out, weights=args.weights, include=include)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    parts = [k for k, v in meta["includes"].items() if v]
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {meta['weights']} backbone, "
          f"{meta['num_parameters']:,} parameters, {meta['num_experts']} experts per MoE layer, step {meta['step']}, "
          f"parts {'+'.join(parts)}; and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
