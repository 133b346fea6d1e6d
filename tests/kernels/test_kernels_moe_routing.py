"""Triton top-1 routing, dispatch and combine (interpreter on CPU; bf16 on CUDA only) against the reference."""

from __future__ import annotations

import pytest
import torch

from kernels.moe_routing import reference as moe_ref
from tests.kernels.kernel_helpers import assert_close, grads


def route_inputs(n, d, e, dtype, device="cpu", empty_expert=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    wg = torch.randn(e, d, generator=g)
    if empty_expert:  # a constant feature that expert e-1 weighs by -50: it never wins, receives no token
        x[:, 0] = 1.0
        wg[e - 1, 0] = -50.0
    x = x.to(dtype)
    # Drop near-ties: the kernel's fp32 dot sums in another order than torch's matmul and may flip them.
    top2 = torch.softmax(x.double() @ wg.double().t(), -1).topk(2, dim=-1).values
    x = x[top2[:, 0] - top2[:, 1] > 1e-4]
    return x.to(device).requires_grad_(), wg.to(device).requires_grad_()


def check_route(fn, n, d, e, capacity, drop, dtype, device="cpu", empty_expert=False):
    x, wg = route_inputs(n, d, e, dtype, device, empty_expert)
    n = x.shape[0]
    r, ref = fn.top1_route(x, wg, capacity, drop), moe_ref.top1_route(x, wg, capacity, drop)
    for f in ("expert", "position", "kept", "counts"):
        a, b = getattr(r, f), getattr(ref, f)
        assert a.dtype == b.dtype and torch.equal(a, b), f
    assert r.dropped == ref.dropped
    if empty_expert:
        assert r.counts[e - 1] == 0
    assert_close(r.gate, ref.gate, torch.float32, "gate")
    assert_close(r.aux_loss, ref.aux_loss, torch.float32, "aux_loss")
    assert_close(r.z_loss, ref.z_loss, torch.float32, "z_loss")
    w = torch.linspace(-1, 1, n, device=device)
    losses = [(t.gate * w).sum() + 3 * t.aux_loss + 0.5 * t.z_loss for t in (r, ref)]
    for name, a, b in zip(("x", "gate_weight"), grads(losses[0], [x, wg], None), grads(losses[1], [x, wg], None)):
        assert_close(a, b, dtype, f"d{name}")
    return ref, n


def check_dispatch_combine(fn, route, n, d, e, capacity, dtype, device="cpu"):
    g = torch.Generator().manual_seed(3)
    args = (route.expert, route.position, route.kept)
    x = torch.randn(n, d, generator=g).to(dtype).to(device).requires_grad_()
    buf, ref = fn.moe_dispatch(x, *args, e, capacity), moe_ref.moe_dispatch(x, *args, e, capacity)
    assert buf.shape == (e, capacity, d) and torch.equal(buf, ref)  # pure copies: bit-exact
    gb = torch.randn(buf.shape, generator=g).to(dtype).to(device)
    assert torch.equal(grads(buf, [x], gb)[0], grads(ref, [x], gb)[0])
    y = torch.randn(e, capacity, d, generator=g).to(dtype).to(device).requires_grad_()
    gate = route.gate.detach().clone().requires_grad_()
    out, ref = fn.moe_combine(y, *args, gate), moe_ref.moe_combine(y, *args, gate)
    assert_close(out, ref, dtype, "combine")
    go = torch.randn(out.shape, generator=g).to(dtype).to(device)
    for name, a, b in zip(("y", "gate"), grads(out, [y, gate], go), grads(ref, [y, gate], go)):
        assert_close(a, b, dtype, f"d{name}")


# (N, D, E, capacity, drop_tokens, empty_expert): no overflow, overflow, no dropping, capacity 0,
# N not a multiple of the 64-token block with an expert that receives nothing, 300 tokens over 5 blocks.
CASES = [
    (37, 16, 4, 16, True, False),
    (130, 24, 8, 12, True, False),
    (70, 16, 4, 70, False, False),
    (20, 16, 4, 0, True, False),
    (101, 20, 5, 30, True, True),
    (300, 48, 8, 30, True, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_routing(interpret, case, dtype):
    fn = interpret("moe_routing")
    n, d, e, capacity, drop, empty = case
    route, n = check_route(fn, n, d, e, capacity, drop, dtype, empty_expert=empty)
    check_dispatch_combine(fn, route, n, d, e, capacity, dtype)


def test_routing_gate_only_gradient(interpret):
    # Only the gate is used downstream (aux/z unused): the backward must treat the missing gradients as zeros.
    fn = interpret("moe_routing")
    x, wg = route_inputs(40, 16, 4, torch.float32)
    g1 = grads(fn.top1_route(x, wg, 20).gate.sum(), [x, wg], None)
    g2 = grads(moe_ref.top1_route(x, wg, 20).gate.sum(), [x, wg], None)
    for a, b in zip(g1, g2):
        assert_close(a, b, torch.float32, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", [(8192, 1408, 8, 1280, True, False), (3001, 352, 8, 400, True, True)])
def test_routing_cuda(cuda_kernels, case, dtype):
    fn = cuda_kernels("moe_routing")
    n, d, e, capacity, drop, empty = case
    route, n = check_route(fn, n, d, e, capacity, drop, dtype, device="cuda", empty_expert=empty)
    check_dispatch_combine(fn, route, n, d, e, capacity, dtype, device="cuda")
