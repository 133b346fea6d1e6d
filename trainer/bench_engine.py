"""Engine benchmark on CPU: weak-scaling efficiency of 1 -> 2 ranks, checkpoint save and resume time per step.

`python -m trainer.bench_engine [--steps 12] [--micro-batch 4] [--data DIR] [--json FILE]`

Weak scaling keeps the work per rank fixed: one rank at global batch M on one core, then two ranks at global batch
2M on two cores (`launch/pretrain.sh`, which binds each rank to its own core with `--bind_cores_to_rank`; the
one-rank run is pinned to core 0 with `taskset`, so each rank has one core in both runs). Efficiency = (samples/s
of 2 ranks) / (2 x samples/s of 1 rank), from the median step time after the first steps (start-up, first-step
FLOP counting). Each run saves a checkpoint in the middle; a third job resumes the 2-rank run from its last
checkpoint and takes two more steps. Figures are ratios measured in one invocation: the save time and the resume
(load) time each over the median step time of the same 2-rank run. Absolute times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _dataset(root: Path, sets: int) -> Path:
    py = sys.executable
    raw, data = root / "raw", root / "data"
    subprocess.run([py, "-m", "dataprep", "sample", "--out", str(raw), "--sets", str(sets), "--seed", "0"],
                   cwd=REPO, check=True, capture_output=True)  # fmt: skip
    r = subprocess.run([py, "-m", "dataprep", "convert", "--manifest", str(raw / "manifest.jsonl"), "--out",
                        str(data), "--shard-size", "16", "--no-progress"], cwd=REPO, capture_output=True, text=True)
    if r.returncode not in (0, 1):  # 1: some sample rows are rejected on purpose
        raise SystemExit(f"bench_engine: dataprep convert failed:\n{r.stderr[-2000:]}")
    return data


def _train(data: Path, run: Path, ranks: int, global_batch: int, micro: int, stop: int, schedule: int,
           ckpt_every: int, resume: bool = False) -> None:  # fmt: skip
    cmd = ["bash", "launch/pretrain.sh", "--num-ranks", str(ranks), "--recipe", "tiny", "--data", str(data),
           "--run-dir", str(run), "--max-steps", str(stop), "--set", f"train.max_steps={schedule}",
           "--set", f"train.global_batch={global_batch}", "--set", f"train.micro_batch={micro}",
           "--set", f"train.ckpt_every={ckpt_every}", "--set", "metrics.port=0", "--set", "train.log_every=1"]
    if not resume:
        cmd.append("--no-resume")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    if ranks == 1:  # one core, like each rank of the 2-rank run
        cmd = ["taskset", "-c", "0", *cmd] if shutil.which("taskset") else cmd
        env["BIND_CORES"] = "0"
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench_engine: {ranks}-rank run failed (exit {r.returncode}):\n{r.stdout[-3000:]}")


def _median_step(recs: list[dict], skip: int) -> float:
    xs = [r["step_s"] for r in recs if r["step"] > skip and "checkpoint_s" not in r]
    return statistics.median(xs)


def run(steps: int, micro: int, data: Path | None, work: Path) -> dict:
    data = data or _dataset(work, sets=max(32, 2 * micro * 4))
    skip = 2
    mid = steps // 2
    out: dict = {"steps": steps, "micro_batch": micro, "skip_first": skip, "cores": os.cpu_count()}
    for ranks in (1, 2):
        run_dir = work / f"r{ranks}"
        _train(data, run_dir, ranks, micro * ranks, micro, steps, steps + 4, mid)
        recs = _records(run_dir)
        step_s = _median_step(recs, skip)
        out[f"rank{ranks}"] = {"median_step_s": step_s, "samples_per_s": micro * ranks / step_s,
                               "checkpoint_s": [r["checkpoint_s"] for r in recs if "checkpoint_s" in r]}
    out["weak_scaling_efficiency"] = out["rank2"]["samples_per_s"] / (2 * out["rank1"]["samples_per_s"])
    r2 = work / "r2"
    before = len(_records(r2))
    _train(data, r2, 2, micro * 2, micro, steps + 2, steps + 4, mid, resume=True)
    resumed = _records(r2)[before:]
    out["rank2"]["resume_s"] = next(r["resume_s"] for r in resumed if "resume_s" in r)
    step2 = out["rank2"]["median_step_s"]
    out["checkpoint_over_step"] = max(out["rank2"]["checkpoint_s"]) / step2
    out["resume_over_step"] = out["rank2"]["resume_s"] / step2
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="steps per run (the first 2 are not timed)")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per rank per step")
    p.add_argument("--data", type=Path, default=None, help="a dataprep dataset (default: 32 synthetic sets)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.steps < 6:
        p.error("--steps must be >= 6 (2 untimed, a checkpoint in the middle, timed steps on both sides)")
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        res = run(args.steps, args.micro_batch, args.data, Path(tmp))
    r1, r2 = res["rank1"], res["rank2"]
    print(f"tiny, micro-batch {args.micro_batch} per rank, {args.steps} steps, median step after step 2:")
    print(f"  1 rank  (1 core):  {r1['median_step_s']:.3f} s/step  {r1['samples_per_s']:.2f} samples/s")
    print(f"  2 ranks (2 cores): {r2['median_step_s']:.3f} s/step  {r2['samples_per_s']:.2f} samples/s")
    print(f"  weak-scaling efficiency 1 -> 2 ranks: {res['weak_scaling_efficiency']:.2f} (goal >= 0.8)")
    print(f"  checkpoint save {max(r2['checkpoint_s']):.3f} s = {res['checkpoint_over_step']:.2f} steps; "
          f"resume (load) {r2['resume_s']:.3f} s = {res['resume_over_step']:.2f} steps (2 ranks)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
