"""Prometheus metrics served by every rank (port + local rank), and a JSON-lines log written by rank 0."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

# Dense bf16 peak TFLOP/s per device, for MFU; matched by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H20": 148.0, "H800": 989.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0}


def peak_tflops(configured: float) -> float:
    """The per-device peak: configured when > 0, else looked up by CUDA device name, else 0 (MFU unreported)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return 0.0


class Metrics:
    """Gauges and counters for one rank. `port=0` keeps them in memory only (tests, dry runs)."""

    def __init__(self, *, rank: int, port: int, run_dir: Path | None, peak: float):
        self.rank, self.peak = rank, peak
        self.registry = CollectorRegistry()
        labels = {"rank": str(rank)}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"skysense_{name}", doc, ["rank"], registry=r).labels(**labels)

        self.samples_per_s = gauge("samples_per_second", "Training samples per second, this rank")
        self.tokens_per_s = gauge("tokens_per_second", "Patch tokens per second through the student, this rank")
        self.tflops = gauge("tflops", "Achieved model TFLOP/s, this rank (FlopCounter of one step)")
        self.mfu = gauge("mfu", "Model FLOPs utilisation (achieved / peak); 0 when the peak is unknown")
        self.step_time = Gauge("skysense_step_seconds", "Step time by phase", ["rank", "phase"], registry=r)
        self.loss = Gauge("skysense_loss", "Loss terms of the last step", ["rank", "term"], registry=r)
        self.health = Gauge("skysense_learning_health", "Collapse gauges (teacher entropy, feature std, MoE "
                            "max/mean load) and in-training k-NN top-1", ["rank", "name"], registry=r)
        self.lr = gauge("lr", "Learning rate")
        self.grad_norm = gauge("grad_norm", "Global gradient norm before clipping")
        self.momentum = gauge("teacher_momentum", "EMA momentum of the teacher")
        self.step = gauge("step", "Global optimizer step")
        self.data_wait = gauge("data_wait_seconds", "Time waiting for the data loader in the last step")
        self.memory = gauge("memory_bytes", "Peak accelerator memory allocated (max RSS-free: CUDA only)")
        self.expert_tokens = Gauge("skysense_expert_tokens", "Tokens routed per expert in the last step",
                                   ["rank", "layer", "expert"], registry=r)
        self.dropped = Counter("skysense_moe_dropped_tokens", "Tokens dropped by expert capacity", ["rank"],
                               registry=r).labels(**labels)
        self.samples = Counter("skysense_samples", "Samples consumed by this rank", ["rank"],
                               registry=r).labels(**labels)
        self.port = None
        if port > 0:
            try:
                start_http_server(port, registry=self.registry)
                self.port = port
            except OSError as e:  # a busy port must not cost a training run
                logging.getLogger("trainer").warning("rank %d: no Prometheus endpoint on port %d (%s); training "
                                                     "goes on, metrics.jsonl is still written", rank, port, e)
        self.log = open(Path(run_dir) / "metrics.jsonl", "a") if (run_dir is not None and rank == 0) else None  # noqa: SIM115

    def record(self, *, step: int, samples: int, tokens: int, flops: float, times: dict[str, float],
               losses: dict[str, float], lr: float, grad_norm: float, momentum: float,
               moe: dict | None = None, health: dict[str, float] | None = None) -> dict:
        """Update every metric for one finished step; returns the logged record."""
        total = max(times["step"], 1e-9)
        rec = {"step": step, "time": time.time(), "samples_per_s": samples / total, "tokens_per_s": tokens / total,
               "tflops": flops / total / 1e12, "lr": lr, "grad_norm": grad_norm, "momentum": momentum,
               "data_wait_s": times.get("data", 0.0), "step_s": total, **{f"time/{k}": v for k, v in times.items()},
               **{f"loss/{k}": v for k, v in losses.items()}, **{f"health/{k}": v for k, v in (health or {}).items()}}
        rec["mfu"] = rec["tflops"] / self.peak if self.peak > 0 else 0.0
        self.samples_per_s.set(rec["samples_per_s"])
        self.tokens_per_s.set(rec["tokens_per_s"])
        self.tflops.set(rec["tflops"])
        self.mfu.set(rec["mfu"])
        for phase, seconds in times.items():
            self.step_time.labels(rank=str(self.rank), phase=phase).set(seconds)
        for term, value in losses.items():
            self.loss.labels(rank=str(self.rank), term=term).set(value)
        for name, value in (health or {}).items():
            self.health.labels(rank=str(self.rank), name=name).set(value)
        self.lr.set(lr)
        self.grad_norm.set(grad_norm)
        self.momentum.set(momentum)
        self.step.set(step)
        self.data_wait.set(times.get("data", 0.0))
        self.samples.inc(samples)
        if torch.cuda.is_available():
            self.memory.set(torch.cuda.max_memory_allocated())
        for layer, stats in (moe or {}).items():
            for e, count in enumerate(stats.get("expert_counts", [])):
                self.expert_tokens.labels(rank=str(self.rank), layer=str(layer), expert=str(e)).set(float(count))
            self.dropped.inc(float(stats.get("dropped", 0)))
        if self.log is not None:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
        return rec

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
