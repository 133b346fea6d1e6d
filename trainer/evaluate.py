"""Frozen-feature evaluation: `python -m trainer.evaluate knn|linear` on labelled imagery.

    python -m trainer.evaluate knn --checkpoint runs/demo --train DIR --val DIR
    python -m trainer.evaluate knn --checkpoint random --seed 1 --data aid-dev --split 0.5 --json out.json
    python -m trainer.evaluate linear --features histogram --data eurosat100/tif --split 0.5

Images are resized (or centre-cropped) to --size, normalised per band (the pretraining dataset's statistics with
--data-stats, else the train split's), encoded by the frozen backbone (pooled last stage, or every stage's mean
pool), and probed by a DINO k-NN or a logistic-regression probe. Bad input exits with code 2 and one line.
In-training evaluation uses `extract_features`, `normalise` and `trainer.probes` directly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trainer import probes
from trainer.labelled import LabelledDataError, LabelledImages, load_folder

FEATURES = ("last", "all-stages", "histogram")


class EvalError(ValueError):
    """An evaluation that cannot run as asked (size, classes, statistics); the message says why."""


# ---------------------------------------------------------------------------------------------------------------
# features


def _module_modes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    return [(m, m.training) for m in module.modules()]


def extract_features(backbone: torch.nn.Module, images: np.ndarray | torch.Tensor, modality: str, *,
                     features: str = "last", batch_size: int = 64, device: str | torch.device | None = None,
                     progress: bool = False) -> np.ndarray:
    """Frozen features of normalised images (N, C, H, W) -> (N, D) float32.

    "last": the pooled last stage (D = out_dim); "all-stages": the concatenated mean pools of every stage
    (D = sum of stage widths). Runs in eval mode under no_grad on `device` (None: where the backbone's parameters
    are); each submodule's train/eval mode and the global torch RNG state are restored afterwards, so calling it
    inside a training loop changes nothing there.
    """
    if features not in ("last", "all-stages"):
        raise ValueError(f"features must be 'last' or 'all-stages', got {features!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    param = next(backbone.parameters())
    dev = torch.device(device) if device is not None else param.device
    x_all = torch.as_tensor(images)
    out: list[np.ndarray] = []
    modes = _module_modes(backbone)
    cuda_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(x_all), desc=f"features ({modality})", unit="img", file=sys.stderr)
    try:
        backbone.eval()
        with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
            for s in range(0, len(x_all), batch_size):
                x = x_all[s : s + batch_size].to(dev, dtype=param.dtype, non_blocking=True)
                o = backbone.forward_features(x, modality)
                f = o["pooled"] if features == "last" else torch.cat([t.mean(dim=(1, 2)) for t in o["stages"]], 1)
                out.append(f.float().cpu().numpy())
                if bar is not None:
                    bar.update(len(x))
    finally:
        for m, mode in modes:
            m.training = mode
        if bar is not None:
            bar.close()
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(out).astype(np.float32, copy=False)


def band_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and std (C,) float64 over every pixel of images (N, C, H, W); a zero std becomes 1."""
    x = np.moveaxis(np.asarray(images), 1, 0).reshape(images.shape[1], -1).astype(np.float64)
    mean, std = x.mean(axis=1), x.std(axis=1)
    return mean, np.where(std > 0, std, 1.0)


def dataset_stats(path: str | Path, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) (C,) of `modality` from a dataprep dataset's dataset.json ("stats": {m: {mean, std}})."""
    p = Path(path)
    f = p / "dataset.json" if p.is_dir() else p
    if not f.is_file():
        raise EvalError(f"--data-stats {path}: no dataset.json there")
    try:
        stats = json.loads(f.read_text())["stats"][modality]
        mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise EvalError(f"--data-stats {f}: no usable stats for modality {modality!r} ({e})") from None
    return mean, np.where(std > 0, std, 1.0)


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per band, as in training. images: (N, C, H, W); mean, std: (C,) -> float32."""
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise EvalError(f"normalisation statistics have {len(mean)} bands, the images {images.shape[1]}")
    m = np.asarray(mean, np.float32)[None, :, None, None]
    s = np.asarray(std, np.float32)[None, :, None, None]
    return (images - m) / s


def required_multiple(model_cfg, modality: str) -> int:
    """The side length an image of `modality` must be a multiple of: the patch size times 2 per halving APM."""
    halvings = len(model_cfg.depths) - 1 if model_cfg.apm_reduce[modality] else 0
    return model_cfg.patch_size * 2**halvings


def check_size(model_cfg, modality: str, size: int) -> None:
    """Raise EvalError when --size does not tile the backbone's grid for `modality` (HR: patch 4, 3 halvings)."""
    mult = required_multiple(model_cfg, modality)
    if size % mult:
        lo, hi = max(mult, size // mult * mult), (size // mult + 1) * mult
        halv = len(model_cfg.depths) - 1 if model_cfg.apm_reduce[modality] else 0
        raise EvalError(f"--size {size} does not suit modality {modality}: the backbone needs a multiple of {mult} "
                        f"(patch {model_cfg.patch_size}, {halv} halvings); try --size {lo} or {hi}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------------------------
# data


def _align(train: LabelledImages, val: LabelledImages) -> tuple[LabelledImages, LabelledImages, list[str]]:
    """Relabel both sets over the union of their class names (train's order first); returns the val-only names."""
    if train.modality != val.modality:
        raise EvalError(f"train images are {train.modality}, val images {val.modality}")
    if train.multilabel != val.multilabel:
        raise EvalError("one of --train / --val is multi-label, the other is not")
    val_only = [c for c in val.classes if c not in train.classes]
    classes = list(train.classes) + val_only
    for d in (train, val):
        idx = np.asarray([classes.index(c) for c in d.classes], dtype=np.int64)
        if d.multilabel:
            hot = np.zeros((len(d), len(classes)), np.uint8)
            hot[:, idx] = d.labels
            d.labels = hot
        else:
            d.labels = idx[d.labels]
        d.classes = classes
    return train, val, val_only


def _present(d: LabelledImages) -> int:
    return int((d.labels.sum(0) > 0).sum()) if d.multilabel else len(np.unique(d.labels))


def load_splits(args: argparse.Namespace) -> tuple[LabelledImages, LabelledImages, dict]:
    """(train, val, facts) from --train/--val or --data/--split."""
    kw = {"modality": args.modality, "size": args.size, "resize_mode": args.resize_mode, "bands": args.bands}
    facts: dict = {}
    if args.data:
        data = load_folder(args.data, **kw)
        tr, va = probes.stratified_split(data.labels, args.split, seed=args.split_seed)
        if len(va) == 0 or len(tr) == 0:
            raise EvalError(f"{args.data}: {len(data)} image(s) cannot be split into train and val (--split "
                            f"{args.split}); every class needs two or more images")
        train, val = data.subset(tr), data.subset(va)
        val.skipped = []
        facts = {"data": str(args.data), "split": args.split, "split_seed": args.split_seed}
    else:
        train, val = load_folder(args.train, **kw), load_folder(args.val, **kw)
        train, val, val_only = _align(train, val)
        facts = {"train": str(args.train), "val": str(args.val), "val_only_classes": val_only}
    if _present(train) < 2:
        raise EvalError(f"{args.data or args.train}: only one class ({train.classes[0]!r}) in the train split; "
                        "a probe needs two or more")
    return train, val, facts


# ---------------------------------------------------------------------------------------------------------------
# the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("knn", "linear"), help="weighted k-NN (DINO) or logistic-regression probe")
    p.add_argument("--checkpoint", help="run dir, checkpoint tag dir, exported .safetensors, or 'random'")
    p.add_argument("--weights", default="teacher", choices=("teacher", "student"))
    p.add_argument("--recipe", default="tiny", help="architecture for --checkpoint random (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted recipe override for --checkpoint random, repeatable")
    p.add_argument("--seed", type=int, default=0, help="init seed for --checkpoint random")
    p.add_argument("--train", help="labelled train folder (with --val)")
    p.add_argument("--val", help="labelled val folder (with --train)")
    p.add_argument("--data", help="one labelled folder, split by --split")
    p.add_argument("--split", type=float, default=0.5, help="fraction of each class held out as val (--data)")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the stratified splits (--split and the linear probe's C-selection hold-out)")
    p.add_argument("--modality", choices=("hr", "s2", "s1"), help="default: from the band count")
    p.add_argument("--bands", help="S2 source band order: a layout name (l1c13, l2a12, eurosat13, skysense10) or "
                   "comma-separated names; default: guessed from the band count")
    p.add_argument("--features", default="last", choices=FEATURES,
                   help="pooled last stage, concatenated stage pools, or a colour-histogram baseline")
    p.add_argument("--bins", type=int, default=16, help="histogram bins per band (--features histogram)")
    p.add_argument("--size", type=int, default=128, help="side length fed to the model (default 128)")
    p.add_argument("--resize-mode", default="resize", choices=("resize", "crop"))
    p.add_argument("--data-stats", help="dataprep dataset dir whose dataset.json stats normalise the images "
                   "(default: per-band mean/std of the train split)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.data and (args.train or args.val):
        p.error("give either --data (with --split) or --train and --val, not both")
    if not args.data and not (args.train and args.val):
        p.error("give --train DIR --val DIR, or --data DIR --split FRACTION")
    if args.features != "histogram" and not args.checkpoint:
        p.error("--checkpoint is required (a checkpoint, an export, or 'random'), unless --features histogram")
    for name in ("k", "batch_size", "bins", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.temperature <= 0:
        p.error("--temperature must be positive")
    if not 0 < args.split < 1:
        p.error("--split must lie strictly between 0 and 1")
    return args


def _features(args, train: LabelledImages, val: LabelledImages, out: dict) -> tuple[np.ndarray, np.ndarray]:
    if args.features == "histogram":
        lo, hi = probes.histogram_ranges(train.images, train.modality)
        out["histogram"] = {"bins": args.bins, "lo": lo.tolist(), "hi": hi.tolist()}
        t0 = time.perf_counter()
        f = [probes.histogram_features(d.images, lo, hi, bins=args.bins) for d in (train, val)]
        out["seconds"]["features"] = time.perf_counter() - t0
        return f[0], f[1]
    from trainer.weights import WeightsError, load_backbone

    device = resolve_device(args.device)
    try:
        model, mcfg, info = load_backbone(args.checkpoint, weights=args.weights, recipe=args.recipe,
                                          overrides=tuple(args.overrides), seed=args.seed, device=str(device))
    except (WeightsError, FileNotFoundError) as e:
        raise EvalError(f"--checkpoint {args.checkpoint}: {e}") from None
    check_size(mcfg, train.modality, args.size)
    out["backbone"] = {k: v for k, v in info.items() if isinstance(v, str | int | float | bool | type(None))}
    out["device"] = str(device)
    if args.data_stats:
        mean, std = dataset_stats(args.data_stats, train.modality)
        out["normalisation"] = str(args.data_stats)
    else:
        mean, std = band_stats(train.images)
        out["normalisation"] = "train split"
    t0 = time.perf_counter()
    f = [extract_features(model, normalise(d.images, mean, std), train.modality, features=args.features,
                          batch_size=args.batch_size, device=device, progress=not args.no_progress)
         for d in (train, val)]
    dt = time.perf_counter() - t0
    out["seconds"]["features"] = dt
    out["images_per_second"] = (len(train) + len(val)) / max(dt, 1e-9)
    return f[0], f[1]


def evaluate(args: argparse.Namespace) -> dict:
    """Run one evaluation as parsed by `parse_args`; returns the results dict written by --json."""
    t_start = time.perf_counter()
    train, val, facts = load_splits(args)
    t_load = time.perf_counter() - t_start
    out: dict = {"probe": args.probe, "checkpoint": args.checkpoint if args.features != "histogram" else None,
                 "weights": args.weights, "features": args.features, "modality": train.modality,
                 "bands": list(train.bands), "source_bands": list(train.source_bands), "size": args.size,
                 "resize_mode": args.resize_mode, **facts,
                 "n_train": len(train), "n_val": len(val), "num_classes": len(train.classes),
                 "classes": train.classes, "multilabel": train.multilabel, "seconds": {"load": t_load}}
    tx, vx = _features(args, train, val, out)
    out["feature_dim"] = int(tx.shape[1])
    t0 = time.perf_counter()
    if args.probe == "knn":
        metrics = probes.knn(tx, train.labels, vx, val.labels, k=args.k, temperature=args.temperature,
                             num_classes=len(train.classes))
        out.update(k=args.k, temperature=args.temperature)
    else:
        metrics = probes.linear_probe(tx, train.labels, vx, val.labels, num_classes=len(train.classes),
                                      seed=args.split_seed)
    out["seconds"]["probe"] = time.perf_counter() - t0
    out["metrics"] = metrics
    skipped = train.skipped + [s for s in val.skipped if s not in train.skipped]
    out["skipped"] = skipped
    out["n_skipped"] = len(skipped)
    return out


def format_table(r: dict) -> str:
    """The printed summary: one row per fact, metric values last."""
    what = "histogram" if r["features"] == "histogram" else f"{r['checkpoint']} ({r['weights']}, {r['features']})"
    rows = [("probe", r["probe"] + (f" (k={r['k']}, T={r['temperature']})" if r["probe"] == "knn" else "")),
            ("features", what), ("modality", f"{r['modality']} {r['size']}px {r['resize_mode']}"),
            ("train / val", f"{r['n_train']} / {r['n_val']} images, {r['num_classes']} classes"
                            + (" (multi-label)" if r["multilabel"] else "")),
            ("skipped", str(r["n_skipped"]))]
    if "images_per_second" in r:
        rows.append(("extraction", f"{r['seconds']['features']:.1f} s ({r['images_per_second']:.0f} img/s)"))
    for name, v in r["metrics"].items():
        if isinstance(v, float):
            rows.append((name, f"{v:g}" if name == "C" else f"{v:.2f} %"))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{w}}  {b}" for a, b in rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.config import ConfigError

    try:
        results = evaluate(args)
    except (EvalError, LabelledDataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in results["skipped"]:
        print(f"skipped: {s['reason']}", file=sys.stderr)
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
