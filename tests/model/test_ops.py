"""The hot-op contract (trainer/model/ops.py) against brute-force references written independently here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from trainer.model import ops


# ----------------------------------------------------------------------------------------- window attention
def brute_mask_and_bias_index(h: int, w: int, window: int, shift: int):
    """Token-level (HW, HW) "may attend" mask and relative-position index, by looping over token pairs.

    Built the way Swin describes it: pad to Hp, Wp, roll by -shift, a token's window is its rolled coordinate //
    window, and its region along each axis is 0 below Hp-window, 1 below Hp-shift, else 2 (shift > 0 only).
    """
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window

    def place(i, j):
        ri, rj = (i - shift) % hp, (j - shift) % wp

        def region(r, p):
            if shift == 0:
                return 0
            return 0 if r < p - window else (1 if r < p - shift else 2)

        return (ri // window, rj // window), (region(ri, hp), region(rj, wp)), (ri % window, rj % window)

    n = h * w
    mask = torch.zeros(n, n, dtype=torch.bool)
    index = torch.zeros(n, n, dtype=torch.long)
    for a in range(n):
        wa, ra, la = place(a // w, a % w)
        for b in range(n):
            wb, rb, lb = place(b // w, b % w)
            if wa == wb and ra == rb:
                mask[a, b] = True
                index[a, b] = (la[0] - lb[0] + window - 1) * (2 * window - 1) + (la[1] - lb[1] + window - 1)
    return mask, index


def dense_reference(q, k, v, logit_scale, bias_table, window, shift):
    """Full attention over all H*W tokens with the brute-force block mask; fp64."""
    b, h, w, nh, d = q.shape
    mask, index = brute_mask_and_bias_index(h, w, window, shift)
    qf, kf, vf = (t.double().reshape(b, h * w, nh, d).transpose(1, 2) for t in (q, k, v))
    scale = torch.exp(torch.clamp(logit_scale.double(), max=math.log(100.0)))
    logits = (F.normalize(qf, dim=-1) @ F.normalize(kf, dim=-1).transpose(-1, -2)) * scale.view(1, nh, 1, 1)
    logits = logits + bias_table.double()[:, index]
    logits = logits.masked_fill(~mask, float("-inf"))
    out = torch.softmax(logits, -1) @ vf
    return out.transpose(1, 2).reshape(b, h, w, nh, d)


@pytest.mark.parametrize(
    "h,w,window,shift", [(8, 8, 4, 0), (8, 8, 4, 2), (6, 9, 4, 2), (5, 5, 4, 0), (7, 10, 3, 1), (3, 3, 3, 0)]
)
def test_window_attention_equals_masked_full_attention(h, w, window, shift):
    torch.manual_seed(0)
    b, nh, d = 2, 3, 8
    q, k, v = (torch.randn(b, h, w, nh, d, requires_grad=True) for _ in range(3))
    logit_scale = torch.tensor([math.log(10.0), math.log(200.0), 0.5], requires_grad=True)  # one above the clamp
    table = (16 * torch.sigmoid(torch.randn(nh, (2 * window - 1) ** 2))).requires_grad_()
    out = ops.window_attention(q, k, v, logit_scale, table, window, shift)
    ref = dense_reference(q, k, v, logit_scale, table, window, shift)
    assert out.shape == (b, h, w, nh, d)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, logit_scale, table), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v, logit_scale, table), g.double())
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), r.double(), atol=5e-5, rtol=1e-4)
    assert grads[3][1].abs() == 0  # clamped logit scale gets no gradient


@pytest.mark.parametrize("h,w,window,shift", [(8, 8, 4, 2), (6, 9, 4, 2), (12, 8, 4, 2), (9, 9, 3, 1)])
def test_shifted_window_mask_equals_brute_force(h, w, window, shift):
    region = ops.window_region_ids(h, w, window, shift)
    hp, wp = math.ceil(h / window) * window, math.ceil(w / window) * window
    mask = ops.window_attention_mask(h, w, window, shift, "cpu")
    # Scatter the window mask back to a token-level (HW, HW) mask over real tokens.
    pos = torch.arange(hp * wp).view(hp, wp)
    pos = torch.roll(pos, shifts=(-shift, -shift), dims=(0, 1))
    pos = pos.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    full = torch.zeros(hp * wp, hp * wp, dtype=torch.bool)
    for wi in range(pos.shape[0]):
        full[pos[wi][:, None], pos[wi][None, :]] = mask[wi]
    real = torch.arange(hp * wp).view(hp, wp)[:h, :w].reshape(-1)
    brute, _ = brute_mask_and_bias_index(h, w, window, shift)
    assert torch.equal(full[real][:, real], brute)
    assert (region == -1).sum() == hp * wp - h * w  # every padded position is marked


def test_window_attention_bf16_runs():
    q, k, v = (torch.randn(1, 5, 6, 2, 8, dtype=torch.bfloat16) for _ in range(3))
    out = ops.window_attention(q, k, v, torch.zeros(2), torch.rand(2, 49), 4, 2)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------------ APM
@pytest.mark.parametrize("h,w", [(4, 6), (5, 7), (1, 1)])
def test_apm_merge_reduce_and_keep(h, w):
    torch.manual_seed(0)
    b, c = 2, 3
    x = torch.randn(b, h, w, c)
    g, beta = torch.randn(4 * c), torch.randn(4 * c)
    z = ops.apm_merge(x, g, beta, reduce=True)
    assert z.shape == (b, math.ceil(h / 2), math.ceil(w / 2), 4 * c)
    for i in range(z.shape[1]):
        for j in range(z.shape[2]):
            slots = []
            for di, dj in ((0, 0), (1, 0), (0, 1), (1, 1)):  # Swin order x0, x1, x2, x3
                ii, jj = 2 * i + di, 2 * j + dj
                slots.append(x[:, ii, jj] if ii < h and jj < w else torch.zeros(b, c))
            cat = torch.cat(slots, -1)
            mu, var = cat.mean(-1, keepdim=True), cat.var(-1, unbiased=False, keepdim=True)
            torch.testing.assert_close(z[:, i, j], (cat - mu) / torch.sqrt(var + 1e-5) * g + beta)
    keep = ops.apm_merge(x, g, beta, reduce=False)
    xhat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(keep, torch.cat([xhat] * 4, -1) * g + beta, atol=1e-5, rtol=1e-5)


def test_apm_module_keep_is_averaged_weight():
    from trainer.model.backbone import AdaptivePatchMerging

    torch.manual_seed(0)
    c = 4
    apm = AdaptivePatchMerging(c)
    with torch.no_grad():
        apm.norm.weight.normal_()
        apm.norm.bias.normal_()
    x = torch.randn(2, 3, 5, c)
    y = apm(x, reduce=False)
    assert y.shape == (2, 3, 5, 2 * c)
    # Hand form: sum over the 4 slots s of W_s (xhat * g_s + b_s), averaged: the weight averaged across slots.
    xhat = F.layer_norm(x, (c,), eps=1e-5)
    wt, g, beta = apm.reduction.weight, apm.norm.weight, apm.norm.bias
    expect = sum(
        (xhat * g[s * c : (s + 1) * c] + beta[s * c : (s + 1) * c]) @ wt[:, s * c : (s + 1) * c].t() for s in range(4)
    )
    torch.testing.assert_close(y, expect / 4, atol=1e-5, rtol=1e-5)
    assert apm(x, reduce=True).shape == (2, 2, 3, 2 * c)


# --------------------------------------------------------------------------------------------------- routing
def test_top1_route_against_hand_computation():
    torch.manual_seed(0)
    n, d, e, cap = 13, 5, 3, 3
    x, wg = torch.randn(n, d), torch.randn(e, d)
    r = ops.top1_route(x, wg, cap)
    logits = [[sum(float(x[i, k]) * float(wg[j, k]) for k in range(d)) for j in range(e)] for i in range(n)]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    seen = [0] * e
    for i in range(n):
        ex = max(range(e), key=lambda j: (probs[i][j], -j))
        assert int(r.expert[i]) == ex and int(r.position[i]) == seen[ex]
        assert bool(r.kept[i]) == (seen[ex] < cap)
        assert abs(float(r.gate[i]) - probs[i][ex]) < 1e-6
        seen[ex] += 1
    assert r.counts.tolist() == seen
    assert r.dropped == sum(max(0, s - cap) for s in seen)
    aux = e * sum(seen[j] / n * sum(probs[i][j] for i in range(n)) / n for j in range(e))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / n
    assert abs(float(r.aux_loss) - aux) < 1e-5 and abs(float(r.z_loss) - z) < 1e-4
    assert r.gate.dtype == torch.float32 and r.expert.dtype == torch.int64
    nodrop = ops.top1_route(x, wg, n, drop_tokens=False)
    assert nodrop.kept.all() and nodrop.dropped == 0


def test_top1_route_ties_pick_lowest_expert():
    r = ops.top1_route(torch.zeros(4, 3), torch.ones(5, 3), 1)
    assert r.expert.tolist() == [0] * 4 and r.position.tolist() == [0, 1, 2, 3] and r.dropped == 3


def test_dispatch_combine_against_one_hot_reference():
    torch.manual_seed(0)
    n, d, e, cap = 20, 6, 4, 4
    x = torch.randn(n, d, requires_grad=True)
    wg = torch.randn(e, d, requires_grad=True)
    r = ops.top1_route(x, wg, cap)
    assert r.dropped > 0
    buf = ops.moe_dispatch(x, r.expert, r.position, r.kept, e, cap)
    y = torch.tanh(buf) * 2  # a stand-in expert
    out = ops.moe_combine(y, r.expert, r.position, r.kept, r.gate)
    # One-hot (GShard einsum) reference.
    slot = F.one_hot(r.expert, e)[:, :, None] * F.one_hot(r.position.clamp(max=cap - 1), cap)[:, None, :]
    slot = slot * r.kept[:, None, None]
    buf_ref = torch.einsum("nec,nd->ecd", slot.float(), x)
    out_ref = torch.einsum("nec,ecd->nd", slot.float() * r.gate[:, None, None], torch.tanh(buf_ref) * 2)
    torch.testing.assert_close(buf, buf_ref)
    torch.testing.assert_close(out, out_ref)
    assert (out[~r.kept] == 0).all()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, wg), g, retain_graph=True)
    ref = torch.autograd.grad(out_ref, (x, wg), g)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_dispatch_combine_gradcheck():
    torch.manual_seed(0)
    n, d, e, cap = 7, 3, 2, 3
    x = torch.randn(n, d, dtype=torch.double, requires_grad=True)
    y = torch.randn(e, cap, d, dtype=torch.double, requires_grad=True)
    gate = torch.rand(n, dtype=torch.double, requires_grad=True)
    expert = torch.tensor([0, 1, 0, 0, 1, 0, 0])
    position = torch.tensor([0, 0, 1, 2, 1, 3, 4])
    kept = position < cap
    assert torch.autograd.gradcheck(lambda t: ops.moe_dispatch(t, expert, position, kept, e, cap), (x,))
    assert torch.autograd.gradcheck(lambda a, b: ops.moe_combine(a, expert, position, kept, b), (y, gate))


# ------------------------------------------------------------------------------ same contract as kernels/
@pytest.mark.parametrize("h,w,window,shift", [(8, 8, 4, 2), (5, 7, 4, 2), (6, 6, 3, 0)])
def test_window_attention_matches_kernels_reference(h, w, window, shift):
    ref_mod = pytest.importorskip("kernels.window_attention.reference")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, h, w, 2, 8, requires_grad=True) for _ in range(3))
    ls = torch.tensor([0.3, 5.0], requires_grad=True)
    table = torch.rand(2, (2 * window - 1) ** 2, requires_grad=True)
    args = (q, k, v, ls, table)
    out, ref = ops.window_attention(*args, window, shift), ref_mod.window_attention(*args, window, shift)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, args, g), torch.autograd.grad(ref, args, g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_apm_and_routing_match_kernels_reference():
    apm_ref = pytest.importorskip("kernels.apm_merge.reference")
    moe_ref = pytest.importorskip("kernels.moe_routing.reference")
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4)
    g, b = torch.randn(16), torch.randn(16)
    for reduce in (True, False):
        torch.testing.assert_close(ops.apm_merge(x, g, b, reduce), apm_ref.apm_merge(x, g, b, reduce))
    t, wg = torch.randn(50, 6), torch.randn(4, 6)
    for drop, cap in ((True, 9), (False, 50)):  # without dropping the caller passes capacity >= max count
        ours, ref = ops.top1_route(t, wg, cap, drop), moe_ref.top1_route(t, wg, cap, drop)
        for name in ("expert", "position", "kept", "gate", "counts", "aux_loss", "z_loss"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), msg=name)
        assert ours.dropped == ref.dropped
        args = (ours.expert, ours.position, ours.kept)
        buf = ops.moe_dispatch(t, *args, 4, cap)
        torch.testing.assert_close(buf, moe_ref.moe_dispatch(t, *args, 4, cap))
        torch.testing.assert_close(ops.moe_combine(buf, *args, ours.gate), moe_ref.moe_combine(buf, *args, ours.gate))
