"""`python -m trainer.report RUN_DIR [--out DIR]`: PNG plots of a run and a one-screen text summary.

Reads RUN_DIR/metrics.jsonl (rank 0's log, see trainer/metrics.py) and config.json; writes into RUN_DIR/report/ by
default: losses.png (per term), throughput.png, mfu.png, step_time.png, expert_load.png (heat map over steps, per
network), health.png (learning-health gauges), knn.png (in-training k-NN, when the run had it), summary.txt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from trainer.summary import summarise  # noqa: E402

HEALTH = ("teacher_entropy", "feature_std", "feature_cosine", "moe_max_over_mean", "moe_kept_max_over_mean",
          "teacher_distinct_argmax")


def load(run_dir: Path) -> list[dict]:
    """The last record per step (a resumed run logs the steps after its checkpoint again)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = rec
    if not by_step:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} is empty: the run logged no step")
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have `key`."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)) if pts else (np.array([]),) * 2


def _lines(ax, records: list[dict], keys: list[str], labels: list[str] | None = None) -> bool:
    drawn = False
    for key, label in zip(keys, labels or keys):
        x, y = series(records, key)
        if len(x):
            ax.plot(x, y, marker="." if len(x) < 50 else None, label=label)
            drawn = True
    if drawn:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    ax.set_xlabel("step")
    return drawn


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def expert_load(records: list[dict]) -> dict[str, tuple[list[str], np.ndarray, np.ndarray]]:
    """network -> (row labels "layer/expert", steps (S,), share of the layer's tokens (rows, S)), modalities summed."""
    out = {}
    for network in ("student", "teacher"):
        keys = sorted({k for r in records for k in r if k.startswith(f"moe/{network}/")})
        layers = sorted({k.split("/", 3)[3] for k in keys})
        if not layers:
            continue
        steps = np.array([r["step"] for r in records])
        rows, labels = [], []
        for layer in layers:
            counts = None
            for i, r in enumerate(records):
                for k in keys:
                    if k.split("/", 3)[3] == layer:
                        c = np.asarray(r[k]["counts"], dtype=float)
                        if counts is None:
                            counts = np.zeros((len(c), len(records)))
                        counts[:, i] += c
            share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
            rows.append(share)
            labels += [f"{layer} e{e}" for e in range(len(share))]
        out[network] = (labels, steps, np.concatenate(rows))
    return out


def plot(run_dir: Path, out_dir: Path) -> list[Path]:
    """Write every plot the run's log has data for; returns the PNG paths."""
    records = load(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    terms = sorted({k for r in records for k in r if k.startswith("loss/")}, key=lambda k: (k != "loss/total", k))
    _lines(ax, records, terms, [t[5:] for t in terms])
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_title("losses per term")
    written.append(_save(fig, out_dir / "losses.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    _lines(a1, records, ["samples_per_s"], ["samples/s (rank 0)"])
    _lines(a2, records, ["tokens_per_s"], ["tokens/s (rank 0)"])
    a1.set_title("throughput")
    written.append(_save(fig, out_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    if any(r.get("mfu", 0) > 0 for r in records):
        _lines(ax, records, ["mfu"], ["MFU"])
        ax.set_title("model FLOPs utilisation")
    else:  # the peak is unknown (CPU, unlisted device): achieved FLOP/s instead
        _lines(ax, records, ["tflops"], ["TFLOP/s (rank 0)"])
        ax.set_title("achieved TFLOP/s (MFU unknown: no device peak; set metrics.peak_tflops)")
    written.append(_save(fig, out_dir / "mfu.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    phases = sorted({k for r in records for k in r if k.startswith("time/") and k != "time/step"})
    steps = np.array([r["step"] for r in records])
    ax.stackplot(steps, *[np.array([r.get(p, 0.0) for r in records]) for p in phases],
                 labels=[p[5:] for p in phases])
    ax.legend(fontsize=7, loc="upper right")
    ax.set(xlabel="step", ylabel="seconds", title="step time by phase (rank 0)")
    written.append(_save(fig, out_dir / "step_time.png"))

    loads = expert_load(records)
    if loads:
        fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 0.25 * max(len(v[0]) for v in
                                                                                      loads.values()) + 2))
        for ax, (network, (labels, st, share)) in zip(np.atleast_1d(axes), loads.items()):
            im = ax.imshow(share, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                           extent=(st[0] - 0.5, st[-1] + 0.5, len(labels) - 0.5, -0.5))
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
            ax.set(xlabel="step", title=f"{network}: share of each layer's tokens per expert")
            fig.colorbar(im, ax=ax)
        written.append(_save(fig, out_dir / "expert_load.png"))

    present = [h for h in HEALTH if series(records, f"health/{h}")[0].size]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 3.2), squeeze=False)
        for ax, name in zip(axes[0], present):
            _lines(ax, records, [f"health/{name}"], [name])
            ax.set_title(name, fontsize=9)
        written.append(_save(fig, out_dir / "health.png"))

    if series(records, "health/knn_top1")[0].size:
        fig, ax = plt.subplots(figsize=(6, 4))
        _lines(ax, records, ["health/knn_top1", "health/knn_top5"], ["top-1", "top-5"])
        ax.set(ylabel="accuracy", title="in-training k-NN (teacher backbone)")
        written.append(_save(fig, out_dir / "knn.png"))
    return written


def text_summary(run_dir: Path, pngs: list[Path]) -> str:
    s = summarise(run_dir)
    records = load(run_dir)
    last = records[-1]
    steady = records[1:] or records
    lines = [f"run         {s['run_dir']}  (recipe {s['recipe']}, {s['ranks']} ranks, {s['steps']} steps)",
             f"throughput  {s['samples_per_s']:.1f} samples/s, {s['tokens_per_s']:.0f} tokens/s (all ranks, median)",
             f"compute     {np.median([r.get('tflops', 0.0) for r in steady]):.3f} TFLOP/s per rank, MFU "
             f"{np.median([r.get('mfu', 0.0) for r in steady]):.1%}",
             f"step        {s['step_s']:.2f} s median; " + ", ".join(
                 f"{k[5:]} {np.median([r.get(k, 0.0) for r in steady]):.2f}" for k in sorted(last)
                 if k.startswith("time/") and k != "time/step"),
             f"loss        first {s['first_loss']:.4f} -> last {s['last_loss']:.4f}"]
    health = [f"{h} {last[f'health/{h}']:.3g}" for h in HEALTH if f"health/{h}" in last]
    if health:
        lines.append("health      " + ", ".join(health))
    knn = [(r["step"], r["health/knn_top1"]) for r in records if "health/knn_top1" in r]
    if knn:
        lines.append(f"k-NN top-1  {knn[0][1]:.3f} (step {knn[0][0]}) -> {knn[-1][1]:.3f} (step {knn[-1][0]})")
    lines.append(f"checkpoint  {s['checkpoint']}")
    if pngs:
        lines += [f"plots       {pngs[0].parent}/", f"            {' '.join(p.name for p in pngs)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="where the PNGs and summary.txt go (default RUN_DIR/report)")
    args = p.parse_args(argv)
    out = args.out or args.run_dir / "report"
    try:
        pngs = plot(args.run_dir, out)
        text = text_summary(args.run_dir, pngs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    (out / "summary.txt").write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
