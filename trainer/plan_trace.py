"""Meta-device traces for the capacity planner (`trainer/plan.py`): FLOPs and activation bytes of the real model.

Each piece of a training step (one modality's backbone pass over one kind of view, the temporal fusion, the DINO
heads, the teacher's forward) runs forward and backward on the meta device, at the real sizes and micro-batch,
under `torch.utils.flop_counter.FlopCounterMode` (matmul/conv/SDPA FLOPs) and `LiveBytes` (live tensor storage
created during the piece, the meta-device analogue of `torch.cuda.max_memory_allocated`). Meta ops cost about a
millisecond each in Python, so a 24-block backbone is traced as a proxy that keeps one block of every kind
(stage, shift parity, dense or MoE) and the per-block costs, read from hooks, are added for the blocks left out:
blocks of one kind see the same shapes, so their FLOPs and saved activations are identical. Results are cached
on disk by their inputs (`SKYSENSE_PLAN_CACHE`, default ~/.cache/skysense-plan).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from trainer.model.backbone import build_model
from trainer.model.config import IN_CHANS, ModelConfig
from trainer.model.moe import SkyMoE, moe_capacity

TRACE_VERSION = 7  # bump when what a trace measures changes (invalidates the cache)


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage created inside the mode: `current`, `peak`; and what the step-time model needs:
    `ops` dispatched, `written` (output bytes of every op without a FLOP formula: elementwise, norms, softmax,
    copies, indexing; in-place ops included), and `matmuls`, the ops with a FLOP formula (mm, addmm, bmm,
    convolution, attention) by op and input shapes: {key: [count, flops each, output bytes each]}.

    Storage is counted once however many views share it, and released when its last tensor dies. Storage of the
    tensors in `exclude` (parameters, buffers) is never counted, though ops return views of it (`w.t()`). Works
    for CPU tensors and meta tensors (planner traces: same sizes, no memory).
    """

    def __init__(self, exclude=()) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry  # imports triton: keep it out of module import

        self._flops = flop_registry
        self.current = 0
        self.peak = 0
        self.ops = 0
        self.written = 0
        self.matmuls: dict[str, list] = {}
        self._keep = [t.untyped_storage() for t in exclude]  # alive, so their ids stay theirs
        self._seen: set[int] = {id(st) for st in self._keep}

    def _free(self, key: int, n: int) -> None:
        self.current -= n
        self._seen.discard(key)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        packet = func.overloadpacket
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if packet in self._flops:
            shapes = [tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            key = f"{packet.__name__}{shapes}"
            rec = self.matmuls.get(key)
            if rec is None:
                rec = self.matmuls[key] = [0, int(self._flops[packet](*args, **kwargs, out_val=out)),
                                           sum(t.numel() * t.element_size() for t in outs)]
            rec[0] += 1
        inplace = packet not in self._flops and packet.__name__.endswith("_") and bool(args)
        if inplace:  # writes its first argument (a list for _foreach), created before the mode or not
            self.written += sum(t.numel() * t.element_size() for t in tree_flatten(args[0])[0]
                                if isinstance(t, torch.Tensor))
        for t in outs:
            st = t.untyped_storage()
            key = id(st)
            if key not in self._seen:
                n = st.nbytes()
                self._seen.add(key)
                self.current += n
                if packet not in self._flops and not inplace:
                    self.written += n
                weakref.finalize(st, self._free, key, n)
        self.peak = max(self.peak, self.current)
        return out


# ---------------------------------------------------------------------------------------------------------------
# proxy model


def block_kinds(cfg: ModelConfig) -> list[list[tuple]]:
    """Per stage, the kind of every block: (stage, shift parity (windowed stages) or 0, is_moe)."""
    total = sum(cfg.depths)
    n_moe = cfg.moe.num_layers if cfg.moe.enabled else 0
    out, idx = [], 0
    for s, depth in enumerate(cfg.depths):
        windowed = s not in cfg.global_attn_stages
        kinds = []
        for j in range(depth):
            kinds.append((s, j % 2 if windowed else 0, idx >= total - n_moe))
            idx += 1
        out.append(kinds)
    return out


def proxy_config(cfg: ModelConfig) -> tuple[ModelConfig, dict[tuple, int]]:
    """A shallow backbone with one block of every kind, and how many blocks of each kind the real model has beyond
    it. The fusion keeps its depth (its layers are cheap to trace; checkpointed ones did not scale exactly).
    Falls back to the real model when the kinds cannot be kept in order."""
    kinds = block_kinds(cfg)
    kept = []
    for stage in kinds:
        seen: list[tuple] = []
        for k in stage:
            if k not in seen:
                seen.append(k)
        kept.append(seen)
    proxy = copy.deepcopy(cfg)
    proxy.depths = tuple(len(k) for k in kept)
    proxy.moe.num_layers = sum(k[2] for stage in kept for k in stage) if cfg.moe.enabled else cfg.moe.num_layers
    if [k for s in block_kinds(proxy) for k in s] != [k for s in kept for k in s]:
        proxy = copy.deepcopy(cfg)  # kinds interleave in a way a prefix proxy cannot keep: trace everything
    extra: dict[tuple, int] = {}
    have = [k for s in block_kinds(proxy) for k in s]
    for k in (k for s in kinds for k in s):
        extra[k] = extra.get(k, 0) + 1
    for k in have:
        extra[k] -= 1
    return proxy, {k: v for k, v in extra.items() if v}


def _key(k: tuple) -> str:
    return f"s{k[0]}p{k[1]}{'m' if k[2] else 'd'}"


# ---------------------------------------------------------------------------------------------------------------
# tracing one piece


class _BlockProbe:
    """Hooks on the first block of every kind: forward FLOPs, ops, written bytes and net live bytes; backward FLOPs,
    ops and written bytes (recompute included)."""

    def __init__(self, model, live: LiveBytes, fc) -> None:  # fc: a torch.utils.flop_counter.FlopCounterMode
        self.live, self.fc = live, fc
        self.records: dict[str, dict] = {}
        self.a2a: dict[str, int] = {}
        self.forward_phase = True
        self.handles = []
        for stage, kinds in zip(model.stages, block_kinds(model.cfg), strict=True):
            for blk, kind in zip(stage.blocks, kinds, strict=True):
                self._watch(blk, _key(kind))
                if isinstance(blk.ffn, SkyMoE):
                    self._watch_moe(blk.ffn, _key(kind))

    def _watch_moe(self, moe, kind: str) -> None:
        """Bytes of one dispatch + one combine buffer (E, capacity, D): what the all-to-alls move."""
        def pre(m, args):
            x = args[0]
            if self.forward_phase and kind not in self.a2a:
                e = m.num_experts
                gate = m.deepspeed_moe.gate
                cf = gate.capacity_factor if m.training else gate.eval_capacity_factor
                cap = moe_capacity(x.numel() // x.shape[-1], e, cf, gate.min_capacity)
                self.a2a[kind] = 2 * e * cap * x.shape[-1] * x.element_size()

        self.handles.append(moe.register_forward_pre_hook(pre))

    def _watch(self, mod, kind: str) -> None:
        state: dict = {}

        def counters():
            return (self.fc.get_total_flops(), self.live.ops, self.live.written,
                    {k: v[0] for k, v in self.live.matmuls.items()})

        def mark(which):  # backward of the block runs from its output's grad to its input's grad
            def hook(_g):
                state[which] = counters()
            return hook

        def pre(_m, args):
            if self.forward_phase and kind not in self.records:
                state["bytes"], state["start"] = self.live.current, counters()
                if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
                    args[0].register_hook(mark("in"))

        def post(_m, _a, out):
            if self.forward_phase and kind not in self.records:
                flops, ops, written, mm = _diff(counters(), state["start"])
                self.records[kind] = {"saved": self.live.current - state["bytes"], "fwd_flops": flops,
                                      "fwd_ops": ops, "fwd_written": written, "fwd_matmuls": mm, "state": state}
                y = out[0] if isinstance(out, tuple) else out
                if y.requires_grad:
                    y.register_hook(mark("out"))

        self.handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def trace_piece(model, piece: dict) -> dict:
    """Trace one piece on `model` (meta). piece: {"kind": "backbone"|"fusion"|"heads", "grad": bool, ...}.

    Returns fwd_flops, flops (forward + backward, recompute included), saved (live bytes at the end of the
    forward: what the backward keeps), peak (highest live bytes), ops, written (LiveBytes), and per-block records.
    """
    dtype = next(model.parameters()).dtype
    grads_dropped = []
    if piece["grad"]:  # ZeRO-2 reduces and frees each gradient bucket as it fills: grads are counted elsewhere
        for p in model.parameters():
            if p.requires_grad:
                grads_dropped.append(p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)))
    live = LiveBytes(exclude=[*model.parameters(), *model.buffers()])
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: keep it out of module import

    fc = FlopCounterMode(display=False)
    model.train(piece["grad"])
    probe = _BlockProbe(model.backbone if hasattr(model, "backbone") else model, live, fc) \
        if piece["kind"] != "heads" else None
    ctx = torch.enable_grad() if piece["grad"] else torch.no_grad()
    try:
        with ctx, fc, live:
            out = _run(model, piece, dtype)
            saved, fwd_flops = live.current, fc.get_total_flops()
            if piece["grad"]:
                if probe is not None:
                    probe.forward_phase = False  # checkpointed blocks run again in the backward: not a new block
                out.backward()
                del out
    finally:
        if probe is not None:
            probe.close()
        for h in grads_dropped:
            h.remove()
    res = {"fwd_flops": int(fwd_flops), "flops": int(fc.get_total_flops()), "saved": int(saved),
           "peak": int(live.peak), "ops": live.ops, "written": live.written, "matmuls": live.matmuls,
           "grad": piece["grad"], "blocks": {}}
    if probe is not None:
        for kind, r in probe.records.items():
            st = r["state"]
            has_bwd = piece["grad"] and "in" in st and "out" in st
            bwd = _diff(st["in"], st["out"]) if has_bwd else (0, 0, 0, {})
            mm = {k: r["fwd_matmuls"].get(k, 0) + bwd[3].get(k, 0) for k in {*r["fwd_matmuls"], *bwd[3]}}
            res["blocks"][kind] = {"saved": r["saved"], "fwd_flops": r["fwd_flops"], "flops": r["fwd_flops"] + bwd[0],
                                   "ops": r["fwd_ops"] + bwd[1], "written": r["fwd_written"] + bwd[2],
                                   "matmuls": {k: n for k, n in mm.items() if n}, "a2a": probe.a2a.get(kind, 0)}
    return res


def _diff(now: tuple, then: tuple) -> tuple:
    """Counters between two `_BlockProbe` snapshots: (flops, ops, written, {matmul key: count})."""
    *a, mm_now = now
    *b, mm_then = then
    mm = {k: n - mm_then.get(k, 0) for k, n in mm_now.items() if n != mm_then.get(k, 0)}
    return (*(x - y for x, y in zip(a, b, strict=True)), mm)


def _run(model, piece: dict, dtype) -> torch.Tensor:
    """The piece's forward; returns a scalar to differentiate (grad pieces) or the output (no-grad)."""
    dev = "meta"
    b = piece["batch"]
    if piece["kind"] == "backbone":
        m, n = piece["modality"], piece["size"]
        x = torch.empty(b, IN_CHANS[m], n, n, device=dev, dtype=dtype)
        o = model.forward_features(x, m)
        return o["pooled"].float().sum() + o["stages"][-1].float().mean() + o["aux_loss"]
    if piece["kind"] == "fusion":
        d = model.out_dim
        (h, w), (hs, ws) = piece["hr_grid"], piece["ms_grid"]
        t2, t1 = piece["dates"]
        req = piece["grad"]
        hr = torch.empty(b, h, w, d, device=dev, dtype=dtype, requires_grad=req)
        s2 = torch.empty(b, t2, hs, ws, d, device=dev, dtype=dtype, requires_grad=req)
        s1 = torch.empty(b, t1, hs, ws, d, device=dev, dtype=dtype, requires_grad=req)
        doy2 = torch.zeros(b, t2, dtype=torch.long, device=dev)
        doy1 = torch.zeros(b, t1, dtype=torch.long, device=dev)
        return model.fuse(hr, s2, doy2, s1, doy1).float().mean()
    if piece["kind"] == "heads":  # model: a ModuleDict of heads; inputs (B, in_dim) per term
        total = 0.0
        for name, in_dim, calls in piece["heads"]:
            for _ in range(calls):
                x = torch.empty(b, in_dim, device=dev, dtype=dtype, requires_grad=piece["grad"])
                total = total + model[name](x).float().logsumexp(-1).mean()
        return total
    raise ValueError(f"unknown piece kind {piece['kind']!r}")


def scale_to_full(res: dict, extra: dict[tuple, int], counts: dict[tuple, int]) -> dict:
    """Add the blocks the proxy left out: FLOPs, ops, written bytes, saved and peak grow by the per-block cost of
    each kind.

    `counts`: blocks of each kind in the real model; `a2a` is one forward's all-to-all bytes over all MoE layers.
    """
    out = {k: res[k] for k in ("fwd_flops", "flops", "saved", "peak", "ops", "written")}
    out["matmuls"] = {k: list(v) for k, v in res["matmuls"].items()}
    out["a2a"] = sum(counts[k] * res["blocks"][_key(k)]["a2a"] for k in counts if _key(k) in res["blocks"])
    for kind, n in extra.items():
        rec = res["blocks"].get(_key(kind))
        if rec is None:
            continue  # not a backbone piece
        out["fwd_flops"] += n * rec["fwd_flops"]
        out["flops"] += n * rec["flops"]
        out["ops"] += n * rec["ops"]
        out["written"] += n * rec["written"]
        for key, count in rec["matmuls"].items():
            out["matmuls"][key][0] += n * count
        if res["grad"]:  # kept for the backward: grows with depth; without grad only one block's output lives
            out["saved"] += n * rec["saved"]
            out["peak"] += n * rec["saved"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# cached entry point


def _cache_dir() -> Path:
    return Path(os.environ.get("SKYSENSE_PLAN_CACHE", Path.home() / ".cache" / "skysense-plan"))


def trace_pieces(cfg: ModelConfig, pieces: list[dict], *, dtype: torch.dtype, act_ckpt: bool,
                 head_dims: dict | None = None, cache: bool = True) -> list[dict]:
    """Trace every piece for the real model `cfg` (through its proxy), scaled to full depth. Cached on disk."""
    cfg = copy.deepcopy(cfg)
    cfg.activation_checkpointing = act_ckpt
    payload = json.dumps({"v": TRACE_VERSION, "torch": torch.__version__, "cfg": dataclasses.asdict(cfg),
                          "pieces": pieces, "dtype": str(dtype), "heads": head_dims}, sort_keys=True, default=str)
    path = _cache_dir() / f"{hashlib.sha256(payload.encode()).hexdigest()[:24]}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    proxy, extra = proxy_config(cfg)
    counts: dict[tuple, int] = {}
    for k in (k for stage in block_kinds(cfg) for k in stage):
        counts[k] = counts.get(k, 0) + 1
    model = build_model(proxy, device="meta", dtype=dtype)
    heads = None
    if head_dims:
        from trainer.objectives.dino import DINOHead

        heads = torch.nn.ModuleDict({name: DINOHead(in_dim, **head_dims["args"], device="meta", dtype=dtype)
                                     for name, in_dim in head_dims["heads"].items()})
    results = []
    for piece in pieces:
        target = heads if piece["kind"] == "heads" else model
        results.append(scale_to_full(trace_piece(target, piece), extra, counts))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
    return results
