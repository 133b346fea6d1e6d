"""The pure-PyTorch references: against hand-written brute force, against the model's ops.py, and the dispatch."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.apm_merge import reference as apm_ref
from kernels.moe_routing import reference as moe_ref
from kernels.window_attention import reference as wa_ref
from tests.kernels.kernel_helpers import assert_close, grads


# ------------------------------------------------------------------------------------------ brute-force oracles
def brute_window_attention(q, k, v, logit_scale, bias_table, window: int, shift: int) -> torch.Tensor:
    """Token by token in ORIGINAL coordinates: no padding, no roll, no partition; the contract's definitions."""
    b, h, w, nh, d = q.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    scale = torch.exp(torch.clamp(logit_scale.double(), max=math.log(100.0)))

    def place(y: int, x: int):
        ry, rx = (y - shift) % hp, (x - shift) % wp  # position after rolling the padded grid by -shift

        def region(r: int, p: int) -> int:
            return 0 if shift == 0 else int(r >= p - window) + int(r >= p - shift)

        return (ry // window, rx // window), (region(ry, hp), region(rx, wp)), (ry % window, rx % window)

    out = torch.zeros(b, h, w, nh, d, dtype=torch.float64)
    qn = torch.nn.functional.normalize(q.double(), dim=-1, eps=1e-12)
    kn = torch.nn.functional.normalize(k.double(), dim=-1, eps=1e-12)
    for y1 in range(h):
        for x1 in range(w):
            win1, reg1, (i1, j1) = place(y1, x1)
            keys = []
            for y2 in range(h):
                for x2 in range(w):
                    win2, reg2, (i2, j2) = place(y2, x2)
                    if win2 == win1 and reg2 == reg1:
                        keys.append((y2, x2, (i1 - i2 + window - 1) * (2 * window - 1) + (j1 - j2 + window - 1)))
            ys = torch.tensor([t[0] for t in keys])
            xs = torch.tensor([t[1] for t in keys])
            idx = torch.tensor([t[2] for t in keys])
            for hh in range(nh):
                logits = scale[hh] * (kn[:, ys, xs, hh] @ qn[:, y1, x1, hh, :, None])[..., 0]
                logits = logits + bias_table[hh, idx].double()
                out[:, y1, x1, hh] = (torch.softmax(logits, -1)[:, None, :] @ v[:, ys, xs, hh].double())[:, 0]
    return out


def brute_positions(expert: list[int], e: int) -> list[int]:
    seen = [0] * e
    pos = []
    for ex in expert:
        pos.append(seen[ex])
        seen[ex] += 1
    return pos


def wa_inputs(b, h, w, nh, d, window, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, w, nh, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    # One head above log(100): its scale is clamped (and gets no gradient).
    ls = torch.tensor([math.log(10.0), 5.0, 1.0, 2.5][:nh]).requires_grad_()
    bt = (16 * torch.sigmoid(torch.randn(nh, (2 * window - 1) ** 2, generator=g))).requires_grad_()
    return q, k, v, ls, bt


# ------------------------------------------------------------------------------------------ window attention
@pytest.mark.parametrize(
    "h,w,window,shift", [(5, 7, 4, 2), (8, 8, 4, 2), (6, 6, 3, 0), (7, 5, 3, 1), (4, 4, 4, 0), (3, 6, 2, 1)]
)
def test_window_attention_reference_matches_brute_force(h, w, window, shift):
    q, k, v, ls, bt = wa_inputs(2, h, w, 2, 5, window)
    out = wa_ref.window_attention(q, k, v, ls, bt, window, shift)
    expected = brute_window_attention(q, k, v, ls, bt, window, shift).float()
    assert_close(out, expected, torch.float32, "out")


def test_window_attention_shift_regions_by_hand():
    # 4x4 grid, window 4 -> one window; shift 2 splits it into 4 regions of 2x2 tokens (rolled coordinates
    # [0,0) empty, [0,2), [2,4)); with v = one-hot of the token's own region every output is its region's code.
    h = w = 4
    q = torch.randn(1, h, w, 1, 4)
    region = torch.zeros(h, w, dtype=torch.long)
    for y in range(h):
        for x in range(w):
            region[y, x] = int((y - 2) % 4 >= 2) * 2 + int((x - 2) % 4 >= 2)
    v = torch.nn.functional.one_hot(region, 4).float().view(1, h, w, 1, 4)
    out = wa_ref.window_attention(q, torch.randn_like(q), v, torch.zeros(1), torch.zeros(1, 49), 4, 2)
    assert torch.allclose(out, v, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h,w,window,shift", [(5, 7, 4, 2), (8, 8, 4, 0), (9, 9, 4, 2)])
def test_window_attention_reference_matches_model_ops(h, w, window, shift, dtype):
    ops = pytest.importorskip("trainer.model.ops")
    q, k, v, ls, bt = wa_inputs(2, h, w, 2, 8, window, dtype)
    go = torch.randn(q.shape).to(dtype)
    ins = [q, k, v, ls, bt]
    ours = wa_ref.window_attention(*ins, window, shift)
    theirs = ops.window_attention(*ins, window, shift)
    # ops.py runs fp16 inputs through fp16 normalisation and SDPA, the reference in fp32: allow both errors.
    factor = 1.0 if dtype == torch.float32 else 4.0
    assert_close(ours, theirs, dtype, "out", factor)
    for name, a, e in zip("q k v logit_scale bias_table".split(), grads(ours, ins, go), grads(theirs, ins, go)):
        assert_close(a, e, dtype, f"d{name}", factor)


# ------------------------------------------------------------------------------------------ APM merge
@pytest.mark.parametrize("reduce", [True, False])
def test_apm_reference_by_hand(reduce):
    x = torch.randn(2, 3, 5, 3)
    wt, bs = torch.randn(12), torch.randn(12)
    z = apm_ref.apm_merge(x, wt, bs, reduce)
    ho, wo = (2, 3) if reduce else (3, 5)
    assert z.shape == (2, ho, wo, 12)
    for b in range(2):
        for oy in range(ho):
            for ox in range(wo):
                if reduce:
                    parts = []
                    for dy, dx in [(0, 0), (1, 0), (0, 1), (1, 1)]:  # Swin's order
                        y, xx = 2 * oy + dy, 2 * ox + dx
                        parts.append(x[b, y, xx] if y < 3 and xx < 5 else torch.zeros(3))
                    vec = torch.cat(parts)
                else:
                    vec = x[b, oy, ox].repeat(4)
                expected = (vec - vec.mean()) / torch.sqrt(vec.var(unbiased=False) + 1e-5) * wt + bs
                assert torch.allclose(z[b, oy, ox], expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,reduce", [((2, 5, 7, 6), True), ((1, 4, 4, 5), False), ((1, 1, 3, 4), True)])
def test_apm_reference_matches_model_ops(shape, reduce, dtype):
    ops = pytest.importorskip("trainer.model.ops")
    c = shape[-1]
    x = torch.randn(shape).to(dtype).requires_grad_()
    wt, bs = (1 + 0.1 * torch.randn(4 * c)).requires_grad_(), (0.1 * torch.randn(4 * c)).requires_grad_()
    ours, theirs = apm_ref.apm_merge(x, wt, bs, reduce), ops.apm_merge(x, wt, bs, reduce)
    go = torch.randn(ours.shape).to(dtype)
    assert_close(ours, theirs, dtype, "z")
    for name, a, e in zip(["x", "w", "b"], grads(ours, [x, wt, bs], go), grads(theirs, [x, wt, bs], go)):
        assert_close(a, e, dtype, f"d{name}")


# ------------------------------------------------------------------------------------------ routing
def test_route_reference_by_hand():
    torch.manual_seed(0)
    x, wg = torch.randn(50, 8), torch.randn(4, 8)
    x[:, 0], wg[3, 0] = 1.0, -50.0  # expert 3 never wins: an empty expert
    r = moe_ref.top1_route(x, wg, capacity=6)
    logits = x.double() @ wg.double().t()
    probs = torch.softmax(logits, -1)
    expert = probs.argmax(-1)
    assert torch.equal(r.expert, expert)
    assert r.counts.tolist() == [int((expert == e).sum()) for e in range(4)] and r.counts[3] == 0
    assert r.position.tolist() == brute_positions(expert.tolist(), 4)
    assert r.kept.tolist() == [p < 6 for p in r.position.tolist()]
    assert r.dropped == 50 - sum(min(int(c), 6) for c in r.counts)
    assert torch.allclose(r.gate.double(), probs.max(-1).values, atol=1e-6)
    aux = 4 * sum(r.counts[e] / 50 * probs[:, e].mean() for e in range(4))
    assert math.isclose(r.aux_loss.item(), float(aux), rel_tol=1e-5)
    assert math.isclose(r.z_loss.item(), float(torch.logsumexp(logits, -1).square().mean()), rel_tol=1e-5)
    assert moe_ref.top1_route(x, wg, capacity=1, drop_tokens=False).kept.all()


def test_dispatch_combine_reference_by_hand():
    x = torch.randn(5, 3, requires_grad=True)
    expert, position = torch.tensor([1, 0, 1, 1, 0]), torch.tensor([0, 0, 1, 2, 1])
    kept = position < 2
    buf = moe_ref.moe_dispatch(x, expert, position, kept, 2, 2)
    expected = torch.stack([torch.stack([x[1], x[4]]), torch.stack([x[0], x[2]])])
    assert torch.equal(buf, expected)
    gate = torch.rand(5, requires_grad=True)
    out = moe_ref.moe_combine(buf, expert, position, kept, gate)
    assert torch.allclose(out, x * gate[:, None] * kept[:, None])
    out.sum().backward()
    assert torch.allclose(x.grad, (gate * kept)[:, None].expand(5, 3).detach())
    assert torch.allclose(gate.grad, (x * kept[:, None]).sum(1).detach())
    empty = moe_ref.moe_combine(torch.zeros(2, 0, 3), expert, position, torch.zeros(5, dtype=torch.bool), gate)
    assert torch.equal(empty, torch.zeros(5, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d,e,capacity,drop", [(37, 16, 4, 8, True), (130, 24, 8, 12, True), (70, 16, 4, 70, False)])
def test_routing_reference_matches_model_ops(n, d, e, capacity, drop, dtype):
    ops = pytest.importorskip("trainer.model.ops")
    torch.manual_seed(1)
    x = torch.randn(n, d).to(dtype).requires_grad_()
    wg = torch.randn(e, d, requires_grad=True)
    ours, theirs = moe_ref.top1_route(x, wg, capacity, drop), ops.top1_route(x, wg, capacity, drop)
    for f in ("expert", "position", "kept", "counts"):
        assert torch.equal(getattr(ours, f), getattr(theirs, f)), f
    assert ours.dropped == theirs.dropped
    loss = [(r.gate * torch.linspace(-1, 1, n)).sum() + 3 * r.aux_loss + 2 * r.z_loss for r in (ours, theirs)]
    for name, a, b in zip(["x", "wg"], grads(loss[0], [x, wg], None), grads(loss[1], [x, wg], None)):
        assert_close(a, b, dtype, f"d{name}")
    xs = torch.randn(n, d).to(dtype).requires_grad_()
    bufs = [m.moe_dispatch(xs, ours.expert, ours.position, ours.kept, e, capacity) for m in (moe_ref, ops)]
    assert torch.equal(bufs[0], bufs[1])
    y = torch.randn(e, capacity, d).to(dtype).requires_grad_()
    gate = ours.gate.detach().requires_grad_()
    outs = [m.moe_combine(y, ours.expert, ours.position, ours.kept, gate) for m in (moe_ref, ops)]
    go = torch.randn(n, d).to(dtype)
    assert_close(outs[0], outs[1], dtype, "combine")
    for name, a, b in zip(["y", "gate"], grads(outs[0], [y, gate], go), grads(outs[1], [y, gate], go)):
        assert_close(a, b, dtype, f"d{name}")


# ------------------------------------------------------------------------------------------ dispatch
def test_dispatch_backend_switch(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    kernels.set_backend(None)
    assert kernels.get_backend() == "auto"
    x = torch.randn(4, 6)
    assert not kernels.use_triton(x)  # CPU tensor under auto: the reference
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.get_backend() == "reference"
    try:
        kernels.set_backend("auto")  # the programmatic switch wins over the environment
        assert kernels.get_backend() == "auto"
        with pytest.raises(ValueError):
            kernels.set_backend("cuda")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        kernels.set_backend("triton")
        if kernels.triton_available():
            with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
                kernels.use_triton(x)
    finally:
        kernels.set_backend(None)
    monkeypatch.setenv(kernels.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        kernels.get_backend()


def test_dispatch_auto_on_cpu_is_the_reference():
    q, k, v, ls, bt = wa_inputs(1, 5, 6, 2, 4, 3)
    assert torch.equal(kernels.window_attention(q, k, v, ls, bt, 3, 1), wa_ref.window_attention(q, k, v, ls, bt, 3, 1))
    x = torch.randn(1, 3, 3, 4)
    w, b = torch.ones(16), torch.zeros(16)
    assert torch.equal(kernels.apm_merge(x, w, b, True), apm_ref.apm_merge(x, w, b, True))
    r = kernels.top1_route(torch.randn(9, 4), torch.randn(3, 4), 2)
    assert isinstance(r, kernels.Route) and r.expert.shape == (9,)


def test_importing_kernels_does_not_import_triton():
    code = "import sys, kernels, kernels.window_attention; assert 'triton' not in sys.modules, 'triton imported'"
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo)
    assert res.returncode == 0, res.stderr[-2000:]


def test_dispatch_runs_on_meta_tensors():
    # The paper-scale model is inspected on the meta device: every op must trace there (auto -> reference).
    m = "meta"
    q = torch.empty(2, 9, 9, 2, 8, device=m)
    assert (
        kernels.window_attention(q, q, q, torch.zeros(2, device=m), torch.zeros(2, 49, device=m), 4, 2).shape == q.shape
    )
    z = kernels.apm_merge(torch.empty(2, 5, 5, 6, device=m), torch.ones(24, device=m), torch.zeros(24, device=m), True)
    assert z.shape == (2, 3, 3, 24)
    x = torch.empty(30, 8, device=m)
    r = kernels.top1_route(x, torch.empty(4, 8, device=m), 10)
    buf = kernels.moe_dispatch(x, r.expert, r.position, r.kept, 4, 10)
    assert buf.shape == (4, 10, 8) and kernels.moe_combine(buf, r.expert, r.position, r.kept, r.gate).shape == (30, 8)
