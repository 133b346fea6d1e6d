"""Planner predictions beside measured CPU training steps: `python -m trainer.plan --validate [--recipes tiny,base]`.

Each case runs the real `Trainer` (DeepSpeed ZeRO, fp32, gloo) on a small synthetic dataprep dataset, on 1 and 2
ranks (spawned processes), and measures per rank:
- peak tensor memory: live tensor storage bytes from `LiveBytes`, active from before the model is built, peak
  taken over the first two optimizer steps (Adam states appear on the first). This is the CPU analogue of
  `torch.cuda.max_memory_allocated`, which is what the planner predicts before its CUDA overhead and slack;
  CPU PyTorch has no allocator statistics.
- peak RSS increase over the same steps (/proc VmHWM reset after the build, minus RSS before the build): what the
  operating system sees, allocator slack and libraries included; reported beside, not the figure predicted.
- step time as process CPU time with one thread per rank (wall time on a shared machine measures other people's
  jobs), data loading in a worker process; compared with the plan's compute time for a CPU whose matmul rate and
  per-op overhead are measured here first. Communication is not in CPU time and not compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import RunConfig, from_dict, resolve, to_dict

GIB = 2**30


def rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def cpu_calibration(threads: int = 1) -> dict[str, float]:
    """This machine's fp32 matmul rate and per-op dispatch overhead, in process CPU time."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    t0, n = time.process_time(), 20
    for _ in range(n):
        a @ b
    rate = 2 * 512**3 * n / (time.process_time() - t0)
    x = torch.randn(64, requires_grad=True)
    t0, n = time.process_time(), 3000
    for _ in range(n):
        (x * 1.0001).sum().backward()  # 2 forward + ~3 backward ops
    per_op = (time.process_time() - t0) / (5 * n)
    torch.set_num_threads(prev)
    return {"gflops": rate / 1e9, "op_us": per_op * 1e6}


def measure(cfg: RunConfig, rank: int, timed_steps: int) -> dict:
    """One rank of a measured run (the process group is up). Returns this rank's peaks and step CPU times."""
    from trainer.plan_trace import LiveBytes
    from trainer.train import Trainer

    torch.set_num_threads(1)
    base_rss = rss_bytes()
    live = LiveBytes()
    with live:
        trainer = Trainer(cfg, resume=False)
        batches = iter(trainer.loader)
        next_batch = next(batches)
        batches = _chain(next_batch, batches)  # the loader's first batch (worker start-up) outside the peaks
        live.reset_peak()
        hwm_ok = reset_peak_rss()
        for _ in range(2):
            trainer.train_step(batches)
            trainer.step += 1
        tensor_peak, resident = live.peak, live.current
    rss_peak = rss_bytes("VmHWM") - base_rss if hwm_ok else float("nan")
    times = []
    for _ in range(timed_steps):
        t0 = time.process_time()
        trainer.train_step(batches)
        trainer.step += 1
        times.append(time.process_time() - t0)
    trainer.close()
    return {"rank": rank, "tensor_peak": tensor_peak, "tensor_resident": resident, "rss_peak": rss_peak,
            "step_cpu_s": statistics.median(times), "step_cpu_s_all": times}


def _chain(first, rest):
    yield first
    yield from rest


def _worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from trainer.distributed import init_distributed

    init_distributed()
    res = measure(from_dict(RunConfig, cfg_dict), rank, steps)
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def run_case(cfg: RunConfig, world: int, port: int, steps: int) -> list[dict]:
    """Spawn `world` ranks running `measure`; their results, rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, port, to_dict(cfg), steps, out), nprocs=world, join=True)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def make_dataset(root: str, sets: int = 24) -> str:
    import subprocess
    import sys

    py = sys.executable
    subprocess.run([py, "-m", "dataprep", "sample", "--out", f"{root}/raw", "--sets", str(sets), "--seed", "1"],
                   check=True, capture_output=True)
    subprocess.run([py, "-m", "dataprep", "convert", "--manifest", f"{root}/raw/manifest.jsonl", "--out",
                    f"{root}/data", "--shard-size", "8"], check=True, capture_output=True)
    return f"{root}/data"


def cpu_hardware(cal: dict[str, float]) -> dict:
    """The plan's hardware record for this CPU: measured rate, no CUDA overhead, no slack (tensor bytes)."""
    return {"peak_tflops": cal["gflops"] / 1e3, "mem_gib": 24.0, "nvlink_GBps": 1.0, "hbm_TBps": 0.01,
            "launch_us": cal["op_us"], "overhead_gib": 0.0, "fragmentation": 0.0, "efficiency": 1.0}


def validation_cfg(recipe: str, data: str, run_dir: str) -> RunConfig:
    cfg = resolve(recipe, [f"data.path={data}", f"run_dir={run_dir}", "data.num_workers=1", "metrics.port=0",
                           "train.precision=fp32"])
    cfg.train.global_batch = cfg.train.micro_batch * 2  # accumulation 1 on 2 ranks, 2 on 1 rank
    return cfg


def predict(cfg: RunConfig, world: int, ratio: int, cal: dict) -> dict:
    from trainer.plan import plan

    return plan(cfg, gpus=world, gpu_kind="cpu", ratio=ratio, bf16=False, hw_override=cpu_hardware(cal))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default="tiny,base")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per case")
    ap.add_argument("--port", type=int, default=29650)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    from dataprep.reader import DatasetReader

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(tmp)
        reader = DatasetReader(data)
        ratio = reader.hr_size // reader.s2_size
        cal = cpu_calibration()
        print(f"CPU calibration (1 thread, CPU time): matmul {cal['gflops']:.1f} GFLOP/s, {cal['op_us']:.1f} us/op; "
              f"dataset HR:S2 ratio {ratio}")
        for recipe in args.recipes.split(","):
            for i, world in enumerate(int(w) for w in args.ranks.split(",")):
                cfg = validation_cfg(recipe, data, f"{tmp}/run-{recipe}-{world}")
                pred = predict(cfg, world, ratio, cal)
                meas = run_case(cfg, world, args.port + i, args.steps)
                m = max(meas, key=lambda r: r["tensor_peak"])
                p_mem = pred["memory_gib"]["total"] * GIB
                row = {"recipe": recipe, "ranks": world, "micro_batch": cfg.train.micro_batch,
                       "zero": cfg.train.zero_stage, "pred_mem_MB": p_mem / 2**20,
                       "meas_tensor_MB": m["tensor_peak"] / 2**20, "meas_rss_MB": m["rss_peak"] / 2**20,
                       "mem_err": p_mem / m["tensor_peak"] - 1, "pred_step_s": pred["compute_s"],
                       "meas_step_s": statistics.median(r["step_cpu_s"] for r in meas),
                       "pred_flops_per_sample": pred["flops_hw_per_sample"]}
                row["time_err"] = row["pred_step_s"] / row["meas_step_s"] - 1
                rows.append(row)
                print(f"{recipe:>5} x{world} rank(s) ZeRO-{row['zero']} micro {row['micro_batch']}: memory predicted "
                      f"{row['pred_mem_MB']:.1f} MB vs measured {row['meas_tensor_MB']:.1f} MB tensors "
                      f"({row['mem_err']:+.1%}), RSS +{row['meas_rss_MB']:.1f} MB | step predicted "
                      f"{row['pred_step_s']:.3f} s vs measured {row['meas_step_s']:.3f} s CPU ({row['time_err']:+.1%})",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
