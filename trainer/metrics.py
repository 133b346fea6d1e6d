"""Prometheus metrics served by every rank, and a JSON-lines log written by rank 0.

Names follow Prometheus' conventions: base units in the name (`_seconds`, `_bytes`, `_flops`, `_ratio`), `_total`
for counters, and every series carries `node`, `rank` and `run` labels; the step is a value (`skysense_step`), never
a label. Each rank serves on `metrics.port + local_rank`, bound to loopback on one machine and to all interfaces
when the job spans several nodes (`SKYSENSE_METRICS_ADDR` overrides). metrics.jsonl keeps its historical keys
(`samples_per_s`, `tflops`, `loss/*`, `health/*`, ...) because trainer.summary, trainer.report and the benchmarks
read them; new values are added beside them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics, start_http_server

# Counters' `_created` series double every counter for no use on a dashboard; off for the whole process.
disable_created_metrics()

# Dense bf16 peak TFLOP/s per device, for MFU; matched by substring of torch.cuda.get_device_name(), longest first
# ("H20" is a substring of "H200").
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "B200": 2250.0}

# Learning-health values that are not unitless ratios get their own, unit-named gauge; the skip counts the loop
# puts into `health` are served as skysense_skipped_steps_total.
HEALTH_OWN_METRIC = {"knn_seconds": "skysense_knn_seconds"}
NOT_HEALTH = frozenset({"skipped_steps", "step_skipped"})


def peak_tflops(configured: float, device_name: str | None = None) -> float:
    """The per-device peak: configured when > 0, else looked up by CUDA device name, else 0 (MFU unreported)."""
    if configured > 0:
        return configured
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if device_name and key in device_name:
            return PEAK_TFLOPS[key]
    return 0.0


def bind_address() -> str:
    """$SKYSENSE_METRICS_ADDR, else 0.0.0.0 when the job spans several nodes (a hostfile), else 127.0.0.1."""
    if os.environ.get("SKYSENSE_METRICS_ADDR"):
        return os.environ["SKYSENSE_METRICS_ADDR"]
    return "0.0.0.0" if int(os.environ.get("CROSS_SIZE", "1")) > 1 else "127.0.0.1"


class PhaseTimer:
    """Step-phase times. On CUDA the device phases are timed with events read once per step (one sync), so
    asynchronous kernels are charged to the phase that launched them; host phases (the loader wait) use the clock."""

    def __init__(self, device: torch.device, host_phases: tuple[str, ...] = ("data",)):
        self.cuda = device.type == "cuda"
        self.host_phases = host_phases
        self.host: dict[str, float] = {}
        self.events: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda and name not in self.host_phases:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
            return
        t = time.perf_counter()
        yield
        self.host[name] = self.host.get(name, 0.0) + time.perf_counter() - t

    def times(self) -> dict[str, float]:
        """Seconds per phase, summed over the step's micro-batches (synchronises the device once on CUDA)."""
        out = dict(self.host)
        if self.events:
            self.events[-1][2].synchronize()
        for name, start, end in self.events:
            out[name] = out.get(name, 0.0) + start.elapsed_time(end) / 1e3
        return out


def step_flops(model, batch: dict, accum: int) -> dict[tuple[str, str, str], float]:
    """FLOPs of one optimizer step, {(network, view, pass): flops}, from torch's FlopCounterMode.

    Counts one encode (backbone + fusion) per network and view type on `batch`'s first views: the student's global
    and local view, the teacher's global view; multiplies by the view counts and `accum`. Backward = 2x the student
    forward; the teacher has none. Heads and losses are not counted (small next to the backbone). Runs under
    fork_rng, without the model's MoE counts, and restores every MoE layer's routing state (balance counts), so
    that training's random stream, routing and expert counts are those of a run without it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.model.moe import SkyMoE

    globals_, locals_ = batch["views"], batch.get("local_views", [])
    device = globals_[0]["hr"].device
    kinds = [("student", "global", globals_), ("student", "local", locals_), ("teacher", "global", globals_)]
    out: dict[tuple[str, str, str], float] = {}
    layers = [m.deepspeed_moe for m in model.modules() if isinstance(m, SkyMoE)]
    saved = [dict(vars(layer)) for layer in layers]  # attributes are rebound, not changed in place, by a forward
    model.count_moe = False
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            for network, view, views in kinds:
                if not views:
                    continue
                net = model.student if network == "student" else model.teacher
                autocast = model.teacher_autocast if network == "teacher" else None
                with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None), \
                        FlopCounterMode(display=False) as counter:
                    model.encode(net, views[0])
                out[(network, view, "forward")] = float(counter.get_total_flops()) * len(views) * accum
                if network == "student":
                    out[(network, view, "backward")] = 2.0 * out[(network, view, "forward")]
    finally:
        model.count_moe = True
        for layer, state in zip(layers, saved, strict=True):
            vars(layer).clear()
            vars(layer).update(state)
    return out


def loader_queue_depth(iterator) -> int:
    """Batches the DataLoader's workers have finished and the loop has not taken yet (0 without workers)."""
    try:
        ready = sum(1 for info in iterator._task_info.values() if len(info) == 2)  # arrived out of order
        return ready + iterator._data_queue.qsize()
    except (AttributeError, NotImplementedError):
        return 0


class Metrics:
    """Gauges and counters for one rank. `port=0` keeps them in memory only (tests, dry runs)."""

    def __init__(self, *, rank: int, port: int, run_dir: Path | None, peak: float, run: str = "",
                 node: str | None = None, addr: str | None = None):
        self.rank, self.peak = rank, peak
        self.registry = r = CollectorRegistry()
        self.base = {"node": node or socket.gethostname(), "rank": str(rank), "run": run}

        def make(kind, name: str, doc: str, *labels: str):
            metric = kind(name, doc, [*self.base, *labels], registry=r)
            return metric.labels(**self.base) if not labels else metric

        self.step = make(Gauge, "skysense_step", "Global optimizer step")
        self.samples_per_s = make(Gauge, "skysense_samples_per_second", "Training samples per second, this rank")
        self.tokens_per_s = make(Gauge, "skysense_tokens_per_second", "Patch tokens per second into the student")
        self.samples = make(Counter, "skysense_samples", "Samples consumed by this rank")
        self.tokens = make(Counter, "skysense_tokens", "Patch tokens consumed by the student on this rank")
        self.flops_per_s = make(Gauge, "skysense_model_flops_per_second", "Achieved model FLOP/s, this rank")
        self.flops_total = make(Counter, "skysense_model_flops", "Model FLOPs executed by this rank")
        self.step_flops = make(Gauge, "skysense_step_flops", "Model FLOPs of one step by network, view type and "
                               "pass (sum over labels = the step)", "network", "view", "pass")
        self.peak_flops = make(Gauge, "skysense_peak_flops_per_second", "Dense bf16 peak of this device (0: unknown)")
        self.mfu = make(Gauge, "skysense_mfu_ratio", "Model FLOPs utilisation, achieved / peak (0: peak unknown)")
        self.step_s = make(Gauge, "skysense_step_seconds", "Wall time of the last step")
        self.phase_s = make(Gauge, "skysense_step_phase_seconds", "Time of the last step by phase (device-synchronised"
                            " on CUDA)", "phase")
        self.data_wait = make(Gauge, "skysense_data_wait_seconds", "Time waiting for the data loader in the last step")
        self.queue = make(Gauge, "skysense_loader_queued_batches", "Batches ready in the loader's queue after a step")
        self.skipped_samples = make(Counter, "skysense_skipped_samples", "Samples skipped (unreadable or rejected)")
        self.skipped_steps = make(Counter, "skysense_skipped_steps", "Optimizer steps skipped (non-finite gradients)")
        self.loss = make(Gauge, "skysense_loss", "Loss terms of the last step (mean over ranks)", "term")
        self.lr = make(Gauge, "skysense_lr", "Learning rate")
        self.grad_norm = make(Gauge, "skysense_grad_norm", "Global gradient norm before clipping")
        self.momentum = make(Gauge, "skysense_teacher_momentum", "EMA momentum of the teacher")
        self.health = make(Gauge, "skysense_learning_health", "Unitless collapse gauges (teacher entropy, feature "
                           "std, MoE max/mean load) and in-training k-NN accuracy", "name")
        self.knn_s = make(Gauge, "skysense_knn_seconds", "Duration of the last in-training k-NN evaluation")
        moe = ("network", "modality", "layer")
        self.expert_tokens = make(Gauge, "skysense_moe_expert_tokens", "Tokens routed to each expert over every MoE "
                                  "call of the last step", *moe, "expert")
        self.step_dropped = make(Gauge, "skysense_moe_step_dropped_tokens", "Tokens dropped by expert capacity in the "
                                 "last step", *moe)
        self.dropped = make(Counter, "skysense_moe_dropped_tokens", "Tokens dropped by expert capacity", *moe)
        self.routed = make(Counter, "skysense_moe_routed_tokens", "Tokens routed (kept or dropped)", *moe)
        self.ckpt_s = make(Gauge, "skysense_checkpoint_last_save_seconds", "Duration of the last checkpoint save")
        self.ckpt_total_s = make(Counter, "skysense_checkpoint_save_seconds", "Time spent saving checkpoints")
        self.ckpts = make(Counter, "skysense_checkpoint_saves", "Checkpoints saved")
        self.cuda_alloc = make(Gauge, "skysense_cuda_memory_allocated_bytes", "CUDA memory allocated now (0 on CPU)")
        self.cuda_peak = make(Gauge, "skysense_cuda_memory_peak_bytes", "Peak CUDA memory allocated (0 on CPU)")
        self.rss = make(Gauge, "skysense_resident_memory_bytes", "Resident set size of this rank's process")
        self.peak_flops.set(peak * 1e12)
        self._moe_seen: set[tuple[str, str, str, int]] = set()
        self._last_ckpt_s: float | None = None
        self._resume_s: float | None = None
        self._process = psutil.Process()
        self.port, self.addr = None, addr or bind_address()
        if port > 0:
            try:
                start_http_server(port, addr=self.addr, registry=self.registry)
                self.port = port
            except OSError as e:  # a busy port must not cost a training run
                logging.getLogger("trainer").warning("rank %d: no Prometheus endpoint on %s:%d (%s); training goes "
                                                     "on, metrics.jsonl is still written", rank, self.addr, port, e)
        self.log = open(Path(run_dir) / "metrics.jsonl", "a") if (run_dir is not None and rank == 0) else None  # noqa: SIM115

    def record(self, *, step: int, samples: int, tokens: int, flops: dict[tuple[str, str, str], float],
               times: dict[str, float], losses: dict[str, float], lr: float, grad_norm: float, momentum: float,
               moe: dict | None = None, health: dict[str, float] | None = None, queue_depth: int = 0,
               skipped_samples: int = 0, skipped_steps: int = 0) -> dict:
        """Update every metric for one finished step; returns the logged record.

        flops: {(network, view, pass): FLOPs of the step} (`step_flops`); moe: {(network, modality, layer):
        {"expert_counts": [per expert], "dropped": n, "tokens": n}} summed over the step (SSLMetaArch.health);
        times: seconds per phase plus "step", the whole step.
        """
        total = max(times["step"], 1e-9)
        flops_step = sum(flops.values())
        rec = {"step": step, "time": time.time(), "samples_per_s": samples / total, "tokens_per_s": tokens / total,
               "tflops": flops_step / total / 1e12, "flops": flops_step, "lr": lr, "grad_norm": grad_norm,
               "momentum": momentum, "data_wait_s": times.get("data", 0.0), "step_s": total,
               "loader_queue": queue_depth, **{f"time/{k}": v for k, v in times.items()},
               **{f"loss/{k}": v for k, v in losses.items()}, **{f"health/{k}": v for k, v in (health or {}).items()},
               **{f"flops/{'/'.join(k)}": v for k, v in flops.items()}}
        rec["mfu"] = rec["tflops"] / self.peak if self.peak > 0 else 0.0
        self.step.set(step)
        self.samples_per_s.set(rec["samples_per_s"])
        self.tokens_per_s.set(rec["tokens_per_s"])
        self.samples.inc(samples)
        self.tokens.inc(tokens)
        self.flops_per_s.set(flops_step / total)
        self.flops_total.inc(flops_step)
        for (network, view, pass_), value in flops.items():
            self.step_flops.labels(**self.base, network=network, view=view, **{"pass": pass_}).set(value)
        self.mfu.set(rec["mfu"])
        self.step_s.set(total)
        for phase, seconds in times.items():
            if phase != "step":
                self.phase_s.labels(**self.base, phase=phase).set(seconds)
        self.data_wait.set(times.get("data", 0.0))
        self.queue.set(queue_depth)
        self.skipped_samples.inc(skipped_samples)
        self.skipped_steps.inc(skipped_steps)
        for term, value in losses.items():
            self.loss.labels(**self.base, term=term).set(value)
        self.lr.set(lr)
        self.grad_norm.set(grad_norm)
        self.momentum.set(momentum)
        for name, value in (health or {}).items():
            if name in HEALTH_OWN_METRIC:
                self.knn_s.set(value)
            elif name not in NOT_HEALTH:
                self.health.labels(**self.base, name=name).set(value)
        self._record_moe(moe or {}, rec)
        self._record_memory(rec)
        if self._last_ckpt_s is not None:
            rec["checkpoint_s"], self._last_ckpt_s = self._last_ckpt_s, None
        if self._resume_s is not None:
            rec["resume_s"], self._resume_s = self._resume_s, None
        if self.log is not None:
            self.log.write(json.dumps(rec) + "\n")
            self.log.flush()
        return rec

    def _record_moe(self, moe: dict, rec: dict) -> None:
        seen = set()
        for (network, modality, layer), st in moe.items():
            labels = {**self.base, "network": network, "modality": modality, "layer": layer}
            for e, count in enumerate(st["expert_counts"]):
                self.expert_tokens.labels(**labels, expert=str(e)).set(float(count))
                seen.add((network, modality, layer, e))
            self.step_dropped.labels(**labels).set(st["dropped"])
            self.dropped.labels(**labels).inc(st["dropped"])
            self.routed.labels(**labels).inc(st["tokens"])
            rec[f"moe/{network}/{modality}/{layer}"] = {"counts": list(st["expert_counts"]), "dropped": st["dropped"]}
        # A (network, modality) with no call this step (the modality absent on this rank) routed nothing.
        for network, modality, layer, e in self._moe_seen - seen:
            self.expert_tokens.labels(**self.base, network=network, modality=modality, layer=layer,
                                      expert=str(e)).set(0.0)
            self.step_dropped.labels(**self.base, network=network, modality=modality, layer=layer).set(0.0)
        self._moe_seen |= seen

    def _record_memory(self, rec: dict) -> None:
        rss = self._process.memory_info().rss
        self.rss.set(rss)
        rec["memory/rss_bytes"] = rss
        if torch.cuda.is_available():
            alloc, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            self.cuda_alloc.set(alloc)
            self.cuda_peak.set(peak)
            rec["memory/cuda_allocated_bytes"], rec["memory/cuda_peak_bytes"] = alloc, peak

    def checkpoint_saved(self, seconds: float) -> None:
        """One checkpoint save took `seconds` (logged with the next step's record too)."""
        self.ckpt_s.set(seconds)
        self.ckpt_total_s.inc(seconds)
        self.ckpts.inc()
        self._last_ckpt_s = seconds

    def resumed(self, seconds: float) -> None:
        """Loading the checkpoint this run resumed from took `seconds` (logged with the first step's record)."""
        self._resume_s = seconds

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
