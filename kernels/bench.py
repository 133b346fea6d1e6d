"""Benchmark the Triton kernels against the reference and torch.compile(reference): `python -m kernels.bench`.

For each op at paper shapes (C 352..2816, head dim 32, window 8, 8-16k tokens per rank, 8 experts) it prints the
time per call, achieved TFLOP/s and GB/s (bytes that must move: inputs read once, outputs written once), the
fraction of the device's peak for the op's binding roofline (HBM bandwidth: every op here is memory-bound, see the
kernels' docstrings), the max error against the reference, and the speed-ups over the reference and over
torch.compile(reference), measured side by side in one run.

Without CUDA it checks that everything imports and exits 0. `--smoke` runs the whole measuring path on CPU through
Triton's interpreter at toy shapes (what the tests do), so the bench itself is exercised where no GPU exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (name pattern, bf16 dense TFLOP/s, HBM TB/s); first match wins, so the more specific names come first.
PEAKS = [
    (r"H200", 989.0, 4.8),
    (r"H100.*PCIe", 756.0, 2.0),
    (r"H100.*NVL", 835.0, 3.9),
    (r"H100|H800", 989.0, 3.35),
    (r"\bH20\b", 148.0, 4.0),
    (r"A100.*80GB", 312.0, 2.04),
    (r"A100|A800", 312.0, 1.56),
    (r"L40S", 362.0, 0.864),
    (r"MI300X", 1307.0, 5.3),
]


def device_peak(name: str) -> tuple[float, float] | None:
    """(bf16 dense TFLOP/s, HBM TB/s) for a device name, or None when unknown."""
    for pattern, tflops, tbs in PEAKS:
        if re.search(pattern, name):
            return tflops, tbs
    return None


@dataclass(kw_only=True, slots=True)
class Case:
    """One benchmarked call: how to run it three ways, and the FLOPs and bytes it must at least do / move."""

    op: str
    shape: str
    flops: float
    bytes: float
    triton: Callable[[], object]
    reference: Callable[[], object]
    compiled: Callable[[], object] | None
    error: Callable[[], float]


def _timer(device: torch.device, reps: int) -> Callable[[Callable[[], object]], float]:
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=max(20, reps * 10), return_mode="median") * 1e-3

    def cpu(fn: Callable[[], object]) -> float:
        fn()
        best = math.inf
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    return cpu


def _maybe_compile(fn: Callable, enabled: bool) -> Callable | None:
    return torch.compile(fn, dynamic=False) if enabled else None


def _fwd_bwd(fn: Callable, args: list[torch.Tensor], loss: Callable | None = None) -> Callable[[], object]:
    def run():
        for a in args:
            a.grad = None
        out = fn()
        (loss(out) if loss else out.float().square().mean()).backward()

    return run


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)


# ------------------------------------------------------------------------------------------------------ cases
def window_cases(shapes, dtype, device, compile_ref: bool) -> list[Case]:
    wa = importlib.import_module("kernels.window_attention.function")
    ref = importlib.import_module("kernels.window_attention.reference").window_attention
    cref = _maybe_compile(ref, compile_ref)
    cases = []
    for b, h, w, nh, d, window, shift in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        qkv = torch.randn(b, h, w, 3, nh, d, generator=g).to(device, dtype).requires_grad_()
        q, k, v = qkv.unbind(3)
        ls = torch.full((nh,), math.log(10.0), device=device, requires_grad=True)
        bt = (16 * torch.sigmoid(torch.randn(nh, (2 * window - 1) ** 2, generator=g))).to(device).requires_grad_()
        args = (q, k, v, ls, bt, window, shift)
        hp, wp = -(-h // window) * window, -(-w // window) * window
        pairs = b * (hp // window) * (wp // window) * nh * (window * window) ** 2 * d  # (N x N x d) per window
        elt = qkv.element_size()
        tokens = b * h * w * nh * d
        shape = f"B{b} {h}x{w} nh{nh} d{d} w{window} s{shift}"
        err = lambda a=args: _max_err(wa.window_attention(*a), ref(*a))  # noqa: E731
        leaves = [qkv, ls, bt]
        cases.append(Case(
            op="window_attention fwd", shape=shape, flops=4.0 * pairs, bytes=4.0 * tokens * elt,
            triton=lambda a=args: wa.window_attention(*a), reference=lambda a=args: ref(*a),
            compiled=(lambda a=args: cref(*a)) if cref else None, error=err,
        ))  # fmt: skip
        cases.append(Case(
            op="window_attention fwd+bwd", shape=shape, flops=14.0 * pairs, bytes=11.0 * tokens * elt,
            triton=_fwd_bwd(lambda a=args: wa.window_attention(*a), leaves),
            reference=_fwd_bwd(lambda a=args: ref(*a), leaves),
            compiled=_fwd_bwd(lambda a=args: cref(*a), leaves) if cref else None, error=err,
        ))  # fmt: skip
    return cases


def apm_cases(shapes, dtype, device, compile_ref: bool) -> list[Case]:
    apm = importlib.import_module("kernels.apm_merge.function")
    ref = importlib.import_module("kernels.apm_merge.reference").apm_merge
    cref = _maybe_compile(ref, compile_ref)
    cases = []
    for b, h, w, c, reduce in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(b, h, w, c, generator=g).to(device, dtype).requires_grad_()
        wt = torch.ones(4 * c, device=device, requires_grad=True)
        bs = torch.zeros(4 * c, device=device, requires_grad=True)
        args = (x, wt, bs, reduce)
        m = b * ((h + 1) // 2) * ((w + 1) // 2) if reduce else b * h * w
        elt = x.element_size()
        read, write = x.numel() * elt, m * 4 * c * elt
        shape = f"B{b} {h}x{w} C{c} {'reduce' if reduce else 'keep'}"
        err = lambda a=args: _max_err(apm.apm_merge(*a), ref(*a))  # noqa: E731
        cases.append(Case(
            op="apm_merge fwd", shape=shape, flops=10.0 * m * 4 * c, bytes=read + write,
            triton=lambda a=args: apm.apm_merge(*a), reference=lambda a=args: ref(*a),
            compiled=(lambda a=args: cref(*a)) if cref else None, error=err,
        ))  # fmt: skip
        cases.append(Case(
            op="apm_merge fwd+bwd", shape=shape, flops=25.0 * m * 4 * c, bytes=3 * read + 2 * write,
            triton=_fwd_bwd(lambda a=args: apm.apm_merge(*a), [x, wt, bs]),
            reference=_fwd_bwd(lambda a=args: ref(*a), [x, wt, bs]),
            compiled=_fwd_bwd(lambda a=args: cref(*a), [x, wt, bs]) if cref else None, error=err,
        ))  # fmt: skip
    return cases


def routing_cases(shapes, dtype, device, compile_ref: bool) -> list[Case]:
    fn = importlib.import_module("kernels.moe_routing.function")
    refm = importlib.import_module("kernels.moe_routing.reference")
    c_route = _maybe_compile(refm.top1_route, compile_ref)
    c_disp = _maybe_compile(refm.moe_dispatch, compile_ref)
    c_comb = _maybe_compile(refm.moe_combine, compile_ref)
    compiled = (c_route, c_disp, c_comb)
    return [case for shape in shapes for case in _routing_shape(fn, refm, shape, dtype, device, *compiled)]


def _routing_shape(fn, refm, shape, dtype, device, c_route, c_disp, c_comb) -> list[Case]:
    # One function call per shape: the closures below must not share (late-bound) loop variables.
    n, d, e, cf = shape
    cases = []
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    wg = (0.02 * torch.randn(e, d, generator=g)).to(device).requires_grad_()
    cap = max(4, math.ceil(cf * n / e))
    elt = x.element_size()
    label = f"N{n} D{d} E{e} cap{cap}"
    loss = lambda r: r.gate.sum() + r.aux_loss + r.z_loss  # noqa: E731
    r = refm.top1_route(x, wg, cap)
    kept = int(r.kept.sum())
    cases.append(Case(
        op="top1_route fwd+bwd", shape=label, flops=6.0 * n * d * e, bytes=3.0 * n * d * elt,
        triton=_fwd_bwd(lambda: fn.top1_route(x, wg, cap), [x, wg], loss),
        reference=_fwd_bwd(lambda: refm.top1_route(x, wg, cap), [x, wg], loss),
        compiled=_fwd_bwd(lambda: c_route(x, wg, cap), [x, wg], loss) if c_route else None,
        error=lambda: _max_err(fn.top1_route(x, wg, cap).gate, refm.top1_route(x, wg, cap).gate),
    ))  # fmt: skip
    idx = (r.expert, r.position, r.kept)
    xs = x.detach().requires_grad_()
    cases.append(Case(
        op="moe_dispatch fwd+bwd", shape=label, flops=0.0, bytes=2.0 * (kept * d + e * cap * d) * elt,
        triton=_fwd_bwd(lambda: fn.moe_dispatch(xs, *idx, e, cap), [xs]),
        reference=_fwd_bwd(lambda: refm.moe_dispatch(xs, *idx, e, cap), [xs]),
        compiled=_fwd_bwd(lambda: c_disp(xs, *idx, e, cap), [xs]) if c_disp else None,
        error=lambda: _max_err(fn.moe_dispatch(xs, *idx, e, cap), refm.moe_dispatch(xs, *idx, e, cap)),
    ))  # fmt: skip
    y = torch.randn(e, cap, d, generator=g).to(device, dtype).requires_grad_()
    gate = r.gate.detach().requires_grad_()
    cases.append(Case(
        op="moe_combine fwd+bwd", shape=label, flops=2.0 * n * d, bytes=(3.0 * kept * d + 2.0 * n * d) * elt,
        triton=_fwd_bwd(lambda: fn.moe_combine(y, *idx, gate), [y, gate]),
        reference=_fwd_bwd(lambda: refm.moe_combine(y, *idx, gate), [y, gate]),
        compiled=_fwd_bwd(lambda: c_comb(y, *idx, gate), [y, gate]) if c_comb else None,
        error=lambda: _max_err(fn.moe_combine(y, *idx, gate), refm.moe_combine(y, *idx, gate)),
    ))  # fmt: skip
    return cases


# Paper shapes: stage-1/2 grids of HR crops (C = 352 -> 11 heads, 704 -> 22 heads of 32), 16k tokens per rank;
# APM 1-3 (C 352/704/1408, HR reduce, S2 keep); MoE in stages 3-4 (D = 1408, 2816), 8 experts.
PAPER = dict(
    window_attention=[(4, 64, 64, 11, 32, 8, 0), (4, 64, 64, 11, 32, 8, 4), (16, 32, 32, 22, 32, 8, 4),
                      (4, 60, 60, 11, 32, 8, 4)],
    apm_merge=[(4, 64, 64, 352, True), (4, 32, 32, 704, True), (4, 16, 16, 1408, True), (16, 32, 32, 352, False)],
    moe_routing=[(16384, 1408, 8, 1.25), (8192, 2816, 8, 1.25)],
)  # fmt: skip
SMOKE = dict(
    window_attention=[(1, 5, 7, 2, 8, 4, 2)],
    apm_merge=[(1, 5, 7, 6, True)],
    moe_routing=[(70, 16, 4, 1.0), (37, 8, 4, 2.0)],
)
BUILDERS = dict(window_attention=window_cases, apm_merge=apm_cases, moe_routing=routing_cases)


def _fmt_speedup(base: float | None, t: float) -> str:
    return f"{base / t:6.2f}x" if base else "    n/a"


def run(ops: list[str], dtype: torch.dtype, device: torch.device, smoke: bool, compile_ref: bool, reps: int) -> int:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    peak = device_peak(name) if device.type == "cuda" else None
    print(f"device: {name}")
    if peak:
        print(f"peak: {peak[0]:.0f} TFLOP/s bf16 dense, {peak[1]:.2f} TB/s HBM (%peak below: of HBM bandwidth)")
    else:
        print("peak: unknown peak for this device (no %peak column)")
    print(f"dtype: {dtype}, torch {torch.__version__}, compile baseline: {'on' if compile_ref else 'off'}")
    timer = _timer(device, reps)
    header = f"{'op':26s} {'shape':32s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} {'%peak':>6s} {'err':>8s}"
    print(header + f" {'vs ref':>7s} {'vs compile':>10s}")
    failures = 0
    for op in ops:
        for case in BUILDERS[op](SMOKE[op] if smoke else PAPER[op], dtype, device, compile_ref):
            try:
                t = timer(case.triton)
                err = case.error()
                t_ref = timer(case.reference)
                t_cmp = None
                if case.compiled is not None:
                    try:
                        t_cmp = timer(case.compiled)
                    except Exception as exc:  # a compile failure must not hide the kernel's numbers
                        print(f"  torch.compile baseline failed for {case.op}: {type(exc).__name__}: {exc}"[:300])
            except Exception as exc:
                failures += 1
                print(f"{case.op:26s} {case.shape:32s} FAILED: {type(exc).__name__}: {exc}"[:400])
                continue
            gbs = case.bytes / t / 1e9
            pct = f"{100 * gbs / (peak[1] * 1e3):5.1f}%" if peak else "   n/a"
            print(
                f"{case.op:26s} {case.shape:32s} {t * 1e3:9.3f} {case.flops / t / 1e12:8.2f} {gbs:8.1f} {pct:>6s} "
                f"{err:8.1e} {_fmt_speedup(t_ref, t):>7s} {_fmt_speedup(t_cmp, t):>10s}"
            )
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="window_attention,apm_merge,moe_routing", help="comma-separated op names")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--smoke", action="store_true", help="toy shapes on CPU through TRITON_INTERPRET=1 (fp32)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) baseline")
    p.add_argument("--reps", type=int, default=5, help="timing repetitions (CPU) / scale of do_bench's budget")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - set(BUILDERS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; choose from {sorted(BUILDERS)}")
    import kernels  # noqa: F401  (the dispatch package must import on any machine)

    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: nothing to benchmark (kernels imported fine, reference path only)")
        return 0
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported below
        dtype, device = torch.float32, torch.device("cpu")  # the interpreter is wrong for bf16
    elif not torch.cuda.is_available():
        for op in BUILDERS:
            importlib.import_module(f"kernels.{op}.function")  # compiles nothing; checks the modules import
        print("no CUDA device: kernels, triton and the kernel modules import fine; run on a GPU to benchmark "
              "(or --smoke to exercise the bench through the interpreter)")  # fmt: skip
        return 0
    else:
        dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    torch.manual_seed(0)
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break warnings of the reference are expected noise
    failures = run(ops, dtype, device, args.smoke, not args.no_compile, args.reps)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
