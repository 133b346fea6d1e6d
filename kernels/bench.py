"""Benchmark the Triton kernels against the PyTorch path the model falls back to: `python -m kernels.bench`.

For each op at paper shapes (a micro-batch of 8 HR images of 512 px: 128 x 128 tokens at stage 1, C 352 / 704 with
head dim 32 and window 8, APM 1-3, MoE routing of stages 3-4 with their prompt tokens, 8 experts) it prints the time
per call, achieved TFLOP/s and GB/s (bytes that must move: inputs read once, outputs written once), the fraction of
the device's peak for the op's binding roofline (HBM bandwidth: every op here is memory-bound, see the kernels'
docstrings), the max error against the fallback, and the speed-ups over the fallback (`trainer/model/ops.py` with
the kernels switched off: what `train.kernels=auto` runs when the smoke launch fails, and on CPU) and over
torch.compile of it, measured side by side in one run. Then it repeats the window-attention backward at each
paper shape and reports the run-to-run drift of the atomically accumulated gradients (bias table, logit scale;
q/k/v gradients must be bitwise identical). `--json PATH` writes every number.

`--no-compile` is the quick mode (no torch.compile baseline: its compiles take minutes at these shapes). Without
CUDA it checks that everything imports and exits 0. `--smoke` runs the whole measuring path on CPU through Triton's
interpreter at toy shapes (what the tests do), so the bench itself is exercised where no GPU exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    """One benchmarked call: Triton, the model's PyTorch fallback, torch.compile(fallback); FLOPs and bytes."""

    op: str
    shape: str
    flops: float
    bytes: float
    triton: Callable[[], object]
    fallback: Callable[[], object]
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
def _window_inputs(b, h, w, nh, d, window, dtype, device):
    """Seeded qkv leaf and its q, k, v views, logit scale and bias table; the generator goes on for grad outputs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    qkv = torch.randn(b, h, w, 3, nh, d, generator=g).to(device, dtype).requires_grad_()
    q, k, v = qkv.unbind(3)
    ls = torch.full((nh,), math.log(10.0), device=device, requires_grad=True)
    bt = (16 * torch.sigmoid(torch.randn(nh, (2 * window - 1) ** 2, generator=g))).to(device).requires_grad_()
    return g, qkv, q, k, v, ls, bt


def window_cases(shapes, dtype, device, compile_ref: bool) -> list[Case]:
    wa = importlib.import_module("kernels.window_attention.function")
    ref = importlib.import_module("trainer.model.ops").window_attention  # the model's fallback
    cref = _maybe_compile(ref, compile_ref)
    cases = []
    for b, h, w, nh, d, window, shift in shapes:
        g, qkv, q, k, v, ls, bt = _window_inputs(b, h, w, nh, d, window, dtype, device)
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
            triton=lambda a=args: wa.window_attention(*a), fallback=lambda a=args: ref(*a),
            compiled=(lambda a=args: cref(*a)) if cref else None, error=err,
        ))  # fmt: skip
        cases.append(Case(
            op="window_attention fwd+bwd", shape=shape, flops=14.0 * pairs, bytes=11.0 * tokens * elt,
            triton=_fwd_bwd(lambda a=args: wa.window_attention(*a), leaves),
            fallback=_fwd_bwd(lambda a=args: ref(*a), leaves),
            compiled=_fwd_bwd(lambda a=args: cref(*a), leaves) if cref else None, error=err,
        ))  # fmt: skip
    return cases


def apm_cases(shapes, dtype, device, compile_ref: bool) -> list[Case]:
    apm = importlib.import_module("kernels.apm_merge.function")
    ref = importlib.import_module("trainer.model.ops").apm_merge
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
            triton=lambda a=args: apm.apm_merge(*a), fallback=lambda a=args: ref(*a),
            compiled=(lambda a=args: cref(*a)) if cref else None, error=err,
        ))  # fmt: skip
        cases.append(Case(
            op="apm_merge fwd+bwd", shape=shape, flops=25.0 * m * 4 * c, bytes=3 * read + 2 * write,
            triton=_fwd_bwd(lambda a=args: apm.apm_merge(*a), [x, wt, bs]),
            fallback=_fwd_bwd(lambda a=args: ref(*a), [x, wt, bs]),
            compiled=_fwd_bwd(lambda a=args: cref(*a), [x, wt, bs]) if cref else None, error=err,
        ))  # fmt: skip
    return cases


def routing_cases(shapes, dtype, device, compile_ref: bool) -> list[Case]:
    fn = importlib.import_module("kernels.moe_routing.function")
    refm = importlib.import_module("trainer.model.ops")  # top1_route, moe_dispatch, moe_combine
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
        fallback=_fwd_bwd(lambda: refm.top1_route(x, wg, cap), [x, wg], loss),
        compiled=_fwd_bwd(lambda: c_route(x, wg, cap), [x, wg], loss) if c_route else None,
        error=lambda: _max_err(fn.top1_route(x, wg, cap).gate, refm.top1_route(x, wg, cap).gate),
    ))  # fmt: skip
    idx = (r.expert, r.position, r.kept)
    xs = x.detach().requires_grad_()
    cases.append(Case(
        op="moe_dispatch fwd+bwd", shape=label, flops=0.0, bytes=2.0 * (kept * d + e * cap * d) * elt,
        triton=_fwd_bwd(lambda: fn.moe_dispatch(xs, *idx, e, cap), [xs]),
        fallback=_fwd_bwd(lambda: refm.moe_dispatch(xs, *idx, e, cap), [xs]),
        compiled=_fwd_bwd(lambda: c_disp(xs, *idx, e, cap), [xs]) if c_disp else None,
        error=lambda: _max_err(fn.moe_dispatch(xs, *idx, e, cap), refm.moe_dispatch(xs, *idx, e, cap)),
    ))  # fmt: skip
    y = torch.randn(e, cap, d, generator=g).to(device, dtype).requires_grad_()
    gate = r.gate.detach().requires_grad_()
    cases.append(Case(
        op="moe_combine fwd+bwd", shape=label, flops=2.0 * n * d, bytes=(3.0 * kept * d + 2.0 * n * d) * elt,
        triton=_fwd_bwd(lambda: fn.moe_combine(y, *idx, gate), [y, gate]),
        fallback=_fwd_bwd(lambda: refm.moe_combine(y, *idx, gate), [y, gate]),
        compiled=_fwd_bwd(lambda: c_comb(y, *idx, gate), [y, gate]) if c_comb else None,
        error=lambda: _max_err(fn.moe_combine(y, *idx, gate), refm.moe_combine(y, *idx, gate)),
    ))  # fmt: skip
    return cases


# Paper shapes, as the huge model calls each op on a micro-batch of 8 HR images of 512 px (recorded from a forward of
# `huge_model()` on the meta device, tests/kernels/test_kernels_bench.py): stages 1-2 window attention (128x128 and
# 64x64 tokens, 11 and 22 heads of 32, window 8, plain and shifted), APM 1-3 (C 352, 704, 1408, HR reduce), MoE in
# the last 4 blocks of stage 3 (32x32 tokens + 4 prompts per image, D 1408) and stage 4 (16x16 + 4, D 2816),
# 8 experts, capacity factor 1.25.
PAPER = dict(
    window_attention=[(8, 128, 128, 11, 32, 8, 0), (8, 128, 128, 11, 32, 8, 4), (8, 64, 64, 22, 32, 8, 0),
                      (8, 64, 64, 22, 32, 8, 4)],
    apm_merge=[(8, 128, 128, 352, True), (8, 64, 64, 704, True), (8, 32, 32, 1408, True)],
    moe_routing=[(8224, 1408, 8, 1.25), (2080, 2816, 8, 1.25)],
)  # fmt: skip
SMOKE = dict(
    window_attention=[(1, 5, 7, 2, 8, 4, 2)],
    apm_merge=[(1, 5, 7, 6, True)],
    moe_routing=[(70, 16, 4, 1.0), (37, 8, 4, 2.0)],
)
BUILDERS = dict(window_attention=window_cases, apm_merge=apm_cases, moe_routing=routing_cases)


def _fmt_speedup(base: float | None, t: float) -> str:
    return f"{base / t:6.2f}x" if base else "    n/a"


def _rel_drift(runs: list[torch.Tensor]) -> float:
    """Max |g_i - g_0| / max |g_0| over repeated computations of one gradient."""
    base = runs[0].double()
    scale = max(base.abs().max().item(), 1e-30)
    return max(((r.double() - base).abs().max().item() for r in runs[1:]), default=0.0) / scale


def window_drift(shapes, dtype, device, reps: int) -> list[dict]:
    """Repeat the Triton window-attention backward `reps` times on identical inputs: run-to-run drift per gradient.

    d logit_scale and d bias_table are accumulated with atomics (order varies from run to run); dq, dk, dv are
    written by one program each and must be bitwise identical.
    """
    wa = importlib.import_module("kernels.window_attention.function")
    rows = []
    for b, h, w, nh, d, window, shift in shapes:
        g, qkv, q, k, v, ls, bt = _window_inputs(b, h, w, nh, d, window, dtype, device)
        out = wa.window_attention(q, k, v, ls, bt, window, shift)
        go = torch.randn(out.shape, generator=g).to(device, dtype)
        grads = [torch.autograd.grad(out, [qkv, ls, bt], go, retain_graph=True) for _ in range(max(2, reps))]
        rows.append({
            "shape": f"B{b} {h}x{w} nh{nh} d{d} w{window} s{shift}", "reps": len(grads),
            "bias_table": _rel_drift([g_[2] for g_ in grads]), "logit_scale": _rel_drift([g_[1] for g_ in grads]),
            "qkv_bitwise_identical": all(torch.equal(g_[0], grads[0][0]) for g_ in grads[1:]),
        })  # fmt: skip
    return rows


def run(
    ops: list[str],
    dtype: torch.dtype,
    device: torch.device,
    smoke: bool,
    compile_ref: bool,
    reps: int,
    drift_reps: int = 5,
) -> dict:
    """Measure every case of `ops`; print the table; return the report (rows, drift, failures)."""
    import kernels

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    peak = device_peak(name) if device.type == "cuda" else None
    print(f"device: {name}")
    if peak:
        print(f"peak: {peak[0]:.0f} TFLOP/s bf16 dense, {peak[1]:.2f} TB/s HBM (%peak below: of HBM bandwidth)")
    else:
        print("peak: unknown peak for this device (no %peak column)")
    print(f"dtype: {dtype}, torch {torch.__version__}, compile baseline: {'on' if compile_ref else 'off'}")
    print("baseline: trainer/model/ops.py with the kernels off (the path train.kernels=auto falls back to)")
    report = {"device": name, "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
              "shapes": "smoke" if smoke else "paper", "compile_baseline": compile_ref, "rows": [], "drift": [],
              "failures": 0}  # fmt: skip
    timer = _timer(device, reps)
    header = f"{'op':26s} {'shape':32s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} {'%peak':>6s} {'err':>8s}"
    print(header + f" {'vs torch':>8s} {'vs compile':>10s}")
    previous = kernels._backend  # restored afterwards (None: back to $SKYSENSE_KERNELS)
    kernels.set_backend("reference")  # the fallback lambdas run ops.py's own path; Triton is called directly
    try:
        for op in ops:
            for case in BUILDERS[op](SMOKE[op] if smoke else PAPER[op], dtype, device, compile_ref):
                row = {"op": case.op, "shape": case.shape}
                report["rows"].append(row)
                try:
                    t = timer(case.triton)
                    err = case.error()
                    t_ref = timer(case.fallback)
                    t_cmp = None
                    if case.compiled is not None:
                        try:
                            t_cmp = timer(case.compiled)
                        except Exception as exc:  # a compile failure must not hide the kernel's numbers
                            row["compile_error"] = f"{type(exc).__name__}: {exc}"[:300]
                            print(f"  torch.compile baseline failed for {case.op}: {row['compile_error']}")
                except Exception as exc:
                    report["failures"] += 1
                    row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                    print(f"{case.op:26s} {case.shape:32s} FAILED: {row['error']}")
                    continue
                gbs = case.bytes / t / 1e9
                pct = f"{100 * gbs / (peak[1] * 1e3):5.1f}%" if peak else "   n/a"
                row.update(ms=t * 1e3, tflops=case.flops / t / 1e12, gbs=gbs, max_rel_err=err, ms_torch=t_ref * 1e3,
                           ms_compile=None if t_cmp is None else t_cmp * 1e3, speedup_torch=t_ref / t,
                           speedup_compile=None if t_cmp is None else t_cmp / t,
                           pct_peak_hbm=100 * gbs / (peak[1] * 1e3) if peak else None)  # fmt: skip
                print(
                    f"{case.op:26s} {case.shape:32s} {t * 1e3:9.3f} {case.flops / t / 1e12:8.2f} {gbs:8.1f} "
                    f"{pct:>6s} {err:8.1e} {_fmt_speedup(t_ref, t):>8s} {_fmt_speedup(t_cmp, t):>10s}"
                )
        if drift_reps > 0 and "window_attention" in ops:
            print(f"run-to-run drift of the window-attention backward ({max(2, drift_reps)} repeats, max |g_i - g_0|"
                  " / max |g_0|):")  # fmt: skip
            try:
                report["drift"] = window_drift(SMOKE["window_attention"] if smoke else PAPER["window_attention"],
                                               dtype, device, drift_reps)  # fmt: skip
            except Exception as exc:
                report["failures"] += 1
                report["drift_error"] = f"{type(exc).__name__}: {exc}"[:400]
                print(f"  FAILED: {report['drift_error']}")
            for r in report["drift"]:
                same = "bitwise identical" if r["qkv_bitwise_identical"] else "NOT bitwise identical"
                print(f"  {r['shape']:32s} d bias_table {r['bias_table']:8.1e}  d logit_scale {r['logit_scale']:8.1e}"
                      f"  dq/dk/dv {same}")  # fmt: skip
                if not r["qkv_bitwise_identical"]:
                    report["failures"] += 1
    finally:
        kernels.set_backend(previous)
    return report


def _write(path: str | None, report: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="window_attention,apm_merge,moe_routing", help="comma-separated op names")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--smoke", action="store_true", help="toy shapes on CPU through TRITON_INTERPRET=1 (fp32)")
    p.add_argument("--no-compile", action="store_true", help="quick mode: skip the torch.compile(fallback) baseline")
    p.add_argument("--reps", type=int, default=5, help="timing repetitions (CPU) / scale of do_bench's budget")
    p.add_argument("--drift-reps", type=int, default=5, help="repeated window-attention backwards (0: no drift)")
    p.add_argument("--json", help="write the report (rows, drift, failures) to this file")
    args = p.parse_args(argv)
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - set(BUILDERS)
    if unknown:
        p.error(f"unknown ops {sorted(unknown)}; choose from {sorted(BUILDERS)}")
    import kernels  # noqa: F401  (the dispatch package must import on any machine)

    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: nothing to benchmark (kernels imported fine, reference path only)")
        _write(args.json, {"skipped": "triton is not installed", "rows": [], "drift": [], "failures": 0})
        return 0
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported below
        dtype, device = torch.float32, torch.device("cpu")  # the interpreter is wrong for bf16
    elif not torch.cuda.is_available():
        for op in BUILDERS:
            importlib.import_module(f"kernels.{op}.function")  # compiles nothing; checks the modules import
        print("no CUDA device: kernels, triton and the kernel modules import fine; run on a GPU to benchmark "
              "(or --smoke to exercise the bench through the interpreter)")  # fmt: skip
        _write(args.json, {"skipped": "no CUDA device", "rows": [], "drift": [], "failures": 0})
        return 0
    else:
        dtype, device = getattr(torch, args.dtype), torch.device("cuda")
    torch.manual_seed(0)
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break warnings of the fallback are expected noise
    report = run(ops, dtype, device, args.smoke, not args.no_compile, args.reps, args.drift_reps)
    _write(args.json, report)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
