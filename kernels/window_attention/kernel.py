"""Triton forward/backward kernels for SwinV2 window attention, with host wrappers that check their inputs.

One program per (batch x window, head). Window partition, zero padding and the cyclic shift live in the index
math: local token t of window (wy, wx) sits at rolled padded coordinate (wy*w + t//w, wx*w + t%w), i.e. at grid
position ((ry + shift) % Hp, (rx + shift) % Wp), and is padding when that falls outside (H, W). Cosine
normalisation, logit scale, CPB bias gather, shift/padding mask, fp32 softmax and @V are fused; the backward
recomputes the probabilities (a window is at most 64 tokens, all on chip) instead of storing them.

Roofline (paper shapes: window 8 -> N = 64 tokens, head dim d = 32, bf16): per window and head the forward reads
q, k, v and writes o (4*N*d*2 bytes = 16 KiB) and does 4*N*N*d = 524 kFLOP (two matmuls), ~32 FLOP/byte. An H100
SXM needs ~295 FLOP/byte (989 TFLOP/s / 3.35 TB/s) to be compute-bound, so the kernel is memory-bound: the target is
HBM bandwidth (bytes moved / time), reported by `python -m kernels.bench` as GB/s beside TFLOP/s. The backward
reads q, k, v, dO and writes dq, dk, dv (7*N*d*2 bytes) for ~10*N*N*d FLOP, ~45 FLOP/byte: memory-bound too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.window_attention.reference import relative_position_index

LOG_100 = math.log(100.0)
# N = window**2 <= 64 tokens: one (64, 64) fp32 tile per program. Window 16 (block 256) needs ~290 KiB of shared
# memory in fp32 (more than an H100 has, found by `python -m kernels.cuda_compile`); larger windows use the reference.
MAX_WINDOW = 8
MAX_HEAD_DIM = 64  # largest head dim compiled and checked for shared memory (paper: 32)


@triton.jit
def _window_coords(pid_bw, NW, NWX, H, W, HP, WP, WINDOW: tl.constexpr, SHIFT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Batch index, grid coordinates, validity and shift-region id of the BLOCK_N token slots of one window."""
    b = pid_bw // NW
    wid = pid_bw % NW
    t = tl.arange(0, BLOCK_N)
    ry = (wid // NWX) * WINDOW + t // WINDOW  # rolled, padded coordinates
    rx = (wid % NWX) * WINDOW + t % WINDOW
    y = (ry + SHIFT) % HP
    x = (rx + SHIFT) % WP
    valid = (t < WINDOW * WINDOW) & (y < H) & (x < W)
    if SHIFT > 0:
        region = ((ry >= HP - WINDOW).to(tl.int32) + (ry >= HP - SHIFT).to(tl.int32)) * 3
        region += (rx >= WP - WINDOW).to(tl.int32) + (rx >= WP - SHIFT).to(tl.int32)
    else:
        region = tl.zeros([BLOCK_N], dtype=tl.int32)
    return b, t, y, x, valid, region


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    # fp32 inputs: exact fp32 products (tf32 would put ~1e-3 relative error on logits scaled by up to 100).
    if IS_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _probs(qn, kn, scale, bias_ptr, t, valid, region, dt, WINDOW: tl.constexpr, QK_MODE: tl.constexpr):
    """Softmax rows (fp32) and cosine matrix of one window from unit rows qn, kn: logits = scale * cos + bias.

    QK_MODE 0: exact fp32 products (fp32 inputs); 1: products in the half input dtype dt (fp16: 10 mantissa bits);
    2: tf32 (bf16 inputs: 10 mantissa bits instead of bf16's 7, still tensor cores; the logits are scaled by up
    to 100, so the cosine's precision matters more than the bytes).
    """
    N: tl.constexpr = WINDOW * WINDOW
    if QK_MODE == 0:
        cos = tl.dot(qn, tl.trans(kn), input_precision="ieee")
    elif QK_MODE == 1:
        cos = tl.dot(qn.to(dt), tl.trans(kn.to(dt)))
    else:
        cos = tl.dot(qn, tl.trans(kn), input_precision="tf32")
    t1 = t[:, None]
    t2 = t[None, :]
    rel = (t1 // WINDOW - t2 // WINDOW + WINDOW - 1) * (2 * WINDOW - 1) + (t1 % WINDOW - t2 % WINDOW + WINDOW - 1)
    inside = (t1 < N) & (t2 < N)
    bias = tl.load(bias_ptr + rel, mask=inside, other=0.0).to(tl.float32)
    allow = (t1 == t2) | (valid[None, :] & (region[:, None] == region[None, :]))
    logits = tl.where(allow, scale * cos + bias, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    return p, cos


@triton.jit
def _load_normalised(ptr, offs, mask, d_mask):
    x = tl.load(ptr + offs, mask=mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    return x, x / tl.maximum(norm, 1e-12)[:, None], norm


@triton.jit
def _wa_fwd_kernel(
    Q, K, V, O, LS, BIAS,
    NW, NWX, H, W, HP, WP,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
    NH: tl.constexpr, HEAD_D: tl.constexpr, WINDOW: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr, QK_MODE: tl.constexpr,
):  # fmt: skip
    pid_bw = tl.program_id(0)
    h = tl.program_id(1)
    b, t, y, x, valid, region = _window_coords(pid_bw, NW, NWX, H, W, HP, WP, WINDOW, SHIFT, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_D
    b64, y64, x64 = b.to(tl.int64), y.to(tl.int64), x.to(tl.int64)
    q_offs = (b64 * sqb + y64 * sqy + x64 * sqx + h * sqh)[:, None] + d[None, :]
    k_offs = (b64 * skb + y64 * sky + x64 * skx + h * skh)[:, None] + d[None, :]
    v_offs = (b64 * svb + y64 * svy + x64 * svx + h * svh)[:, None] + d[None, :]
    _, qn, _ = _load_normalised(Q, q_offs, valid, d_mask)
    _, kn, _ = _load_normalised(K, k_offs, valid, d_mask)
    v = tl.load(V + v_offs, mask=valid[:, None] & d_mask[None, :], other=0.0)
    scale = tl.exp(tl.minimum(tl.load(LS + h).to(tl.float32), 4.605170185988092))
    bias_ptr = BIAS + h * (2 * WINDOW - 1) * (2 * WINDOW - 1)
    p, _ = _probs(qn, kn, scale, bias_ptr, t, valid, region, v.dtype, WINDOW, QK_MODE)
    out = _dot(p.to(v.dtype), v, IS_FP32)
    # O is contiguous (B, H, W, NH, HEAD_D).
    o_offs = (((b64 * H + y64) * W + x64) * NH + h) * HEAD_D
    tl.store(O + o_offs[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=valid[:, None] & d_mask[None, :])


@triton.jit
def _wa_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LS, BIAS, DSCALE, DBIAS,
    NW, NWX, H, W, HP, WP,
    sqb, sqy, sqx, sqh, skb, sky, skx, skh, svb, svy, svx, svh,
    NH: tl.constexpr, HEAD_D: tl.constexpr, WINDOW: tl.constexpr, SHIFT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IS_FP32: tl.constexpr, QK_MODE: tl.constexpr,
):  # fmt: skip
    pid_bw = tl.program_id(0)
    h = tl.program_id(1)
    N: tl.constexpr = WINDOW * WINDOW
    b, t, y, x, valid, region = _window_coords(pid_bw, NW, NWX, H, W, HP, WP, WINDOW, SHIFT, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_D
    tile_mask = valid[:, None] & d_mask[None, :]
    b64, y64, x64 = b.to(tl.int64), y.to(tl.int64), x.to(tl.int64)
    q_offs = (b64 * sqb + y64 * sqy + x64 * sqx + h * sqh)[:, None] + d[None, :]
    k_offs = (b64 * skb + y64 * sky + x64 * skx + h * skh)[:, None] + d[None, :]
    v_offs = (b64 * svb + y64 * svy + x64 * svx + h * svh)[:, None] + d[None, :]
    g_offs = ((((b64 * H + y64) * W + x64) * NH + h) * HEAD_D)[:, None] + d[None, :]  # contiguous grads
    _, qn, q_norm = _load_normalised(Q, q_offs, valid, d_mask)
    _, kn, k_norm = _load_normalised(K, k_offs, valid, d_mask)
    v = tl.load(V + v_offs, mask=tile_mask, other=0.0)
    do = tl.load(DO + g_offs, mask=tile_mask, other=0.0)  # padded queries: zero upstream gradient
    raw = tl.load(LS + h).to(tl.float32)
    scale = tl.exp(tl.minimum(raw, 4.605170185988092))
    bias_ptr = BIAS + h * (2 * WINDOW - 1) * (2 * WINDOW - 1)
    p, cos = _probs(qn, kn, scale, bias_ptr, t, valid, region, v.dtype, WINDOW, QK_MODE)

    dv = _dot(tl.trans(p).to(v.dtype), do, IS_FP32)
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=tile_mask)
    dp = _dot(do, tl.trans(v), IS_FP32)
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])  # d logits; 0 where masked since p == 0 there

    # Shared parameters: one atomic per program for the scale, an (N, N) atomic tile per head for the bias
    # (folded into the (2w-1)^2 table by the host: index_add over the relative-position index).
    tl.atomic_add(DSCALE + h, tl.sum(tl.sum(ds * cos, axis=1), axis=0))
    t1 = t[:, None]
    t2 = t[None, :]
    tl.atomic_add(DBIAS + h * N * N + t1 * N + t2, ds, mask=(t1 < N) & (t2 < N))

    # Half inputs: the gradient matmuls run on tensor cores in the input dtype, accumulating in fp32.
    dqn = _dot(ds.to(v.dtype), kn.to(v.dtype), IS_FP32) * scale
    dkn = _dot(tl.trans(ds).to(v.dtype), qn.to(v.dtype), IS_FP32) * scale
    # Through F.normalize: y = x / max(|x|, eps); the norm only carries gradient when it exceeds eps.
    q_big = (q_norm > 1e-12).to(tl.float32)
    k_big = (k_norm > 1e-12).to(tl.float32)
    dq = (dqn - qn * (tl.sum(qn * dqn, axis=1) * q_big)[:, None]) / tl.maximum(q_norm, 1e-12)[:, None]
    dk = (dkn - kn * (tl.sum(kn * dkn, axis=1) * k_big)[:, None]) / tl.maximum(k_norm, 1e-12)[:, None]
    tl.store(DQ + g_offs, dq.to(DQ.dtype.element_ty), mask=tile_mask)
    tl.store(DK + g_offs, dk.to(DK.dtype.element_ty), mask=tile_mask)


# ------------------------------------------------------------------------------------------------------ host side
def _check(q, k, v, logit_scale, bias_table, window: int, shift: int) -> None:
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one (B, H, W, nh, d) shape, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one float dtype (fp32/fp16/bf16), got {q.dtype}, {k.dtype}, {v.dtype}")
    nh, d = q.shape[3], q.shape[4]
    if not 1 <= window <= MAX_WINDOW or not 0 <= shift < window or d > MAX_HEAD_DIM:
        raise ValueError(f"unsupported window={window}, shift={shift}, head dim={d} (window <= {MAX_WINDOW})")
    if logit_scale.shape != (nh,) or bias_table.shape != (nh, (2 * window - 1) ** 2):
        raise ValueError(f"logit_scale {tuple(logit_scale.shape)} / bias_table {tuple(bias_table.shape)} do not fit "
                         f"nh={nh}, window={window}")  # fmt: skip
    devices = {t.device for t in (q, k, v, logit_scale, bias_table)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def _rows(t: torch.Tensor) -> torch.Tensor:
    # Views such as q, k, v split off one qkv projection are fine; only the channel dim must be unit-stride.
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_args(q, window: int):
    b, h, w, nh, d = q.shape
    hp, wp = -(-h // window) * window, -(-w // window) * window
    nwx = wp // window
    nw = (hp // window) * nwx
    meta = dict(
        NH=nh, HEAD_D=d, BLOCK_N=max(16, triton.next_power_of_2(window * window)),
        BLOCK_D=max(16, triton.next_power_of_2(d)), IS_FP32=q.dtype == torch.float32,
        QK_MODE={torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[q.dtype],
        num_warps=4 if window * window <= 64 else 8,
    )  # fmt: skip
    return (b * nw, nh), (nw, nwx, h, w, hp, wp), meta


def window_attention_fwd(q, k, v, logit_scale, bias_table, window: int, shift: int) -> torch.Tensor:
    """Forward kernel. q, k, v: (B, H, W, nh, d) (channel dim unit-stride) -> out (B, H, W, nh, d) contiguous."""
    _check(q, k, v, logit_scale, bias_table, window, shift)
    q, k, v = _rows(q), _rows(k), _rows(v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    grid, dims, meta = _launch_args(q, window)
    _wa_fwd_kernel[grid](
        q, k, v, out, logit_scale.contiguous(), bias_table.contiguous(), *dims,
        *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], WINDOW=window, SHIFT=shift, **meta,
    )  # fmt: skip
    return out


def window_attention_bwd(q, k, v, logit_scale, bias_table, grad_out, window: int, shift: int):
    """Backward kernel: (dq, dk, dv) like q, d logit_scale (nh,), d bias_table (nh, (2w-1)**2)."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    grad_out = grad_out.contiguous()
    nh = q.shape[3]
    n = window * window
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    dscale = torch.zeros(nh, dtype=torch.float32, device=q.device)
    dbias_full = torch.zeros(nh, n * n, dtype=torch.float32, device=q.device)
    if q.numel() > 0:
        grid, dims, meta = _launch_args(q, window)
        _wa_bwd_kernel[grid](
            q, k, v, grad_out, dq, dk, dv, logit_scale.contiguous(), bias_table.contiguous(), dscale, dbias_full,
            *dims, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], WINDOW=window, SHIFT=shift, **meta,
        )  # fmt: skip
    ls = logit_scale.float()
    # d/d ls of exp(clamp(ls, max)): exp(ls) where ls <= max (torch.clamp passes the gradient at the bound too).
    dls = dscale * torch.exp(torch.clamp(ls, max=LOG_100)) * (ls <= LOG_100).float()
    index = relative_position_index(window, q.device).view(-1)
    dbias = torch.zeros(nh, (2 * window - 1) ** 2, dtype=torch.float32, device=q.device)
    dbias.index_add_(1, index, dbias_full)
    return dq, dk, dv, dls.to(logit_scale.dtype), dbias.to(bias_table.dtype)
