"""The three hot ops of the backbone, one contract shared with `kernels/`.

The model imports `window_attention`, `apm_merge`, `top1_route`, `moe_dispatch`, `moe_combine` and `Route` from
this module only. Each public function runs the Triton kernel when `kernels.use_triton(...)` says so (CUDA tensors,
or the `SKYSENSE_KERNELS` / `kernels.set_backend` override) and otherwise the PyTorch implementation below, which
is tuned for the CPU (gather-based window partition, one autograd node for the attention core, index-based
dispatch/combine without temporaries) and has exactly the semantics of `kernels/<op>/reference.py`
(tests/model/test_ops.py checks both against brute force and against each other). Semantics: docs/model.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812

try:  # the kernels package lives in this repository; guarded so the model still imports without it
    import kernels as _kernels
except ImportError:  # pragma: no cover
    _kernels = None


def _triton(*tensors: torch.Tensor) -> bool:
    return _kernels is not None and _kernels.use_triton(*tensors)


LOGIT_SCALE_MAX = math.log(100.0)


# ----------------------------------------------------------------------------------------------- window attention
def relative_position_index(window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(window**2, window**2) int64: for query (i1, j1), key (i2, j2): (i1-i2+w-1)*(2w-1) + (j1-j2+w-1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N)
    return (rel[0] * (2 * window - 1) + rel[1]).to(device)


_MASK_CACHE: dict[tuple, torch.Tensor] = {}


def window_region_ids(h: int, w: int, window: int, shift: int, device: torch.device | str | None = None):
    """(nW, window**2) int64 region id per token of each (rolled, partitioned) window; -1 marks padding.

    A query attends to a key iff both carry the same id and the key is not padding (or the key is the query).
    """
    hp, wp = -(-h // window) * window, -(-w // window) * window
    if shift > 0:
        # Regions along each axis, rolled coordinates: [0, P-window), [P-window, P-shift), [P-shift, P).
        rh, rw = torch.zeros(hp, dtype=torch.long), torch.zeros(wp, dtype=torch.long)
        rh[hp - window :], rw[wp - window :] = 1, 1
        rh[hp - shift :], rw[wp - shift :] = 2, 2
        region = rh[:, None] * 3 + rw[None, :]
    else:
        region = torch.zeros(hp, wp, dtype=torch.long)
    valid = torch.zeros(hp, wp, dtype=torch.bool)
    valid[:h, :w] = True
    if shift > 0:
        valid = torch.roll(valid, shifts=(-shift, -shift), dims=(0, 1))
    region = torch.where(valid, region, torch.full_like(region, -1))
    region = region.view(hp // window, window, wp // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)
    return region.to(device)


def window_attention_mask(h: int, w: int, window: int, shift: int, device: torch.device | str) -> torch.Tensor | None:
    """(nW, N, N) bool "may attend" mask for a padded/shifted grid, or None when every key is allowed."""
    if shift == 0 and h % window == 0 and w % window == 0:
        return None
    key = (h, w, window, shift, str(device))
    mask = _MASK_CACHE.get(key)
    if mask is None:
        region = window_region_ids(h, w, window, shift, device)
        n = window * window
        mask = (region[:, :, None] == region[:, None, :]) & (region[:, None, :] >= 0)
        mask |= torch.eye(n, dtype=torch.bool, device=device)  # a padded query sees itself: no empty row
        if len(_MASK_CACHE) > 256:
            _MASK_CACHE.clear()
        _MASK_CACHE[key] = mask
    return mask


_PART_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def window_partition_index(
    h: int, w: int, nh: int, window: int, shift: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices replacing pad + roll + partition (and the inverse) by one `index_select` each.

    fwd: (nW*nh*N,) into a (H*W*nh)-row view of a (B, H, W, nh, d) tensor, giving (B, nW, nh, N, d) directly;
    padded slots point at token 0 (any finite value works: they are masked as keys, discarded as queries).
    inv: (H*W*nh,) into the (nW*nh*N)-row view of the windowed output, back to (B, H, W, nh, d).
    """
    key = (h, w, nh, window, shift, str(device))
    hit = _PART_CACHE.get(key)
    if hit is not None:
        return hit
    hp, wp = -(-h // window) * window, -(-w // window) * window
    n_wh, n_ww, n = hp // window, wp // window, window * window
    r = torch.arange(hp)[:, None].expand(hp, wp)  # rolled coordinates
    c = torch.arange(wp)[None, :].expand(hp, wp)
    oy, ox = (r + shift) % hp, (c + shift) % wp  # original coordinates held by each rolled slot
    tok = torch.where((oy < h) & (ox < w), oy * w + ox, torch.zeros_like(oy))
    tok = tok.view(n_wh, window, n_ww, window).permute(0, 2, 1, 3).reshape(-1, 1, n)  # (nW, 1, N)
    heads = torch.arange(nh).view(1, nh, 1)
    fwd = (tok * nh + heads).reshape(-1)  # (nW, nh, N) order
    # Position of every original token in the windowed order.
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ry, rx = (y - shift) % hp, (x - shift) % wp
    win = (ry // window) * n_ww + rx // window
    loc = (ry % window) * window + rx % window
    inv = (win[..., None] * nh + torch.arange(nh)) * n + loc[..., None]  # (H, W, nh)
    hit = (fwd.to(device), inv.reshape(-1).to(device))
    if len(_PART_CACHE) > 256:
        _PART_CACHE.clear()
    _PART_CACHE[key] = hit
    return hit


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t if torch.promote_types(t.dtype, torch.float32) == t.dtype else t.float()


class _ScaledNormalize(torch.autograd.Function):
    """y = scale * x / max(||x||, eps) over the last dim, one node instead of F.normalize's four plus a mul.

    x: (..., nh, d); scale: (nh,) in x's dtype.
    """

    @staticmethod
    def forward(ctx, x, scale, eps: float):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inv = norm.clamp_min(eps).reciprocal_()
        y = x * (inv * scale[:, None])
        ctx.save_for_backward(y, inv, scale, norm > eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        y, inv, scale, unclamped = ctx.saved_tensors
        s = scale[:, None]
        dot = (dy * y).sum(-1, keepdim=True)  # <dy, y> = scale * <dy, x_hat>
        # Projection removes the radial component (only where the norm was not clamped at eps).
        dx = (dy - y * (dot / (s * s)) * unclamped) * (inv * s)
        dscale = None
        if ctx.needs_input_grad[1]:
            dscale = (dot / s).sum(dim=tuple(range(dot.ndim - 2)) + (-1,))
        return dx, dscale, None


class _WindowCore(torch.autograd.Function):
    """softmax(q k^T + bias + mask) v per window, softmax in >= fp32. q, k, v: (B, nW, nh, N, d) contiguous.

    One fused-by-hand node: the bias and mask are added in place (no (B*nW, nh, N, N) broadcast copies) and the
    backward uses the saved probabilities directly.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, neg_mask):
        logits = _acc(torch.matmul(q, k.transpose(-1, -2)))  # (B, nW, nh, N, N)
        logits += bias.to(logits.dtype)
        if neg_mask is not None:
            logits += neg_mask.unsqueeze(1).to(logits.dtype)
        p = torch.softmax(logits, dim=-1)
        ctx.save_for_backward(q, k, v, p)
        ctx.bias_dtype = bias.dtype
        return torch.matmul(p.to(v.dtype), v)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p = ctx.saved_tensors
        grad = grad.contiguous()
        pv = p.to(v.dtype)
        dv = torch.matmul(pv.transpose(-1, -2), grad)
        dp = _acc(torch.matmul(grad, v.transpose(-1, -2)))
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
        dbias = ds.sum(dim=(0, 1)).to(ctx.bias_dtype)
        ds = ds.to(q.dtype)
        dq = torch.matmul(ds, k)
        dk = torch.matmul(ds.transpose(-1, -2), q)
        return dq, dk, dv, dbias, None


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    logit_scale: torch.Tensor,
    bias_table: torch.Tensor,
    window: int,
    shift: int,
) -> torch.Tensor:
    """SwinV2 scaled cosine attention in (shifted) windows. q, k, v: (B, H, W, nh, d) -> (B, H, W, nh, d).

    logit_scale: (nh,); bias_table: (nh, (2*window-1)**2), already 16*sigmoid(cpb_mlp(...)).
    """
    if _triton(q, k, v, logit_scale, bias_table):
        return _kernels.window_attention(q, k, v, logit_scale, bias_table, window, shift)
    b, h, w, nh, d = q.shape
    n = window * window
    fwd, inv = window_partition_index(h, w, nh, window, shift, q.device)
    n_win = fwd.numel() // (nh * n)
    scale = torch.exp(torch.clamp(logit_scale.float(), max=LOGIT_SCALE_MAX)).to(q.dtype)
    # Cosine similarity: normalising on the grid is the same as per window and touches each token once.
    qs = _ScaledNormalize.apply(q, scale, 1e-12)
    kn = _ScaledNormalize.apply(k, torch.ones_like(scale), 1e-12)

    def partition(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(b, h * w * nh, d).index_select(1, fwd).view(b, n_win, nh, n, d)

    bias = bias_table[:, relative_position_index_cached(window, q.device)].view(nh, n, n)
    out = _WindowCore.apply(partition(qs), partition(kn), partition(v), bias, _neg_mask(h, w, window, shift, q.device))
    return out.view(b, n_win * nh * n, d).index_select(1, inv).view(b, h, w, nh, d)


_RPI_CACHE: dict[tuple, torch.Tensor] = {}
_NEG_CACHE: dict[tuple, torch.Tensor | None] = {}


def _neg_mask(h: int, w: int, window: int, shift: int, device) -> torch.Tensor | None:
    """(nW, N, N) fp32 additive mask (0 / -inf) or None, cached."""
    key = (h, w, window, shift, str(device))
    if key not in _NEG_CACHE:
        mask = window_attention_mask(h, w, window, shift, device)
        neg = None if mask is None else torch.zeros(mask.shape, device=device).masked_fill_(~mask, float("-inf"))
        if len(_NEG_CACHE) > 256:
            _NEG_CACHE.clear()
        _NEG_CACHE[key] = neg
    return _NEG_CACHE[key]


def relative_position_index_cached(window: int, device) -> torch.Tensor:
    """Flattened `relative_position_index`, cached per (window, device)."""
    key = (window, str(device))
    if key not in _RPI_CACHE:
        _RPI_CACHE[key] = relative_position_index(window, device).view(-1)
    return _RPI_CACHE[key]


# ----------------------------------------------------------------------------------------------------- APM merge
def apm_merge(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, reduce: bool, eps: float = 1e-5
) -> torch.Tensor:
    """2x2 gather (reduce) or 4x self-copy (keep) then LayerNorm(4C). x: (B, H, W, C) -> (B, H', W', 4C)."""
    if _triton(x, ln_weight, ln_bias):
        return _kernels.apm_merge(x, ln_weight, ln_bias, reduce, eps)
    b, h, w, c = x.shape
    if reduce:
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        z = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    else:
        z = torch.cat([x, x, x, x], dim=-1)
    return F.layer_norm(z.float(), (4 * c,), ln_weight.float(), ln_bias.float(), eps).to(x.dtype)


# ------------------------------------------------------------------------------------------------- top-1 routing
class Route(NamedTuple):
    """Top-1 routing decision for N tokens over E experts (see `top1_route`)."""

    expert: torch.Tensor  # (N,) int64
    position: torch.Tensor  # (N,) int64, rank among earlier tokens of the same expert
    kept: torch.Tensor  # (N,) bool
    gate: torch.Tensor  # (N,) fp32, differentiable
    counts: torch.Tensor  # (E,) int64, before dropping
    aux_loss: torch.Tensor  # scalar fp32
    z_loss: torch.Tensor  # scalar fp32
    dropped: int


def top1_route(x: torch.Tensor, gate_weight: torch.Tensor, capacity: int, drop_tokens: bool = True,
               bias: torch.Tensor | None = None, reroute: int = 0) -> Route:
    """Softmax gate, argmax expert, arrival positions and load-balance statistics. x: (N, D), gate_weight: (E, D).

    bias (E,): a load-balancing bias added to the probabilities for the CHOICE of expert only (the gate value stays
    the unbiased probability; DeepSeek-V3's auxiliary-loss-free balancing). The Triton kernel has no bias input,
    so a bias routes on this PyTorch path (routing is a small part of an MoE layer's cost).

    reroute: rounds of overflow re-routing (`reroute_overflow`); 0 drops what overflows, as DeepSpeed does. Also on
    this PyTorch path. `counts` stays the first choice (what the aux loss and the balancer act on).
    """
    if bias is None and not reroute and _triton(x, gate_weight):
        return Route(*_kernels.top1_route(x, gate_weight, capacity, drop_tokens))
    n = x.shape[0]
    e = gate_weight.shape[0]
    logits = x.float() @ gate_weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    expert = torch.argmax(probs if bias is None else probs + bias.float(), dim=-1)
    gate = probs.gather(1, expert[:, None]).squeeze(1)
    counts = torch.zeros(e, dtype=torch.long, device=x.device).index_add_(0, expert, torch.ones_like(expert))
    # Arrival position without an (N, E) one-hot: a stable sort groups each expert's tokens in token order.
    order = torch.sort(expert, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(expert)
    position[order] = torch.arange(n, device=x.device) - starts[expert[order]]
    kept = position < capacity if drop_tokens else torch.ones_like(position, dtype=torch.bool)
    if reroute and drop_tokens and not x.is_meta:
        choice = probs if bias is None else probs + bias.float()
        expert, position, kept = reroute_overflow(choice.detach(), expert, position, kept, counts, capacity, reroute)
        gate = probs.gather(1, expert[:, None]).squeeze(1)
    aux_loss = e * torch.sum(counts.to(probs.dtype) / max(n, 1) * probs.mean(0))
    z_loss = torch.logsumexp(logits, dim=-1).square().mean()
    dropped = 0 if x.is_meta or not drop_tokens else int(n - kept.sum())
    return Route(expert, position, kept, gate, counts, aux_loss, z_loss, dropped)


def reroute_overflow(choice: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor,
                     counts: torch.Tensor, capacity: int, rounds: int) -> tuple[torch.Tensor, ...]:
    """Send tokens that overflowed their expert to their best expert with a free slot, instead of dropping them.

    choice (N, E): the routing scores; expert, position, kept: the first choice's assignment; counts (E,): first-choice
    counts. Each round, every token still dropped takes the highest-scoring expert that is not yet full; its slots go
    to those tokens in token order after the slots already taken, and whatever overflows again waits for the next
    round. An expert a token overflowed is full afterwards, so no expert is tried twice. After BASE layers' balanced
    assignment (Lewis et al., 2021) in its cheapest greedy form: the load an expert processes stays <= capacity, and
    a batch of similar images spills onto other experts rather than losing its tokens. Returns new (expert, position,
    kept); positions of tokens still dropped are left as they were (>= capacity).
    """
    e = choice.shape[1]
    expert, position, kept = expert.clone(), position.clone(), kept.clone()
    taken = counts.clamp(max=capacity)
    for _ in range(rounds):
        over = torch.nonzero(~kept).squeeze(1)
        full = taken >= capacity
        if over.numel() == 0 or bool(full.all()):
            break
        new = choice[over].masked_fill(full[None], float("-inf")).argmax(1)
        c = torch.zeros(e, dtype=torch.long, device=choice.device).index_add_(0, new, torch.ones_like(new))
        order = torch.sort(new, stable=True).indices  # `over` is ascending: token order within each expert
        rank = torch.empty_like(new)
        rank[order] = torch.arange(new.numel(), device=choice.device) - (torch.cumsum(c, 0) - c)[new[order]]
        pos = taken[new] + rank
        ok = pos < capacity
        idx = over[ok]
        expert[idx], position[idx], kept[idx] = new[ok], pos[ok], True
        taken = (taken + c).clamp(max=capacity)
    return expert, position, kept


def _slots(expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, capacity: int, num_experts: int):
    # Dropped tokens go to one scratch row past the buffer so the copies need no boolean indexing (no host sync).
    flat = expert * capacity + position
    return torch.where(kept, flat, torch.full_like(flat, num_experts * capacity))


def _scatter_rows(src: torch.Tensor, slots: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows + 1, D) with src[n] at row slots[n] and zeros in rows no token uses (last row: scratch).

    Zeroing only the unused rows (about 1 - 1/capacity_factor of them) instead of the whole buffer first.
    """
    if src.is_meta:  # no data-dependent indexing on meta (FLOP counting)
        return src.new_zeros(rows + 1, src.shape[1]).index_copy_(0, slots, src)
    out = src.new_empty(rows + 1, src.shape[1]).index_copy_(0, slots, src)
    unused = torch.ones(rows + 1, dtype=torch.bool, device=src.device).index_fill_(0, slots, False)
    return out.index_fill_(0, unused.nonzero().squeeze(1), 0)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, slots, num_experts: int, capacity: int):
        buf = _scatter_rows(x, slots, num_experts * capacity)
        ctx.save_for_backward(slots)
        return buf[:-1].view(num_experts, capacity, x.shape[1])

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        rows = grad.shape[0] * grad.shape[1]
        g = grad.reshape(rows, grad.shape[-1]).index_select(0, slots.clamp(max=rows - 1))
        if g.is_meta:
            return g, None, None, None
        return g.index_fill_(0, (slots == rows).nonzero().squeeze(1), 0), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, slots, gate):
        e, c, d = y.shape
        dropped = slots == e * c
        routed = y.reshape(e * c, d).index_select(0, slots.clamp(max=e * c - 1))
        weight = gate.masked_fill(dropped, 0)
        ctx.save_for_backward(slots, weight, routed)
        ctx.shape = (e, c, d)
        if torch.promote_types(y.dtype, torch.float32) == y.dtype:
            return routed * weight[:, None].to(y.dtype)
        return (routed.float() * weight[:, None]).to(y.dtype)  # low-precision outputs weighted in fp32

    @staticmethod
    def backward(ctx, grad):
        slots, weight, routed = ctx.saved_tensors
        e, c, d = ctx.shape
        grad_y = grad_gate = None
        if ctx.needs_input_grad[0]:
            # Scatter first, then weight each slot: no (N, D) temporary. The scratch row takes dropped tokens.
            grad_y = _scatter_rows(grad, slots, e * c)
            slot_weight = weight.new_zeros(e * c + 1).index_copy_(0, slots, weight)
            if torch.promote_types(grad.dtype, torch.float32) == grad.dtype:
                grad_y.mul_(slot_weight[:, None].to(grad.dtype))
            else:  # low-precision gradients weighted in fp32
                grad_y.copy_(grad_y.float() * slot_weight[:, None])
            grad_y = grad_y[:-1].view(e, c, d)
        if ctx.needs_input_grad[2]:
            # Row-wise dot product without an (N, D) temporary; a dropped token's gate gets no gradient.
            acc = torch.promote_types(grad.dtype, torch.float32)
            grad_gate = torch.einsum("nd,nd->n", grad.to(acc), routed.to(acc)).masked_fill_(slots == e * c, 0)
        return grad_y, None, grad_gate


def moe_dispatch(
    x: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Scatter kept tokens to their expert slots. x: (N, D) -> (E, capacity, D), zeros in unused slots."""
    if _triton(x, expert, position, kept):
        return _kernels.moe_dispatch(x, expert, position, kept, num_experts, capacity)
    return _Dispatch.apply(x, _slots(expert, position, kept, capacity, num_experts), num_experts, capacity)


def moe_combine(
    y: torch.Tensor, expert: torch.Tensor, position: torch.Tensor, kept: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """Gather expert outputs back to tokens, weighted by the gate. y: (E, capacity, D) -> (N, D), 0 if dropped."""
    if _triton(y, expert, position, kept, gate):
        return _kernels.moe_combine(y, expert, position, kept, gate)
    e, c, _ = y.shape
    return _Combine.apply(y, _slots(expert, position, kept, c, e), gate)


__all__ = ["Route", "apm_merge", "moe_combine", "moe_dispatch", "top1_route", "window_attention"]
