"""The learning benchmark: does pretraining make features better than random weights? (`bash launch/learning.sh`)

1. converts a folder of unlabelled aerial images (default ../shared/data/aid-unlabeled) into a dataprep dataset
   (HR only, centre-cropped to 128 px; cached, dataprep skips complete shards on a re-run);
2. pretrains the `learn` recipe (the tiny model, ~13 minutes on 2 CPU cores) for a FIXED number of steps on
   2 local ranks: a step budget, not a wall-clock one, so a loaded machine runs slower but measures the same thing;
3. k-NN top-1 (DINO's weighted k-NN, k=20, stratified 50/50 split, fixed seed) of the teacher and student on the
   labelled folders (aid-dev: 30 aerial classes; eurosat100: 10 Sentinel-2 classes), beside the same architecture
   at random init (3 seeds: mean and spread) and a colour-histogram baseline.

Prints one table and writes RUN/learning.json. A benchmark, not a test: it prints measured figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, cwd=REPO, **kw)


def prepare(folder: Path, out: Path, hr_size: int) -> Path:
    """Unlabelled images -> an HR-only dataprep dataset at `out` (no-op when already complete)."""
    if (out / "index.parquet").exists():
        return out
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SystemExit(f"error: no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    out.mkdir(parents=True, exist_ok=True)
    manifest = out.parent / f"{out.name}-manifest.jsonl"
    with open(manifest, "w") as f:  # no geolocation in these scenes: lon/lat 0 (no GCPL region term uses it yet)
        for p in images:
            f.write(json.dumps({"id": p.stem, "lon": 0.0, "lat": 0.0, "hr": str(p.resolve())}) + "\n")
    # S2 size 8 only fixes the ground grid (HR:S2 = 16:1); these sets have no S2 or S1.
    run([sys.executable, "-m", "dataprep", "convert", "--manifest", str(manifest), "--out", str(out),
         "--hr-size", str(hr_size), "--s2-size", "8", "--crop", "--workers", "2", "--shard-size", "256",
         "--no-progress"])
    return out


def evaluate(checkpoint: str, data: Path, stats: Path | None, out: Path, *, size: int, seed: int = 0,
             features: str = "last", extra: tuple[str, ...] = ()) -> dict:
    """One `python -m trainer.evaluate knn` run on a labelled folder split 50/50; returns its JSON."""
    cmd = [sys.executable, "-m", "trainer.evaluate", "knn", "--checkpoint", checkpoint, "--data", str(data),
           "--split", "0.5", "--size", str(size), "--seed", str(seed), "--features", features, "--json", str(out),
           *extra]
    if stats is not None:
        cmd += ["--data-stats", str(stats)]
    run(cmd, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def top1(result: dict) -> float:
    return float(result["metrics"]["top1"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.learning_bench", description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(SHARED / "aid-unlabeled"), help="unlabelled pretraining images")
    p.add_argument("--eval", action="append", default=None, metavar="DIR",
                   help="labelled folder(s) for k-NN (default: aid-dev and eurosat100/tif)")
    p.add_argument("--work", default="runs/learning", help="dataset, run and results go here")
    p.add_argument("--recipe", default="learn")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's max_steps)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, default=3, help="random-init seeds (0: skip the baselines)")
    p.add_argument("--size", type=int, default=64, help="evaluation image size (default: the global view size)")
    p.add_argument("--skip-train", action="store_true", help="evaluate an existing WORK/run")
    args = p.parse_args(argv)

    work = (REPO / args.work).resolve() if not os.path.isabs(args.work) else Path(args.work)
    images = Path(args.images)
    evals = [Path(e) for e in (args.eval or [SHARED / "aid-dev", SHARED / "eurosat100" / "tif"])]
    for d in [images, *evals]:
        if not d.is_dir():
            print(f"error: {d} is not a directory (the real data lives in ../shared/data on the dev machines; "
                  f"name your own folders with --images / --eval)", file=sys.stderr)
            return 2
    data = prepare(images, work / "data", hr_size=128)
    run_dir = work / "run"
    train_s = 0.0
    if not args.skip_train:
        cmd = ["bash", "launch/pretrain.sh", "--num-ranks", str(args.ranks), "--recipe", args.recipe,
               "--data", str(data), "--run-dir", str(run_dir), "--no-resume", "--set", "metrics.port=0"]
        if args.steps:
            cmd += ["--set", f"train.max_steps={args.steps}"]  # the schedule length, not just a stop
        for o in args.overrides:
            cmd += ["--set", o]
        start = time.time()
        run(cmd, env={**os.environ, "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
        train_s = time.time() - start
    cfg = json.loads((run_dir / "config.json").read_text())
    results: dict = {"train_seconds": train_s, "recipe": args.recipe, "overrides": args.overrides,
                     "steps": sum(1 for _ in open(run_dir / "metrics.jsonl")) if (run_dir / "metrics.jsonl").exists()
                     else None, "eval": {}}
    out = work / "eval"
    out.mkdir(exist_ok=True)
    for d in evals:
        name = d.name if d.name != "tif" else d.parent.name
        row: dict = {}
        row["pretrained"] = top1(evaluate(str(run_dir), d, data, out / f"{name}-pretrained.json",
                                             size=args.size))
        row["pretrained_all_stages"] = top1(evaluate(str(run_dir), d, data, out / f"{name}-pretrained-all.json",
                                                     size=args.size, features="all-stages"))
        # The student too: with momentum 0.994 -> 1 over a few hundred steps the teacher still holds ~1/4 init.
        row["student"] = top1(evaluate(str(run_dir), d, data, out / f"{name}-student.json", size=args.size,
                                       extra=("--weights", "student")))
        rand = []
        for seed in range(args.seeds):
            rand.append(top1(evaluate("random", d, data, out / f"{name}-random{seed}.json", seed=seed, size=args.size,
                                      extra=("--recipe", cfg["recipe"], *_arch_overrides(cfg)))))
        row["random"] = rand
        row["random_mean"] = statistics.mean(rand) if rand else float("nan")  # --seeds 0: a quick variant run
        row["random_spread"] = (max(rand) - min(rand)) / 2 if rand else float("nan")
        row["histogram"] = top1(evaluate("random", d, None, out / f"{name}-hist.json", size=args.size,
                                       features="histogram"))
        results["eval"][name] = row
    (work / "learning.json").write_text(json.dumps(results, indent=2))
    print(f"\nlearning benchmark: recipe {args.recipe} {' '.join(args.overrides)}; {results['steps']} steps in "
          f"{train_s / 60:.1f} min on {args.ranks} ranks")
    print(f"{'k-NN top-1 (%)':<16}{'teacher':>10}{'all stages':>12}{'student':>9}{'random init':>18}"
          f"{'histogram':>11}{'gain':>8}")
    for name, r in results["eval"].items():
        print(f"{name:<16}{r['pretrained']:>10.1f}{r['pretrained_all_stages']:>12.1f}{r['student']:>9.1f}"
              f"{r['random_mean']:>11.1f} +- {r['random_spread']:<4.1f}{r['histogram']:>11.1f}"
              f"{r['pretrained'] - r['random_mean']:>+8.1f}")
    print(f"results: {work / 'learning.json'}")
    return 0


def _arch_overrides(cfg: dict) -> list[str]:
    """--set flags that rebuild the run's architecture for the random-init baselines."""
    m = cfg["model"]
    flags = [f"model.embed_dim={m['embed_dim']}", f"model.depths={','.join(map(str, m['depths']))}",
             f"model.head_dim={m['head_dim']}", f"model.window={m['window']}", f"model.mlp_ratio={m['mlp_ratio']}",
             f"model.moe.enabled={m['moe']['enabled']}", f"model.moe.num_experts={m['moe']['num_experts']}",
             f"model.moe.num_layers={m['moe']['num_layers']}"]
    return [x for f in flags for x in ("--set", f)]


if __name__ == "__main__":
    sys.exit(main())
