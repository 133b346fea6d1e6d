"""Triton kernels for APM merging: 2x2 gather (reduce) or 4x self-copy (keep) fused with LayerNorm(4C).

Forward: one program per output token; it loads the four C-wide slots straight from x (zero for the padded row /
column of an odd grid), computes mean and variance over 4C in fp32 and writes z = (x - mean) * rstd * w + b, plus
mean and rstd (fp32, one each per token) for the backward. The merged (B, H', W', 4C) input of the LayerNorm is
never materialised.

Backward: each program owns a contiguous run of output tokens; per token it recomputes x_hat, forms dx with the
LayerNorm input-gradient formula and stores it into the slot's source position (reduce: every input token is in
exactly one slot of one output, so plain stores; keep: the four slot gradients are summed). dw and db are
accumulated in registers and written as one partial row per program, summed on the host (deterministic, no atomics).

Roofline: ~10 FLOP per element against 2 x 2 bytes (bf16 read + write) per z element: ~1 FLOP/byte, memory-bound.
The bench reports GB/s over the bytes that must move: read x once (reduce) and write z; backward reads x, dz and
writes dx.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _slot(X, b, sy, sx, H, W, C, c, c_mask):
    """One C-wide slot of x at grid position (sy, sx) of image b, zeros outside the grid (odd H or W)."""
    zero = c * 0  # vector-shaped bounds test: the interpreter rejects a scalar & vector mask
    ok = c_mask & (zero + sy < H) & (zero + sx < W)
    base = ((b.to(tl.int64) * H + sy) * W + sx) * C
    return tl.load(X + base + c, mask=ok, other=0.0).to(tl.float32), base, ok


@triton.jit
def _store_slot(zrow, LN_W, LN_B, xhat, s, C, c, c_mask):
    w = tl.load(LN_W + s * C + c, mask=c_mask, other=0.0).to(tl.float32)
    bb = tl.load(LN_B + s * C + c, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(zrow + s * C + c, (xhat * w + bb).to(zrow.dtype.element_ty), mask=c_mask)


@triton.jit
def _apm_fwd_kernel(X, LN_W, LN_B, Z, MEAN, RSTD, H, W, HO, WO, C, eps, REDUCE: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    b = row // (HO * WO)
    oy = (row % (HO * WO)) // WO
    ox = row % WO
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    if REDUCE:
        x0, _, _ = _slot(X, b, 2 * oy, 2 * ox, H, W, C, c, c_mask)
        x1, _, _ = _slot(X, b, 2 * oy + 1, 2 * ox, H, W, C, c, c_mask)
        x2, _, _ = _slot(X, b, 2 * oy, 2 * ox + 1, H, W, C, c, c_mask)
        x3, _, _ = _slot(X, b, 2 * oy + 1, 2 * ox + 1, H, W, C, c, c_mask)
    else:
        x0, _, _ = _slot(X, b, oy, ox, H, W, C, c, c_mask)
        x1 = x0
        x2 = x0
        x3 = x0
    mean = (tl.sum(x0, axis=0) + tl.sum(x1, axis=0) + tl.sum(x2, axis=0) + tl.sum(x3, axis=0)) / (4 * C)
    d0 = tl.where(c_mask, x0 - mean, 0.0)
    d1 = tl.where(c_mask, x1 - mean, 0.0)
    d2 = tl.where(c_mask, x2 - mean, 0.0)
    d3 = tl.where(c_mask, x3 - mean, 0.0)
    var = tl.sum(d0 * d0, axis=0) + tl.sum(d1 * d1, axis=0) + tl.sum(d2 * d2, axis=0) + tl.sum(d3 * d3, axis=0)
    rstd = 1.0 / tl.sqrt(var / (4 * C) + eps)
    zrow = Z + row.to(tl.int64) * 4 * C
    _store_slot(zrow, LN_W, LN_B, d0 * rstd, 0, C, c, c_mask)
    _store_slot(zrow, LN_W, LN_B, d1 * rstd, 1, C, c, c_mask)
    _store_slot(zrow, LN_W, LN_B, d2 * rstd, 2, C, c, c_mask)
    _store_slot(zrow, LN_W, LN_B, d3 * rstd, 3, C, c, c_mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _apm_bwd_kernel(
    X, LN_W, DZ, MEAN, RSTD, DX, DW_PART, DB_PART, M, ROWS_PER_PROG, H, W, HO, WO, C,
    REDUCE: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    c_mask = c < C
    w0 = tl.load(LN_W + c, mask=c_mask, other=0.0).to(tl.float32)
    w1 = tl.load(LN_W + C + c, mask=c_mask, other=0.0).to(tl.float32)
    w2 = tl.load(LN_W + 2 * C + c, mask=c_mask, other=0.0).to(tl.float32)
    w3 = tl.load(LN_W + 3 * C + c, mask=c_mask, other=0.0).to(tl.float32)
    dw0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    dw3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db3 = tl.zeros([BLOCK_C], dtype=tl.float32)
    start = pid * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, M)
    start64 = start.to(tl.int64)
    for i in range(0, end - start):
        row = start + i  # the interpreter hands out plain ints for loop variables: offsets stay tensors
        b = row // (HO * WO)
        oy = (row % (HO * WO)) // WO
        ox = row % WO
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        if REDUCE:
            x0, o0, k0 = _slot(X, b, 2 * oy, 2 * ox, H, W, C, c, c_mask)
            x1, o1, k1 = _slot(X, b, 2 * oy + 1, 2 * ox, H, W, C, c, c_mask)
            x2, o2, k2 = _slot(X, b, 2 * oy, 2 * ox + 1, H, W, C, c, c_mask)
            x3, o3, k3 = _slot(X, b, 2 * oy + 1, 2 * ox + 1, H, W, C, c, c_mask)
        else:
            x0, o0, k0 = _slot(X, b, oy, ox, H, W, C, c, c_mask)
            x1 = x0
            x2 = x0
            x3 = x0
        dzrow = DZ + (start64 + i) * 4 * C
        g0 = tl.load(dzrow + c, mask=c_mask, other=0.0).to(tl.float32)
        g1 = tl.load(dzrow + C + c, mask=c_mask, other=0.0).to(tl.float32)
        g2 = tl.load(dzrow + 2 * C + c, mask=c_mask, other=0.0).to(tl.float32)
        g3 = tl.load(dzrow + 3 * C + c, mask=c_mask, other=0.0).to(tl.float32)
        h0 = tl.where(c_mask, (x0 - mean) * rstd, 0.0)
        h1 = tl.where(c_mask, (x1 - mean) * rstd, 0.0)
        h2 = tl.where(c_mask, (x2 - mean) * rstd, 0.0)
        h3 = tl.where(c_mask, (x3 - mean) * rstd, 0.0)
        dw0 += g0 * h0
        dw1 += g1 * h1
        dw2 += g2 * h2
        dw3 += g3 * h3
        db0 += g0
        db1 += g1
        db2 += g2
        db3 += g3
        e0 = g0 * w0
        e1 = g1 * w1
        e2 = g2 * w2
        e3 = g3 * w3
        inv_n = 1.0 / (4 * C)
        c1 = tl.sum(e0 * h0, axis=0) + tl.sum(e1 * h1, axis=0) + tl.sum(e2 * h2, axis=0) + tl.sum(e3 * h3, axis=0)
        c2 = tl.sum(e0, axis=0) + tl.sum(e1, axis=0) + tl.sum(e2, axis=0) + tl.sum(e3, axis=0)
        c1 = c1 * inv_n
        c2 = c2 * inv_n
        dx0 = (e0 - h0 * c1 - c2) * rstd
        dx1 = (e1 - h1 * c1 - c2) * rstd
        dx2 = (e2 - h2 * c1 - c2) * rstd
        dx3 = (e3 - h3 * c1 - c2) * rstd
        if REDUCE:
            tl.store(DX + o0 + c, dx0.to(DX.dtype.element_ty), mask=k0)
            tl.store(DX + o1 + c, dx1.to(DX.dtype.element_ty), mask=k1)
            tl.store(DX + o2 + c, dx2.to(DX.dtype.element_ty), mask=k2)
            tl.store(DX + o3 + c, dx3.to(DX.dtype.element_ty), mask=k3)
        else:
            tl.store(DX + o0 + c, (dx0 + dx1 + dx2 + dx3).to(DX.dtype.element_ty), mask=c_mask)
    part = pid.to(tl.int64) * 4 * C
    tl.store(DW_PART + part + c, dw0, mask=c_mask)
    tl.store(DW_PART + part + C + c, dw1, mask=c_mask)
    tl.store(DW_PART + part + 2 * C + c, dw2, mask=c_mask)
    tl.store(DW_PART + part + 3 * C + c, dw3, mask=c_mask)
    tl.store(DB_PART + part + c, db0, mask=c_mask)
    tl.store(DB_PART + part + C + c, db1, mask=c_mask)
    tl.store(DB_PART + part + 2 * C + c, db2, mask=c_mask)
    tl.store(DB_PART + part + 3 * C + c, db3, mask=c_mask)


# ------------------------------------------------------------------------------------------------------ host side
MAX_CHANNELS = 4096  # one slot = BLOCK_C fp32 values held in registers; wider inputs raise (the model's max is 1408)


def _check(x, ln_weight, ln_bias) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, W, C), got {tuple(x.shape)}")
    c = x.shape[-1]
    if ln_weight.shape != (4 * c,) or ln_bias.shape != (4 * c,):
        raise ValueError(f"ln_weight/ln_bias must be (4C,) = ({4 * c},), got {ln_weight.shape}, {ln_bias.shape}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32/fp16/bf16, got {x.dtype}")
    if c > MAX_CHANNELS:
        raise ValueError(f"C={c} > {MAX_CHANNELS} is not supported by the Triton kernel")
    if len({x.device, ln_weight.device, ln_bias.device}) != 1:
        raise ValueError("x, ln_weight and ln_bias must be on one device")


def _meta(c: int, backward: bool = False) -> dict:
    # The backward keeps ~28 C-wide fp32 vectors live (4 slots of x, dz, x_hat, w and 8 dw/db accumulators):
    # twice the warps of the forward keeps them in registers up to C = 2048.
    block = triton.next_power_of_2(c)
    return dict(BLOCK_C=block, num_warps=min(16, max(1, block // (128 if backward else 256))))


def apm_merge_fwd(x, ln_weight, ln_bias, reduce: bool, eps: float):
    """x: (B, H, W, C) -> (z (B, H', W', 4C) in x's dtype, mean (M,) fp32, rstd (M,) fp32), M = B*H'*W'."""
    _check(x, ln_weight, ln_bias)
    x = x.contiguous()
    b, h, w, c = x.shape
    ho, wo = ((h + 1) // 2, (w + 1) // 2) if reduce else (h, w)
    m = b * ho * wo
    z = torch.empty(b, ho, wo, 4 * c, dtype=x.dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m > 0 and c > 0:
        _apm_fwd_kernel[(m,)](
            x, ln_weight.contiguous(), ln_bias.contiguous(), z, mean, rstd, h, w, ho, wo, c, float(eps),
            REDUCE=bool(reduce), **_meta(c),
        )  # fmt: skip
    return z, mean, rstd


def _num_programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(m, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(m, 4))  # interpreter: few programs keep it fast


def apm_merge_bwd(x, ln_weight, mean, rstd, grad_z, reduce: bool):
    """Gradients (dx like x, d ln_weight (4C,), d ln_bias (4C,)) in the parameters' dtypes."""
    x = x.contiguous()
    grad_z = grad_z.contiguous()
    b, h, w, c = x.shape
    ho, wo = grad_z.shape[1], grad_z.shape[2]
    m = b * ho * wo
    dx = torch.empty_like(x)  # every input token is the source of exactly one slot (reduce) or all four (keep)
    progs = _num_programs(m, x.device)
    dw_part = torch.zeros(progs, 4 * c, dtype=torch.float32, device=x.device)
    db_part = torch.zeros(progs, 4 * c, dtype=torch.float32, device=x.device)
    if m > 0 and c > 0:
        _apm_bwd_kernel[(progs,)](
            x, ln_weight.contiguous(), grad_z, mean, rstd, dx, dw_part, db_part, m, triton.cdiv(m, progs),
            h, w, ho, wo, c, REDUCE=bool(reduce), **_meta(c, backward=True),
        )  # fmt: skip
    return dx, dw_part.sum(0).to(ln_weight.dtype), db_part.sum(0).to(ln_weight.dtype)
