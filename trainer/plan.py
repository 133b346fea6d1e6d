"""Capacity planner: does a recipe fit, and what does its run cost? `python -m trainer.plan --recipe huge --gpus 128`.

FLOPs and activation bytes come from tracing the model itself on the meta device (`trainer/plan_trace.py`), per
modality and per view type, at the recipe's view sizes and micro-batch; parameters from the built model; memory
per GPU from the ZeRO stage and expert parallelism; communication, step time, MFU and run cost from the hardware
tables in `trainer/plan_hw.py`. Every assumption is printed with the plan. `--validate` puts predictions beside
measured CPU runs (`trainer/plan_validate.py`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys

import torch

from trainer import plan_hw as hw
from trainer.config import ConfigError, RunConfig, apply_override, reduce_bucket_elements, resolve, validate
from trainer.model.backbone import build_model
from trainer.model.moe import SkyMoE
from trainer.plan_trace import trace_pieces

GIB = 2**30
HW_KEYS = ("peak_tflops", "mem_gib", "nvlink_GBps", "net_GBps", "launch_us", "overhead_gib", "fragmentation",
           "efficiency", "hbm_TBps", "written_GBps")
HEAD_TERMS = 3  # hr, s2, s1 share `head`; F_fus has `fusion_head` (trainer/meta_arch.py)


# ---------------------------------------------------------------------------------------------------------------
# what one step runs


def view_kinds(cfg: RunConfig, ratio: int) -> dict[str, dict]:
    """Per view kind: HR side, S2/S1 side (HR / ratio), views per set (trainer/data.py `PretrainViews`)."""
    d = cfg.data
    out = {"global": {"hr": d.hr_crop, "ms": d.hr_crop // ratio, "count": 2}}
    if d.local_crops:
        out["local"] = {"hr": d.local_crop, "ms": d.local_crop // ratio, "count": d.local_crops}
    for name, v in out.items():
        if v["ms"] < 1:
            raise ConfigError(f"{name} view: HR {v['hr']} px / ratio {ratio} leaves no S2/S1 pixel")
    return out


def _grid(px: int, patch: int, halvings: int) -> int:
    g = -(-px // patch)
    for _ in range(halvings):
        g = -(-g // 2)
    return g


def step_pieces(cfg: RunConfig, ratio: int, batch: int, *, teacher: bool) -> list[dict]:
    """The traced pieces of one micro-batch: student (grad) for every view kind, teacher (no grad) on globals."""
    m, d = cfg.model, cfg.data
    frames = {"hr": 1, "s2": d.s2_frames, "s1": d.s1_frames}
    n_views = sum(v["count"] for v in view_kinds(cfg, ratio).values())
    pieces = []
    roles = [("student", True)] + ([("teacher", False)] if teacher else [])
    for role, grad in roles:
        for kind, v in view_kinds(cfg, ratio).items():
            if role == "teacher" and kind != "global":
                continue
            mult = v["count"]
            for mod in ("hr", "s2", "s1"):
                size = v["hr"] if mod == "hr" else v["ms"]
                pieces.append({"role": role, "view": kind, "part": mod, "mult": mult, "kind": "backbone",
                               "modality": mod, "size": size, "batch": batch * frames[mod], "grad": grad})
            halv = sum(m.apm_reduce["hr"] for _ in range(len(m.depths) - 1))
            hr_grid = _grid(v["hr"], m.patch_size, halv)
            ms_grid = _grid(v["ms"], m.patch_size, 0)
            pieces.append({"role": role, "view": kind, "part": "fusion", "mult": mult, "kind": "fusion",
                           "hr_grid": [hr_grid, hr_grid], "ms_grid": [ms_grid, ms_grid],
                           "dates": [d.s2_frames, d.s1_frames], "batch": batch, "grad": grad})
        views = n_views if role == "student" else 2
        pieces.append({"role": role, "view": "all", "part": "heads", "mult": 1, "kind": "heads", "batch": batch,
                       "heads": [["head", 0, HEAD_TERMS * views], ["fusion_head", 0, views]], "grad": grad})
    return pieces


def _head_dims(cfg: RunConfig, backbone) -> dict:
    lc = cfg.loss
    return {"heads": {"head": backbone.out_dim, "fusion_head": backbone.fusion_dim},
            "args": {"out_dim": lc.head_out_dim, "hidden_dim": lc.head_hidden_dim,
                     "bottleneck_dim": lc.head_bottleneck_dim}}


def trace_step(cfg: RunConfig, ratio: int, batch: int, dtype: torch.dtype, act_ckpt: bool, backbone,
               teacher: bool, cache: bool = True) -> list[dict]:
    pieces = step_pieces(cfg, ratio, batch, teacher=teacher)
    heads = _head_dims(cfg, backbone)
    for p in pieces:
        if p["kind"] == "heads":
            p["heads"] = [[name, heads["heads"][name], calls] for name, _, calls in p["heads"]]
    traced = [{k: v for k, v in p.items() if k not in ("role", "view", "part", "mult")} for p in pieces]
    res = trace_pieces(cfg.model, traced, dtype=dtype, act_ckpt=act_ckpt, head_dims=heads, cache=cache)
    return [{**{k: p[k] for k in ("role", "view", "part", "mult", "batch")}, **r} for p, r in zip(pieces, res)]


# ---------------------------------------------------------------------------------------------------------------
# parameters


def count_params(cfg: RunConfig, backbone) -> dict[str, int]:
    """Backbone (experts apart), fusion, heads; `active` = what one token runs through (top-1: one expert)."""
    from trainer.objectives.dino import DINOHead

    expert = sum(p.numel() for m in backbone.modules() if isinstance(m, SkyMoE)
                 for p in m.deepspeed_moe.experts.parameters())
    fusion = sum(p.numel() for p in backbone.fusion.parameters())
    total_backbone = sum(p.numel() for p in backbone.parameters()) - fusion
    e = cfg.model.moe.num_experts if cfg.model.moe.enabled else 1
    dims = _head_dims(cfg, backbone)
    heads = sum(p.numel() for name, d in dims["heads"].items()
                for p in DINOHead(d, **dims["args"], device="meta").parameters())
    return {"backbone_total": total_backbone, "backbone_dense": total_backbone - expert,
            "backbone_active": total_backbone - expert + expert // e, "experts": expert, "fusion": fusion,
            "heads": heads, "trained": total_backbone + fusion + heads,
            "non_expert": total_backbone - expert + fusion + heads}


# ---------------------------------------------------------------------------------------------------------------
# memory


def state_memory(p: dict, *, world: int, ep: int, zero: int, bf16: bool) -> dict[str, float]:
    """Bytes per GPU of weights, teacher, gradients and optimizer states under ZeRO-`zero` and expert parallelism.

    Experts: 1/ep of them per rank, their optimizer states partitioned over the world/ep expert-data-parallel
    ranks; everything else is replicated and its states partitioned over all ranks. DeepSpeed ZeRO-1/2
    (runtime/zero/stage_1_and_2.py) keeps an fp32 copy of each rank's partition even when training in fp32, and
    allocates its gradient reduce bucket whole at the first backward (`reduce_bucket_elements`: the trained
    parameters, at most DeepSpeed's 5e8 elements), in the gradient dtype (fp32 for ZeRO-1 under bf16, whose
    gradients accumulate in fp32).
    """
    w = 2 if bf16 else 4
    local = p["non_expert"] + p["experts"] / ep
    part = p["non_expert"] / world + p["experts"] / world  # (experts / ep) / (world / ep)
    out = {"weights": w * local, "teacher_fp32": 4 * local}
    bucket = reduce_bucket_elements(int(local))
    if zero == 0:
        out["grads"] = w * local + (4 * local if bf16 else 0)  # bf16: BF16_Optimizer's fp32 accumulation buffer
        out["optimizer"] = (12 if bf16 else 8) * local
    elif zero == 1:
        # full grads on every rank (fp32 under bf16), the reduce bucket, the fp32 partition at the step
        out["grads"] = (4 if bf16 else w) * (local + bucket) + 4 * part
        out["optimizer"] = 12 * part  # fp32 master + Adam m, v
    else:
        out["grads"] = w * part + w * bucket + 4 * part  # partitions, the reduce bucket, fp32 at step
        out["optimizer"] = 12 * part
    return out


def activation_memory(traces: list[dict], micro: int, traced_batch: int) -> dict[str, float]:
    """Peak activation bytes of a micro-batch: every student piece's saved tensors stay until the backward; on top,
    the largest transient (a piece's backward, or the teacher's forward). Traced at `traced_batch`, scaled
    linearly to `micro` (activations are per sample; the batch-independent part is a few CPB tables)."""
    scale = micro / traced_batch
    student = [t for t in traces if t["role"] == "student"]
    teacher = [t for t in traces if t["role"] == "teacher"]
    saved = sum(t["mult"] * t["saved"] for t in student)
    transient = max([t["peak"] - t["saved"] for t in student] + [t["peak"] for t in teacher])
    return {"saved": saved * scale, "transient": transient * scale, "peak": (saved + transient) * scale}


# ---------------------------------------------------------------------------------------------------------------
# communication and time


def _bus_gbps(group: int, gpus_per_node: int, gpu: dict, net: dict) -> float:
    if group <= gpus_per_node:
        return gpu["nvlink_GBps"] * hw.NVLINK_EFFICIENCY
    return net["gbit"] / 8 * net["efficiency"]


def communication(p: dict, traces: list[dict], *, world: int, ep: int, zero: int, accum: int, bf16: bool,
                  act_ckpt: bool, gpus_per_node: int, gpu: dict, net: dict, micro: int, traced_batch: int) -> dict:
    """Bytes each GPU sends per optimizer step and the seconds that takes (ring collectives, rail-optimised)."""
    w = 2 if bf16 else 4
    dp_e = world // ep
    ring = lambda n: (n - 1) / n if n > 1 else 0.0  # noqa: E731
    dense, expert = p["non_expert"], p["experts"] / ep
    rs = w * (dense * ring(world) + expert * ring(dp_e))  # one reduce-scatter of the gradients
    ag = w * (dense * ring(world) + expert * ring(dp_e))  # the all-gather of updated weights
    reduces = accum if zero == 2 else 1  # ZeRO-2 reduces in every micro-step's backward, ZeRO-0/1 at the boundary
    grad_bytes = rs * reduces + ag
    bw_dp = _bus_gbps(world, gpus_per_node, gpu, net)
    scale = micro / traced_batch
    a2a = 0.0
    if ep > 1:
        for t in traces:  # dispatch + combine per MoE layer; backward the same again; checkpointing recomputes
            calls = 1 if t["role"] == "teacher" else (3 if act_ckpt else 2)
            a2a += t["mult"] * t["a2a"] * scale * calls * ring(ep)
        a2a *= accum
    bw_ep = _bus_gbps(ep, gpus_per_node, gpu, net)
    return {"grad_bytes": grad_bytes, "grad_s": grad_bytes / (bw_dp * 1e9), "a2a_bytes": a2a,
            "a2a_s": a2a / (bw_ep * 1e9) if a2a else 0.0, "dp_GBps": bw_dp, "ep_GBps": bw_ep,
            "reduce_scatters": reduces}


def flops_table(traces: list[dict]) -> dict[str, dict[str, float]]:
    """Forward FLOPs per sample by view type and part, and the training FLOPs per sample."""
    table: dict[str, dict[str, float]] = {}
    for t in traces:
        row = f"{t['role']} {t['view']}"
        per_sample = t["fwd_flops"] * t["mult"] / t["batch"]
        table.setdefault(row, {})[t["part"]] = table.get(row, {}).get(t["part"], 0) + per_sample
    return table


# ---------------------------------------------------------------------------------------------------------------
# the plan


@functools.cache
def optimizer_written_per_param() -> dict[str, float]:
    """Bytes written per parameter by one optimizer step, as LiveBytes counts them: AdamW (torch's, which DeepSpeed
    ZeRO-1/2 runs on each rank's fp32 partition) plus the copy back into the weights, and the teacher's EMA update
    (trainer/meta_arch.py: foreach mul_ + add_). Measured on a small CPU tensor; per element, so any size."""
    from trainer.plan_trace import LiveBytes

    n = 4096
    w = torch.zeros(n, requires_grad=True)
    w.grad = torch.ones(n)
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.04, foreach=False)
    opt.step()  # creates the moments
    model, teacher = torch.zeros(n), torch.zeros(n)
    adam, ema = LiveBytes(exclude=[w, w.grad, model]), LiveBytes(exclude=[teacher, model])
    with adam:
        opt.step()
        model.copy_(w.detach())
    with ema:
        torch._foreach_mul_([teacher], 0.99)
        torch._foreach_add_([teacher], [model], alpha=0.01)
    return {"optimizer": adam.written / n, "ema": ema.written / n}


def matmul_roofline(matmuls: dict, peak_flops: float, write_rate: float) -> float:
    """Seconds for the traced matmul-class ops ({key: [count, flops, output bytes]}): each op takes the longer of its
    FLOPs at the achieved rate and its output at the memory-bound write rate (a roofline; skinny matmuls, such as
    an expert's weight gradient over a few tokens, write more than they compute)."""
    return sum(n * max(fl / peak_flops, out / write_rate) for n, fl, out in matmuls.values())


def written_rate(gpu: dict) -> float:
    """GB/s of output that memory-bound ops (elementwise, norms, softmax, copies) write: `written_GBps` if given,
    else the HBM rate x MEMORY_EFFICIENCY, halved because each byte written comes with about one byte read."""
    if "written_GBps" in gpu:
        return float(gpu["written_GBps"])
    return gpu.get("hbm_TBps", hw.DEFAULT_HBM_TBPS) * 1e3 * hw.MEMORY_EFFICIENCY / 2


def plan(cfg: RunConfig, *, gpus: int, gpu_kind: str = "h20", net_kind: str = "ib400", gpus_per_node: int = 8,
         ratio: int = 32, bf16: bool = True, efficiency: float | None = None, hw_override: dict | None = None,
         cache: bool = True, dataprep_workers: int = 512, dataset_sets: int | None = None,
         matmul_time=None) -> dict:
    """The whole plan for the resolved `cfg` on `gpus` GPUs (train.zero_stage, model.moe.ep_size,
    train.micro_batch, model.activation_checkpointing as in cfg).

    matmul_time: optional callable {key: [count, flops, bytes]} -> seconds replacing the roofline (the CPU
    validation passes the model's matmuls timed on this machine)."""
    need = ("peak_tflops", "mem_gib", "nvlink_GBps")
    if gpu_kind not in hw.GPUS and not all(k in (hw_override or {}) for k in need):
        raise ConfigError(f"unknown --gpu-kind {gpu_kind!r}; choose one of {', '.join(hw.GPUS)} or give "
                          f"--set-hw {', '.join(need)}")
    if net_kind not in hw.NETS:
        raise ConfigError(f"unknown --net {net_kind!r}; choose one of {', '.join(hw.NETS)}")
    gpu = {**hw.GPUS.get(gpu_kind, {}), **(hw_override or {})}
    net = dict(hw.NETS[net_kind])
    if "net_GBps" in gpu:
        net = {"gbit": gpu["net_GBps"] * 8, "efficiency": 1.0}
    t, mc = cfg.train, cfg.model
    ep, zero, micro, ckpt = mc.moe.ep_size, t.zero_stage, t.micro_batch, mc.activation_checkpointing
    if gpus < 1 or gpus % ep:
        raise ConfigError(f"--gpus {gpus} must be a positive multiple of the expert-parallel size {ep}")
    if t.global_batch % (micro * gpus):
        raise ConfigError(f"global batch {t.global_batch} is not divisible by micro-batch x GPUs = {micro} x {gpus}")
    accum = t.global_batch // (micro * gpus)
    dtype = torch.bfloat16 if bf16 else torch.float32
    backbone = build_model(mc, device="meta")
    params = count_params(cfg, backbone)
    traced = {}
    for setting in (False, True):
        traced[setting] = trace_step(cfg, ratio, micro, dtype, setting, backbone, teacher=True, cache=cache)
    traces = traced[ckpt]
    states = state_memory(params, world=gpus, ep=ep, zero=zero, bf16=bf16)
    acts = {s: activation_memory(traced[s], micro, micro) for s in (False, True)}
    overhead = gpu.get("overhead_gib", hw.CUDA_OVERHEAD_GIB) * GIB
    frag = gpu.get("fragmentation", hw.FRAGMENTATION)
    state_total = sum(states.values())

    def total(s):
        return state_total + acts[s]["peak"] * (1 + frag) + overhead

    capacity = gpu["mem_gib"] * GIB
    fits_by = {s: total(s) <= capacity for s in (False, True)}
    per_rank = t.global_batch // gpus
    candidates = [b for b in range(1, per_rank + 1) if per_rank % b == 0]
    max_micro = {s: max([b for b in candidates
                         if state_total + acts[s]["peak"] / micro * b * (1 + frag) + overhead <= capacity], default=0)
                 for s in (False, True)}

    model_flops = sum(x["mult"] * x["flops"] for x in traced[False] if x["role"] == "student") + \
        sum(x["mult"] * x["flops"] for x in traced[False] if x["role"] == "teacher")
    hw_flops = sum(x["mult"] * x["flops"] for x in traces)
    ops = sum(x["mult"] * x["ops"] for x in traces)
    written = sum(x["mult"] * x["written"] for x in traces)
    matmuls: dict[str, list] = {}
    for x in traces:
        for key, (n, fl, out) in x["matmuls"].items():
            matmuls.setdefault(key, [0, fl, out])[0] += x["mult"] * n
    comm = communication(params, traces, world=gpus, ep=ep, zero=zero, accum=accum, bf16=bf16, act_ckpt=ckpt,
                         gpus_per_node=gpus_per_node, gpu=gpu, net=net, micro=micro, traced_batch=micro)
    eff = efficiency if efficiency is not None else gpu.get("efficiency", hw.COMPUTE_EFFICIENCY)
    peak = gpu["peak_tflops"] * 1e12
    launch = gpu.get("launch_us", hw.LAUNCH_US) * 1e-6
    write_rate = written_rate(gpu) * 1e9
    matmul_s = matmul_time(matmuls) if matmul_time else matmul_roofline(matmuls, peak * eff, write_rate)
    memory_s, launch_s = written / write_rate, ops * launch
    per_param = dict(optimizer_written_per_param())  # cached: a copy for the result
    opt_part = params["trained"] if zero == 0 else params["trained"] / gpus
    optimizer_s = (per_param["optimizer"] * opt_part +
                   per_param["ema"] * (params["non_expert"] + params["experts"] / ep)) / write_rate
    compute_s = accum * (matmul_s + memory_s + launch_s) + optimizer_s
    step_s = compute_s + comm["grad_s"] + comm["a2a_s"]  # ds config: overlap_comm off for ZeRO-1/2
    samples_s = t.global_batch / step_s
    mfu = accum * model_flops * gpus / (step_s * gpus * peak)
    run_s = step_s * t.max_steps
    res = {
        "recipe": cfg.recipe, "gpus": gpus, "gpu_kind": gpu_kind, "net": net_kind, "gpus_per_node": gpus_per_node,
        "nodes": math.ceil(gpus / gpus_per_node), "ep": ep, "zero": zero, "micro_batch": micro, "accum": accum,
        "act_ckpt": ckpt, "precision": "bf16" if bf16 else "fp32", "hr_s2_ratio": ratio,
        "views": view_kinds(cfg, ratio), "frames": {"s2": cfg.data.s2_frames, "s1": cfg.data.s1_frames},
        "params": params,
        "flops_fwd_per_sample": flops_table(traces),
        "flops_train_per_sample": model_flops / micro, "flops_hw_per_sample": hw_flops / micro,
        "memory_gib": {**{k: v / GIB for k, v in states.items()},
                       "activations": acts[ckpt]["peak"] / GIB,
                       "activations_ckpt_off": acts[False]["peak"] / GIB,
                       "activations_ckpt_on": acts[True]["peak"] / GIB,
                       "fragmentation": acts[ckpt]["peak"] * frag / GIB, "overhead": overhead / GIB,
                       "total": total(ckpt) / GIB, "total_ckpt_off": total(False) / GIB,
                       "total_ckpt_on": total(True) / GIB, "capacity": gpu["mem_gib"]},
        "fits": fits_by[ckpt], "fits_ckpt_off": fits_by[False], "fits_ckpt_on": fits_by[True],
        "margin_gib": (capacity - total(ckpt)) / GIB,
        "max_micro_batch": {"ckpt_off": max_micro[False], "ckpt_on": max_micro[True]},
        "comm": {**comm, "grad_GB": comm["grad_bytes"] / 1e9, "a2a_GB": comm["a2a_bytes"] / 1e9},
        "ops_per_micro_step": ops, "written_GB_per_micro_step": written / 1e9, "written_GBps": write_rate / 1e9,
        "compute_breakdown_s": {"matmul": accum * matmul_s, "memory": accum * memory_s, "launch": accum * launch_s,
                                "optimizer": optimizer_s},
        "optimizer_bytes_per_param": per_param,
        "compute_s": compute_s, "step_s": step_s, "samples_per_s": samples_s, "mfu": mfu,
        "days": run_s / 86400, "gpu_hours": run_s / 3600 * gpus,
        "efficiency": eff, "peak_tflops": gpu["peak_tflops"],
    }
    res["data"] = data_plan(cfg, ratio, samples_s, res["nodes"], dataprep_workers, dataset_sets)
    res["assumptions"] = assumptions(res, gpu, net, frag, overhead)
    return res


def data_plan(cfg: RunConfig, ratio: int, samples_s: float, nodes: int, workers: int, sets: int | None) -> dict:
    """Read rate per node and the dataprep pass for the paper's 21M sets, from dataprep's measured figures."""
    pd, comp = hw.PAPER_DATA, hw.DATAPREP["compression"]
    n = sets or pd["sets"]
    raw = {"hr": pd["hr_px"] ** 2 * pd["bands"]["hr"] * pd["bytes"]["hr"],
           "s2": pd["s2_dates"] * pd["ms_px"] ** 2 * pd["bands"]["s2"] * pd["bytes"]["s2"],
           "s1": pd["s1_dates"] * pd["ms_px"] ** 2 * pd["bands"]["s1"] * pd["bytes"]["s1"]}
    stored = {m: raw[m] / comp[m] for m in raw}
    views = sum(v["count"] for v in view_kinds(cfg, ratio).values())
    # Per set the loader reads the union of every view's box (whole chunks) and of every view's dates
    # (trainer/data.py `_read`): HR taken as the whole image (two global boxes of 32-100% of the extent plus the
    # locals leave little out), dates as the expected number of distinct ones among views x frames draws.
    uniq = {m: pd[f"{m}_dates"] * (1 - (1 - min(k, pd[f"{m}_dates"]) / pd[f"{m}_dates"]) ** views)
            for m, k in (("s2", cfg.data.s2_frames), ("s1", cfg.data.s1_frames))}
    per_sample = stored["hr"] + sum(stored[m] / pd[f"{m}_dates"] * uniq[m] for m in ("s2", "s1"))
    raw_set = sum(raw.values())
    cpu_s = raw_set / 1e6 / hw.DATAPREP["MB_per_cpu_s"] * n
    return {"read_MB_per_sample": per_sample / 1e6, "read_MB_s_per_node": per_sample * samples_s / nodes / 1e6,
            "distinct_dates_read": uniq, "raw_MB_per_set": raw_set / 1e6,
            "stored_MB_per_set": sum(stored.values()) / 1e6, "storage_TB": sum(stored.values()) * n / 1e12,
            "dataprep_cpu_hours": cpu_s / 3600, "dataprep_workers": workers,
            "dataprep_wall_hours": cpu_s / 3600 / workers, "sets": n}


def assumptions(r: dict, gpu: dict, net: dict, frag: float, overhead: float) -> list[str]:
    return [
        f"GPU {r['gpu_kind']}: {gpu['peak_tflops']:g} TFLOP/s dense bf16 peak, {gpu['mem_gib']:g} GiB, NVLink "
        f"{gpu.get('nvlink_GBps', 0):g} GB/s x {hw.NVLINK_EFFICIENCY} usable (plan_hw.py; --set-hw to override)",
        f"network {r['net']}: {net['gbit']:g} Gb/s per GPU x {net['efficiency']} usable; {r['gpus_per_node']} GPUs "
        f"per node; data-parallel ring {r['comm']['dp_GBps']:.1f} GB/s, expert all-to-all {r['comm']['ep_GBps']:.1f}"
        f" GB/s",
        f"compute: each traced matmul/conv/SDPA op at the longer of its FLOPs at {r['efficiency']:.2f} of peak and "
        "its output at the write rate below, + "
        f"{r['written_GB_per_micro_step']:.2f} GB per micro-step written by the other (memory-bound) ops at "
        f"{r['written_GBps']:.0f} GB/s (HBM x {hw.MEMORY_EFFICIENCY} / 2 for read + write) + "
        f"{gpu.get('launch_us', hw.LAUNCH_US):g} us per dispatched op ({r['ops_per_micro_step']:,} ops per "
        "micro-step, traced)",
        "FLOPs: FlopCounterMode on the meta device; backbone traced through a proxy with one block per kind and "
        "scaled by block counts; model FLOPs (MFU) exclude activation-checkpoint recompute, step time includes it",
        f"activations: live tensor bytes of the traced forward+backward at micro-batch {r['micro_batch']}, all "
        "modalities present in every set; CPU reference ops (the Triton kernels on CUDA may save less); "
        f"+{frag:.0%} allocator slack and {overhead / GIB:.1f} GiB CUDA/NCCL overhead",
        "optimizer: AdamW, fp32 master + 2 moments partitioned by ZeRO; teacher fp32 (EMA), experts 1/ep per rank; "
        f"its step writes {r['optimizer_bytes_per_param']['optimizer']:.0f} B per partitioned parameter and the EMA "
        f"{r['optimizer_bytes_per_param']['ema']:.0f} B per teacher parameter (traced), at the write rate",
        f"ZeRO-{r['zero']}: {r['comm']['reduce_scatters']} gradient reduce-scatter(s) + 1 weight all-gather per step; "
        "no compute/communication overlap (the generated ds config leaves overlap_comm off)",
        f"HR:S2 pixel ratio {r['hr_s2_ratio']} (the paper's sets: 2048 px HR over a 64 px S2 tile)",
        f"data: compression {hw.DATAPREP['compression']} and {hw.DATAPREP['MB_per_cpu_s']:g} MB raw per CPU-s "
        f"per dataprep worker ({hw.DATAPREP['source']}); HR measured on synthetic sets only",
    ]


# ---------------------------------------------------------------------------------------------------------------
# output


def _fmt(n: float, unit: str = "") -> str:
    for suffix, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_plan(r: dict) -> str:
    L = []  # noqa: N806
    v = r["views"]
    L.append(f"plan: recipe {r['recipe']} on {r['gpus']} x {r['gpu_kind']} ({r['nodes']} nodes, {r['net']}), "
             f"ZeRO-{r['zero']}, ep {r['ep']}, micro-batch {r['micro_batch']} x accumulation {r['accum']}, "
             f"activation checkpointing {'on' if r['act_ckpt'] else 'off'}, {r['precision']}")
    L.append("views per set: " + ", ".join(f"{k['count']} {n} (HR {k['hr']} px, S2/S1 {k['ms']} px)"
                                            for n, k in v.items())
             + f"; S2 {r['frames']['s2']} and S1 {r['frames']['s1']} dates per view")
    p = r["params"]
    L.append("\nparameters")
    for k in ("backbone_dense", "experts", "backbone_total", "backbone_active", "fusion", "heads", "trained"):
        L.append(f"  {k:<16} {p[k]:>15,d}  ({_fmt(p[k])})")
    L.append("\nforward FLOPs per sample")
    parts = ["hr", "s2", "s1", "fusion", "heads"]
    L.append(f"  {'':<18}" + "".join(f"{x:>10}" for x in parts) + f"{'total':>10}")
    for row, vals in r["flops_fwd_per_sample"].items():
        L.append(f"  {row:<18}" + "".join(f"{_fmt(vals.get(x, 0)):>10}" for x in parts)
                 + f"{_fmt(sum(vals.values())):>10}")
    L.append(f"  training FLOPs per sample: {_fmt(r['flops_train_per_sample'])} (student fwd+bwd + teacher fwd), "
             f"{_fmt(r['flops_hw_per_sample'])} executed (with recompute)")
    m = r["memory_gib"]
    L.append("\nmemory per GPU (GiB)")
    for k in ("weights", "teacher_fp32", "grads", "optimizer", "activations", "fragmentation", "overhead", "total"):
        L.append(f"  {k:<16} {m[k]:>8.2f}")
    L.append(f"  capacity {m['capacity']:.0f} GiB: {'FITS' if r['fits'] else 'DOES NOT FIT'}, margin "
             f"{r['margin_gib']:+.1f} GiB")
    L.append(f"  activations ckpt off {m['activations_ckpt_off']:.2f} (total {m['total_ckpt_off']:.1f}, "
             f"{'fits' if r['fits_ckpt_off'] else 'no'}), ckpt on {m['activations_ckpt_on']:.2f} (total "
             f"{m['total_ckpt_on']:.1f}, {'fits' if r['fits_ckpt_on'] else 'no'}); largest micro-batch that fits: "
             f"{r['max_micro_batch']['ckpt_off']} (off), {r['max_micro_batch']['ckpt_on']} (on)")
    c = r["comm"]
    L.append("\ncommunication per step and GPU")
    L.append(f"  gradients+weights {c['grad_GB']:.2f} GB ({c['reduce_scatters']} reduce-scatter + all-gather) "
             f"-> {c['grad_s']:.3f} s;  MoE all-to-all {c['a2a_GB']:.2f} GB -> {c['a2a_s']:.3f} s")
    L.append("\ntime and cost")
    b = r["compute_breakdown_s"]
    L.append(f"  step {r['step_s']:.2f} s (compute {r['compute_s']:.2f} s: matmul {b['matmul']:.2f}, memory-bound "
             f"{b['memory']:.2f}, op launches {b['launch']:.2f}, optimizer + EMA {b['optimizer']:.2f}), "
             f"{r['samples_per_s']:.0f} samples/s, MFU {r['mfu']:.1%}")
    L.append(f"  run of {r.get('max_steps', 0) or 'recipe'} steps: {r['days']:.1f} days, {r['gpu_hours']:,.0f} "
             f"GPU-hours")
    d = r["data"]
    L.append("\ndata")
    L.append(f"  read {d['read_MB_per_sample']:.1f} MB per sample -> {d['read_MB_s_per_node']:.0f} MB/s per node")
    L.append(f"  {d['sets'] / 1e6:.0f}M sets: {d['raw_MB_per_set']:.1f} MB raw, {d['stored_MB_per_set']:.1f} MB "
             f"stored per set -> {d['storage_TB']:.0f} TB; dataprep {d['dataprep_cpu_hours']:,.0f} CPU-hours = "
             f"{d['dataprep_wall_hours']:.1f} h on {d['dataprep_workers']} workers")
    L.append("\nreported compute for comparison")
    L.extend(f"  {x}" for x in hw.REPORTED)
    L.append("\nassumptions")
    L.extend(f"  - {a}" for a in r["assumptions"])
    return "\n".join(L)


def build_cfg(recipe: str, overrides: list[str], *, ep: int | None, zero: int | None, micro: int | None,
              act_ckpt: str | None) -> RunConfig:
    cfg = resolve(recipe, overrides)
    if ep is not None:
        apply_override(cfg, f"model.moe.ep_size={ep}")
    if zero is not None:
        apply_override(cfg, f"train.zero_stage={zero}")
    if micro is not None:
        apply_override(cfg, f"train.micro_batch={micro}")
    if act_ckpt is not None:
        apply_override(cfg, f"model.activation_checkpointing={act_ckpt}")
    validate(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="huge")
    ap.add_argument("--gpus", type=int, default=128)
    ap.add_argument("--gpu-kind", default="h20", help=f"one of {', '.join(hw.GPUS)}")
    ap.add_argument("--net", default="ib400", help=f"inter-node network: {', '.join(hw.NETS)}")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--ep", type=int, help="expert-parallel size (model.moe.ep_size)")
    ap.add_argument("--zero", type=int, choices=(0, 1, 2))
    ap.add_argument("--micro-batch", type=int)
    ap.add_argument("--act-ckpt", choices=("on", "off"))
    ap.add_argument("--ratio", type=int, default=32, help="the dataset's HR:S2 pixel ratio (paper: 32)")
    ap.add_argument("--efficiency", type=float, help=f"achieved fraction of peak (default {hw.COMPUTE_EFFICIENCY})")
    ap.add_argument("--set-hw", action="append", default=[], metavar="KEY=VALUE",
                    help="override a GPU figure: peak_tflops, mem_gib, nvlink_GBps, net_GBps, launch_us, "
                         "overhead_gib, fragmentation, efficiency, hbm_TBps, written_GBps")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--no-cache", action="store_true", help="trace again instead of using the trace cache")
    ap.add_argument("--validate", action="store_true", help="predicted vs measured on CPU (trainer.plan_validate)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--validate" in argv:  # its own flags (its --json takes a file): handed over unparsed
        from trainer import plan_validate

        return plan_validate.main([a for a in argv if a != "--validate"])
    args, rest = ap.parse_known_args(argv)
    if rest:
        ap.error(f"unrecognised arguments: {' '.join(rest)}")
    try:
        hw_override = {}
        for item in args.set_hw:
            key, _, value = item.partition("=")
            if not value:
                raise ConfigError(f"--set-hw expects KEY=VALUE, got {item!r}")
            if key not in HW_KEYS:
                raise ConfigError(f"--set-hw: unknown key {key!r}; valid: {', '.join(HW_KEYS)}")
            hw_override[key] = float(value)
        cfg = build_cfg(args.recipe, args.set, ep=args.ep, zero=args.zero, micro=args.micro_batch,
                        act_ckpt=args.act_ckpt)
        res = plan(cfg, gpus=args.gpus, gpu_kind=args.gpu_kind, net_kind=args.net, gpus_per_node=args.gpus_per_node,
                   ratio=args.ratio, efficiency=args.efficiency, hw_override=hw_override or None,
                   cache=not args.no_cache)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res["max_steps"] = cfg.train.max_steps
    print(json.dumps(res, indent=1, default=str) if args.json else format_plan(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
