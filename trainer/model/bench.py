"""CPU benchmarks, ratios measured side by side in one run: `python -m trainer.model.bench [--quick]`.

1. MoE routing overhead: (MoE layer fwd+bwd) - (the same experts fwd+bwd on an (E, capacity, D) buffer, no
   routing), ours (`SkyMoE`) vs `deepspeed.moe.layer.MoE` with the same weights; plus the extra peak memory of
   each layer over the experts alone, from a dispatch-mode tracker of live tensor storage.
2. SwinV2 block fwd+bwd: ours (window-partitioned SDPA) vs a straightforward roll/partition/matmul block with the
   same weights.
"""

from __future__ import annotations

import argparse
import math
import time

import deepspeed
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from trainer.model.blocks import SwinV2Block
from trainer.model.moe import Mlp, SkyMoE, moe_capacity


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the mode (CPU has no allocator statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st not in self.live:
                    self.live[st] = st.nbytes()
        self.peak = max(self.peak, sum(self.live.values()))
        return out


def _time(fn) -> float:
    # CPU time of this (single-threaded) process: other jobs on the shared machine do not inflate it.
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _peak(fn) -> int:
    with PeakMemory() as pm:
        fn()
    return pm.peak


class _Passthrough(nn.Module):
    """A free expert: the layer time with it is the routing overhead alone (gate, dispatch, copies, combine)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _layers(dim: int, experts: int, cf: float, expert_factory=None):
    torch.manual_seed(0)
    ours = SkyMoE(dim, 4 * dim, num_experts=experts, capacity_factor=cf, min_capacity=4)
    ds = deepspeed.moe.layer.MoE(
        dim, Mlp(dim, 4 * dim), num_experts=experts, k=1, capacity_factor=cf, min_capacity=4, use_rts=False
    )
    ds.load_state_dict(ours.state_dict())  # same gate and expert weights
    if expert_factory is not None:
        for layer in (ours, ds):
            mods = layer.deepspeed_moe.experts.deepspeed_experts
            for i in range(len(mods)):
                mods[i] = expert_factory()
    return ours, ds


def _run_layer(layer, x):
    def f():
        xi = x.detach().requires_grad_()
        y, aux, _ = layer(xi)
        (y.sum() + aux).backward()

    return f


def _interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Min CPU time per function over `reps` interleaved rounds (after one warm-up round)."""
    for f in fns.values():
        f()
    t = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t[k].append(_time(f))
    return {k: min(v) for k, v in t.items()}  # min: the machine is shared, slow outliers are other load


def bench_moe(tokens: int, dim: int = 256, experts: int = 8, cf: float = 1.25, reps: int = 5) -> dict[str, float]:
    ours, ds = _layers(dim, experts, cf)
    x = torch.randn(tokens, dim)
    cap = moe_capacity(tokens, experts, cf, 4)
    expert_mods = ours.deepspeed_moe.experts.deepspeed_experts
    base = torch.randn(experts, cap, dim)

    def run_experts():  # what every layer must compute anyway: each expert on a (capacity, D) buffer
        bufs = [base[i].detach().requires_grad_() for i in range(experts)]
        torch.stack([e(b).sum() for e, b in zip(expert_mods, bufs, strict=True)]).sum().backward()

    med = _interleaved({"experts": run_experts, "ours": _run_layer(ours, x), "ds": _run_layer(ds, x)}, reps)
    mem = {"ours": _peak(_run_layer(ours, x)), "ds": _peak(_run_layer(ds, x)), "experts": _peak(run_experts)}
    # The same routing with free experts: overhead measured directly, not as a difference of two large times.
    free_ours, free_ds = _layers(dim, experts, cf, _Passthrough)
    direct = _interleaved({"ours": _run_layer(free_ours, x), "ds": _run_layer(free_ds, x)}, reps)
    ov_ours, ov_ds = med["ours"] - med["experts"], med["ds"] - med["experts"]
    extra_ours, extra_ds = mem["ours"] - mem["experts"], mem["ds"] - mem["experts"]
    return {
        "tokens": tokens,
        "t_experts": med["experts"],
        "t_ours": med["ours"],
        "t_ds": med["ds"],
        "overhead_ours": ov_ours,
        "overhead_ds": ov_ds,
        "overhead_ratio": ov_ds / ov_ours if ov_ours > 0 else float("nan"),
        "direct_ours": direct["ours"],
        "direct_ds": direct["ds"],
        "direct_ratio": direct["ds"] / direct["ours"],
        "layer_ratio": med["ds"] / med["ours"],
        "mem_experts_mb": mem["experts"] / 2**20,
        "extra_mem_ours_mb": extra_ours / 2**20,
        "extra_mem_ds_mb": extra_ds / 2**20,
        "extra_mem_ratio": extra_ours / max(extra_ds, 1),
    }


def naive_swin_block(blk: SwinV2Block, x: torch.Tensor) -> torch.Tensor:
    """Straightforward SwinV2 block with `blk`'s weights: roll, partition, matmul attention, mask, reverse."""
    b, h, w, c = x.shape
    window, shift = blk.window_shift(h, w)
    attn = blk.attn
    nh, hd = attn.num_heads, c // attn.num_heads
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    xp = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
    if shift:
        xp = torch.roll(xp, (-shift, -shift), (1, 2))
    xw = xp.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window**2, c)
    qkv = attn.qkv(xw).reshape(xw.shape[0], -1, 3, nh, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    logits = logits * torch.exp(torch.clamp(attn.logit_scale, max=math.log(100.0))).view(1, nh, 1, 1)
    from trainer.model.ops import relative_position_index, window_attention_mask

    table = attn.bias_table(window, x.device)
    logits = logits + table[:, relative_position_index(window).view(-1)].view(1, nh, window**2, window**2)
    mask = window_attention_mask(h, w, window, shift, x.device)
    if mask is not None:
        nw = mask.shape[0]
        logits = logits.view(b, nw, nh, window**2, window**2).masked_fill(~mask[None, :, None], float("-inf"))
        logits = logits.view(-1, nh, window**2, window**2)
    out = (torch.softmax(logits, -1) @ v).transpose(1, 2).reshape(-1, window**2, c)
    out = attn.proj(out).view(b, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, hp, wp, c)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + blk.norm1(out[:, :h, :w])
    return x + blk.norm2(blk.ffn(x))


def bench_swin(b=4, hw=32, dim=128, heads=4, window=8, reps=5) -> dict[str, float]:
    torch.manual_seed(0)
    blk = SwinV2Block(dim, heads, window, shifted=True, ffn=Mlp(dim, 4 * dim), drop_path=0.0)
    x = torch.randn(b, hw, hw, dim)
    torch.testing.assert_close(blk(x)[0], naive_swin_block(blk, x), atol=1e-4, rtol=1e-4)

    def ours():
        xi = x.clone().requires_grad_()
        blk(xi)[0].sum().backward()

    def naive():
        xi = x.clone().requires_grad_()
        naive_swin_block(blk, xi).sum().backward()

    ours(), naive()
    t = {"ours": [], "naive": []}
    for _ in range(reps):
        t["ours"].append(_time(ours))
        t["naive"].append(_time(naive))
    med = {k: min(v) for k, v in t.items()}
    return {
        "shape": f"B{b} {hw}x{hw} C{dim} heads{heads} window{window} shifted",
        "t_ours": med["ours"],
        "t_naive": med["naive"],
        "speedup": med["naive"] / med["ours"],
    }


def naive_window_attention(q, k, v, logit_scale, bias_table, window: int, shift: int) -> torch.Tensor:
    """Roll / pad / partition / matmul window attention, same semantics as `ops.window_attention`."""
    from trainer.model.ops import relative_position_index, window_attention_mask

    b, h, w, nh, d = q.shape
    hp, wp, n = math.ceil(h / window) * window, math.ceil(w / window) * window, window * window

    def part(t):
        t = F.pad(t, (0, 0, 0, 0, 0, wp - w, 0, hp - h))
        t = torch.roll(t, (-shift, -shift), (1, 2)) if shift else t
        return t.view(b, hp // window, window, wp // window, window, nh, d).permute(0, 1, 3, 5, 2, 4, 6)

    qw, kw, vw = (part(t).reshape(-1, nh, n, d) for t in (q, k, v))
    scale = torch.exp(torch.clamp(logit_scale, max=math.log(100.0))).view(1, nh, 1, 1)
    logits = F.normalize(qw, dim=-1) @ F.normalize(kw, dim=-1).transpose(-1, -2) * scale
    logits = logits + bias_table[:, relative_position_index(window).view(-1)].view(1, nh, n, n)
    mask = window_attention_mask(h, w, window, shift, q.device)
    if mask is not None:
        logits = logits.view(b, -1, nh, n, n).masked_fill(~mask[None, :, None], float("-inf")).view(-1, nh, n, n)
    out = (torch.softmax(logits, -1) @ vw).view(b, hp // window, wp // window, nh, window, window, d)
    out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, hp, wp, nh, d)
    out = torch.roll(out, (shift, shift), (1, 2)) if shift else out
    return out[:, :h, :w]


def bench_window_attention(b=4, hw=32, heads=4, head_dim=32, window=8, shift=4, reps=5) -> dict[str, float]:
    from trainer.model import ops

    torch.manual_seed(0)
    q, k, v = (torch.randn(b, hw, hw, heads, head_dim, requires_grad=True) for _ in range(3))
    ls = torch.full((heads,), math.log(10.0), requires_grad=True)
    table = torch.rand(heads, (2 * window - 1) ** 2, requires_grad=True)
    args = (q, k, v, ls, table, window, shift)
    torch.testing.assert_close(ops.window_attention(*args), naive_window_attention(*args), atol=1e-4, rtol=1e-4)
    t = {"ours": [], "naive": []}
    fns = {
        "ours": lambda: ops.window_attention(*args).sum().backward(),
        "naive": lambda: naive_window_attention(*args).sum().backward(),
    }
    for f in fns.values():
        f()
    for _ in range(reps):
        for key, f in fns.items():
            t[key].append(_time(f))
    med = {key: min(v) for key, v in t.items()}
    return {"t_ours": med["ours"], "t_naive": med["naive"], "speedup": med["naive"] / med["ours"]}


def bench_tiny_step(threads: int = 2, reps: int = 5) -> float:
    """Wall time of one tiny-recipe forward+backward: batch 4 of HR 64 px + S2 4 dates + S1 2 dates (16 px)."""
    from trainer.model import build_model, tiny_model

    torch.manual_seed(0)
    model = build_model(tiny_model())
    b = 4
    hr, s2, s1 = torch.randn(b, 3, 64, 64), torch.randn(b * 4, 10, 16, 16), torch.randn(b * 2, 2, 16, 16)
    d2, d1 = torch.randint(0, 366, (b, 4)), torch.randint(0, 366, (b, 2))

    def step():
        o = {m: model.forward_features(x, m) for m, x in (("hr", hr), ("s2", s2), ("s1", s1))}
        last = {m: o[m]["stages"][-1] for m in o}
        f = model.fuse(last["hr"], last["s2"].unflatten(0, (b, 4)), d2, last["s1"].unflatten(0, (b, 2)), d1)
        loss = f.square().mean() + sum(v["pooled"].square().mean() + v["aux_loss"] for v in o.values())
        loss.backward()

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    step()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t0)
    torch.set_num_threads(prev)
    return min(ts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = (1024,) if args.quick else (8192, 16384)
    print(f"threads {torch.get_num_threads()}; MoE: 8 experts, dim 256, hidden 1024, capacity factor 1.25, fwd+bwd")
    for n in sizes:
        r = bench_moe(n, reps=2 if args.quick else args.reps)
        print(
            f"  N={n}: experts alone {r['t_experts']:.3f} s | layer ours {r['t_ours']:.3f} s,"
            f" deepspeed {r['t_ds']:.3f} s (whole layer {r['layer_ratio']:.2f}x)"
        )
        print(
            f"    overhead = layer - experts: ours {r['overhead_ours']:.3f} s vs deepspeed {r['overhead_ds']:.3f} s"
            f" -> {r['overhead_ratio']:.2f}x lower"
        )
        print(
            f"    overhead direct (free experts): ours {r['direct_ours']:.4f} s vs deepspeed {r['direct_ds']:.4f} s"
            f" -> {r['direct_ratio']:.2f}x lower"
        )
        print(
            f"    peak memory: experts alone {r['mem_experts_mb']:.1f} MB, extra ours {r['extra_mem_ours_mb']:.1f}"
            f" MB vs deepspeed {r['extra_mem_ds_mb']:.1f} MB -> ratio {r['extra_mem_ratio']:.2f}"
        )
    a = bench_window_attention(b=1 if args.quick else 4, reps=2 if args.quick else args.reps)
    print(
        f"window attention op fwd+bwd (32x32 grid, 4 heads x 32, window 8, shift 4): ours {a['t_ours']:.4f} s"
        f" vs roll/partition/matmul {a['t_naive']:.4f} s -> {a['speedup']:.2f}x"
    )
    step = {t: bench_tiny_step(threads=t) for t in (1, 2)}
    print(
        f"tiny recipe fwd+bwd, batch 4 (HR 64 px, S2 4x16 px, S1 2x16 px), wall: 1 thread {step[1]:.3f} s,"
        f" 2 threads {step[2]:.3f} s (2 threads suffer most from other load on a shared machine)"
    )
    s = bench_swin(b=1 if args.quick else 4, reps=2 if args.quick else args.reps)
    print(
        f"SwinV2 block fwd+bwd ({s['shape']}): ours {s['t_ours']:.4f} s vs naive {s['t_naive']:.4f} s"
        f" -> {s['speedup']:.2f}x"
    )


if __name__ == "__main__":
    main()
