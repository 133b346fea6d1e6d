"""`python -m trainer.summary RUN_DIR`: what a run did, from its config.json, metrics.jsonl and checkpoints."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def summarise(run_dir: Path) -> dict:
    """Steps, throughput, first/last loss and where things are. Raises FileNotFoundError on a run without logs."""
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not records:
        raise FileNotFoundError(f"{metrics} is empty: the run logged no step")
    config = json.loads((run_dir / "config.json").read_text())
    world = int(config.get("world_size", 1))
    steady = records[1:] or records  # the first step includes FLOP counting and warm-up
    latest = (run_dir / "checkpoints" / "latest")
    return {
        "run_dir": str(run_dir),
        "recipe": config.get("recipe"),
        "ranks": world,
        "steps": records[-1]["step"],
        "samples_per_s": world * statistics.median(r["samples_per_s"] for r in steady),
        "tokens_per_s": world * statistics.median(r["tokens_per_s"] for r in steady),
        "step_s": statistics.median(r["step_s"] for r in steady),
        "first_loss": records[0]["loss/total"],
        "last_loss": records[-1]["loss/total"],
        "checkpoint": str(run_dir / "checkpoints" / latest.read_text().strip()) if latest.exists() else None,
        "config": str(run_dir / "config.json"),
        "metrics_log": str(metrics),
        "report": (str(run_dir / "report") + "/" if any((run_dir / "report").glob("*.png")) else None),
        "metrics_endpoint": (f"http://localhost:{config['metrics']['port']}/metrics (+ local rank, while running)"
                             if config.get("metrics", {}).get("port") else None),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.summary", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("run_dir", type=Path)
    p.add_argument("--wall-seconds", type=float, help="total wall time to report (from the caller)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        s = summarise(args.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.wall_seconds is not None:
        s["wall_seconds"] = args.wall_seconds
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"run            {s['run_dir']}  (recipe {s['recipe']}, {s['ranks']} ranks)")
    print(f"steps          {s['steps']}  (median step {s['step_s']:.2f} s)")
    print(f"throughput     {s['samples_per_s']:.1f} samples/s, {s['tokens_per_s']:.0f} tokens/s (all ranks)")
    print(f"loss           first {s['first_loss']:.4f} -> last {s['last_loss']:.4f}")
    print(f"checkpoint     {s['checkpoint']}")
    print(f"config         {s['config']}")
    print(f"metrics log    {s['metrics_log']}")
    if s["report"]:
        print(f"plots          {s['report']}  (python -m trainer.report {s['run_dir']})")
    if s["metrics_endpoint"]:
        print(f"prometheus     {s['metrics_endpoint']}")
    if "wall_seconds" in s:
        print(f"wall time      {s['wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
