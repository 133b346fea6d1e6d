"""Smoke launch of every Triton kernel on one device and dtype: tiny shapes, forward and backward, against the
references. `kernels.use_triton` runs it once per (device, dtype) before `auto` first picks Triton, so a kernel that
cannot load (e.g. "device kernel image is invalid": a cubin from Triton's bundled ptxas, newer than the driver) or
that returns garbage sends the run to the PyTorch path with one warning instead of crashing it mid-step.

It runs in a thread of its own: grad mode, autocast, saved-tensor hooks (activation checkpointing) and dispatch
modes (FlopCounterMode) are thread-local, so a smoke started inside the model's forward sees none of them. Inputs
come from a private generator: the training RNG is untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import threading
import traceback

import torch

OPS = ("window_attention", "apm_merge", "moe_routing")
# max |error| / max |expected|: loose on purpose (a failed kernel gives NaN or O(1) errors, not 1e-2).
TOL = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 0.25}


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return math.inf
    if not torch.isfinite(a).all():
        return math.inf
    return (a - e).abs().max().item() / max(e.abs().max().item(), 1e-3) if e.numel() else 0.0


def _compare(what: str, outs: list[torch.Tensor], refs: list[torch.Tensor], dtype: torch.dtype) -> None:
    for i, (a, e) in enumerate(zip(outs, refs, strict=True)):
        err = _rel_err(a, e)
        if not err <= TOL[dtype]:
            raise AssertionError(f"{what}: tensor {i} differs from the reference (relative error {err:.3g})")


def _fwd_bwd(fn, leaves: list[torch.Tensor], out_of, seed: int) -> list[torch.Tensor]:
    out = out_of(fn())
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, go, allow_unused=True)
    return [out] + [torch.zeros_like(x) if d is None else d for x, d in zip(leaves, grads, strict=True)]


def _window_attention(device: torch.device, dtype: torch.dtype) -> None:
    fn = importlib.import_module("kernels.window_attention.function")
    ref = importlib.import_module("kernels.window_attention.reference")
    g = torch.Generator().manual_seed(0)
    b, h, w, nh, d, window, shift = 1, 6, 5, 2, 16, 4, 2  # padding and a shift: every masking branch
    q, k, v = (torch.randn(b, h, w, nh, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    ls = torch.full((nh,), math.log(10.0), device=device, requires_grad=True)
    bt = (16 * torch.sigmoid(torch.randn(nh, (2 * window - 1) ** 2, generator=g))).to(device).requires_grad_()
    leaves = [q, k, v, ls, bt]
    got = _fwd_bwd(lambda: fn.window_attention(q, k, v, ls, bt, window, shift), leaves, lambda o: o, 1)
    want = _fwd_bwd(lambda: ref.window_attention(q, k, v, ls, bt, window, shift), leaves, lambda o: o, 1)
    _compare("window_attention", got, want, dtype)


def _apm_merge(device: torch.device, dtype: torch.dtype) -> None:
    fn = importlib.import_module("kernels.apm_merge.function")
    ref = importlib.import_module("kernels.apm_merge.reference")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 5, 6, 8, generator=g).to(device, dtype).requires_grad_()
    wt = (1 + 0.1 * torch.randn(32, generator=g)).to(device).requires_grad_()
    bs = (0.1 * torch.randn(32, generator=g)).to(device).requires_grad_()
    got = _fwd_bwd(lambda: fn.apm_merge(x, wt, bs, True), [x, wt, bs], lambda o: o, 2)
    want = _fwd_bwd(lambda: ref.apm_merge(x, wt, bs, True), [x, wt, bs], lambda o: o, 2)
    _compare("apm_merge", got, want, dtype)


def _moe_routing(device: torch.device, dtype: torch.dtype) -> None:
    fn = importlib.import_module("kernels.moe_routing.function")
    ref = importlib.import_module("kernels.moe_routing.reference")
    g = torch.Generator().manual_seed(0)
    n, d, e, cap = 40, 16, 4, 8  # capacity below N/E: some tokens are dropped
    x = torch.randn(n, d, generator=g).to(device, dtype).requires_grad_()
    wg = torch.randn(e, d, generator=g).to(device).requires_grad_()

    def route(mod):
        r = mod.top1_route(x, wg, cap)
        return torch.cat([r.gate, (r.aux_loss + r.z_loss).reshape(1)])

    _compare("top1_route", _fwd_bwd(lambda: route(fn), [x, wg], lambda o: o, 3),
             _fwd_bwd(lambda: route(ref), [x, wg], lambda o: o, 3), dtype)  # fmt: skip
    r = ref.top1_route(x.detach(), wg.detach(), cap)
    got, want = fn.top1_route(x.detach(), wg.detach(), cap), r
    for name in ("expert", "position", "kept", "counts"):
        if not torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()):
            raise AssertionError(f"top1_route: {name} differs from the reference")
    idx = (r.expert, r.position, r.kept)
    xs = x.detach().requires_grad_()
    _compare("moe_dispatch", _fwd_bwd(lambda: fn.moe_dispatch(xs, *idx, e, cap), [xs], lambda o: o, 4),
             _fwd_bwd(lambda: ref.moe_dispatch(xs, *idx, e, cap), [xs], lambda o: o, 4), dtype)  # fmt: skip
    y = torch.randn(e, cap, d, generator=g).to(device, dtype).requires_grad_()
    gate = r.gate.detach().requires_grad_()
    _compare("moe_combine", _fwd_bwd(lambda: fn.moe_combine(y, *idx, gate), [y, gate], lambda o: o, 5),
             _fwd_bwd(lambda: ref.moe_combine(y, *idx, gate), [y, gate], lambda o: o, 5), dtype)  # fmt: skip


CHECKS = {"window_attention": _window_attention, "apm_merge": _apm_merge, "moe_routing": _moe_routing}


def _run(device: torch.device, dtype: torch.dtype, ops: tuple[str, ...]) -> dict[str, str | None]:
    results: dict[str, str | None] = {}
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for op in ops:
            try:
                CHECKS[op](device, dtype)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # surface asynchronous launch errors here, not in training
                results[op] = None
            except Exception as exc:  # any failure means: do not use this kernel
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                results[op] = last[:500]
    return results


def run(device: torch.device | str, dtype: torch.dtype, ops: tuple[str, ...] = OPS) -> dict[str, str | None]:
    """Smoke-launch each op's kernels (fwd + bwd vs reference) in a clean thread: {op: None if ok else reason}."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    box: dict[str, dict] = {}

    def target():
        try:
            box["result"] = _run(device, dtype, ops)
        except BaseException as exc:  # noqa: BLE001 - reported, never raised into the training step
            box["result"] = {op: f"{type(exc).__name__}: {exc}"[:500] for op in ops}

    thread = threading.Thread(target=target, name="skysense-kernel-smoke", daemon=True)
    thread.start()
    thread.join()
    return box.get("result", {op: "smoke thread died without a result" for op in ops})
