"""Triton kernels for top-1 routing (gate GEMV + softmax + argmax + capacity positions), dispatch and combine.

Routing, two passes over token blocks:
1. `_route_fwd_kernel`: logits = x @ Wg^T (fp32, exact products), softmax, argmax (lowest index on ties), gate,
   logsumexp; per block the expert histogram and the column sums of the probabilities (aux-loss statistics).
2. the host takes an exclusive prefix sum of the (blocks, E) histogram (E is 4-16: a few hundred numbers), then
   `_route_pos_kernel` adds each token's rank inside its block (a cumsum of the one-hot) to its block's offset:
   position = number of earlier tokens routed to the same expert; kept = position < capacity.
The backward of routing is `_route_bwd_kernel` (d logits from d gate, d mean-probs and d logsumexp) followed by two
small GEMMs on the host (dx = dlogits @ Wg, dWg = dlogits^T @ x).

Dispatch and combine are row gathers by index (`_gather_rows_kernel`): dispatch writes every slot of the
(E, capacity, D) buffer exactly once (the token it holds, or zeros), so no memset and no atomics; its backward is
the gather by token. Combine gathers each token's slot and scales by the gate; its backward gathers by slot
(dy) and reduces a row dot product (`_rowdot_kernel`, d gate).

Roofline: all of it is memory-bound. Routing reads x once (N*D*2 bytes in bf16) for 2*N*D*E FLOP: E FLOP/byte
(8 for 8 experts); dispatch/combine move 2*N*D elements (read + write), no FLOPs worth counting. The bench reports
GB/s against HBM bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_fwd_kernel(
    X, WG, PROBS, EXPERT, GATE, LSE, BLOCK_COUNTS, BLOCK_PSUM, N, D, E, stride_x,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < N
    e = tl.arange(0, BLOCK_E)
    e_mask = e < E
    acc = tl.zeros([BLOCK_N, BLOCK_E], dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        xs = tl.load(X + rows64[:, None] * stride_x + d[None, :], mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        ws = tl.load(WG + e[:, None] * D + d[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0)
        acc += tl.dot(xs.to(tl.float32), tl.trans(ws.to(tl.float32)), input_precision="ieee")
    logits = tl.where(e_mask[None, :], acc, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - m[:, None])
    s = tl.sum(p, axis=1)
    probs = p / s[:, None]
    expert = tl.argmax(probs, axis=1, tie_break_left=True)
    gate = tl.max(probs, axis=1)
    tl.store(PROBS + rows64[:, None] * E + e[None, :], probs, mask=r_mask[:, None] & e_mask[None, :])
    tl.store(EXPERT + rows, expert.to(tl.int64), mask=r_mask)
    tl.store(GATE + rows, gate, mask=r_mask)
    tl.store(LSE + rows, m + tl.log(s), mask=r_mask)
    onehot = ((expert[:, None] == e[None, :]) & r_mask[:, None]).to(tl.int32)
    tl.store(BLOCK_COUNTS + pid * E + e, tl.sum(onehot, axis=0), mask=e_mask)
    tl.store(BLOCK_PSUM + pid * E + e, tl.sum(tl.where(r_mask[:, None], probs, 0.0), axis=0), mask=e_mask)


@triton.jit
def _route_pos_kernel(
    EXPERT, BLOCK_OFFSET, POSITION, KEPT, N, E, capacity,
    DROP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < N
    e = tl.arange(0, BLOCK_E)
    e_mask = e < E
    expert = tl.load(EXPERT + rows, mask=r_mask, other=-1).to(tl.int32)
    onehot = ((expert[:, None] == e[None, :]) & r_mask[:, None]).to(tl.int32)
    before = tl.cumsum(onehot, axis=0) - onehot  # earlier tokens of the same expert inside this block
    offset = tl.load(BLOCK_OFFSET + pid * E + e, mask=e_mask, other=0)
    position = tl.sum((before + offset[None, :]) * onehot, axis=1)
    tl.store(POSITION + rows, position.to(tl.int64), mask=r_mask)
    if DROP:
        kept = position < capacity
    else:
        kept = position >= 0
    tl.store(KEPT + rows, kept.to(tl.int8), mask=r_mask)


@triton.jit
def _route_bwd_kernel(
    PROBS, EXPERT, DGATE, DPMEAN, DLSE, DLOGITS, N, E, inv_n,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < N
    e = tl.arange(0, BLOCK_E)
    e_mask = e < E
    mask = r_mask[:, None] & e_mask[None, :]
    rows64 = rows.to(tl.int64)
    p = tl.load(PROBS + rows64[:, None] * E + e[None, :], mask=mask, other=0.0)
    expert = tl.load(EXPERT + rows, mask=r_mask, other=-1).to(tl.int32)
    dgate = tl.load(DGATE + rows, mask=r_mask, other=0.0)
    dlse = tl.load(DLSE + rows, mask=r_mask, other=0.0)
    dpm = tl.load(DPMEAN + e, mask=e_mask, other=0.0)
    # d probs = dgate at the chosen expert + d mean_n(probs) / N; softmax backward; d lse / d logits = probs.
    dp = tl.where(expert[:, None] == e[None, :], dgate[:, None], 0.0) + dpm[None, :] * inv_n
    dlogits = p * (dp - tl.sum(p * dp, axis=1)[:, None] + dlse[:, None])
    tl.store(DLOGITS + rows64[:, None] * E + e[None, :], dlogits, mask=mask)


@triton.jit
def _gather_rows_kernel(
    SRC, IDX, SCALE, OUT, R, D,
    HAS_SCALE: tl.constexpr, SCALE_BY_SRC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """OUT[r] = SRC[IDX[r]] (* SCALE[IDX[r] or r]) for IDX[r] >= 0, zeros for IDX[r] < 0; every row written."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_mask = rows < R
    c_mask = cols < D
    idx = tl.load(IDX + rows, mask=r_mask, other=-1)
    ok = idx >= 0
    src_rows = tl.where(ok, idx, 0).to(tl.int64)
    vals = tl.load(SRC + src_rows[:, None] * D + cols[None, :], mask=ok[:, None] & c_mask[None, :], other=0.0)
    if HAS_SCALE:
        if SCALE_BY_SRC:
            s = tl.load(SCALE + src_rows, mask=ok, other=0.0)
        else:
            s = tl.load(SCALE + rows, mask=r_mask & ok, other=0.0)
        vals = vals.to(tl.float32) * s[:, None]
    out_offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(OUT + out_offs, vals.to(OUT.dtype.element_ty), mask=r_mask[:, None] & c_mask[None, :])


@triton.jit
def _rowdot_kernel(A, B, IDX, OUT, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[r] = sum_d A[r, d] * B[IDX[r], d] in fp32 (0 for IDX[r] < 0)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = rows < R
    idx = tl.load(IDX + rows, mask=r_mask, other=-1)
    ok = idx >= 0
    b_rows = tl.where(ok, idx, 0).to(tl.int64)
    a_rows = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        c_mask = cols < D
        a = tl.load(A + a_rows[:, None] * D + cols[None, :], mask=r_mask[:, None] & c_mask[None, :], other=0.0)
        b = tl.load(B + b_rows[:, None] * D + cols[None, :], mask=ok[:, None] & c_mask[None, :], other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(OUT + rows, acc, mask=r_mask)


# ------------------------------------------------------------------------------------------------------ host side
ROUTE_BLOCK_N = 64


def _e_block(e: int) -> int:
    return max(16, triton.next_power_of_2(e))  # tl.dot needs every dim >= 16


def route_fwd(x: torch.Tensor, gate_weight: torch.Tensor, capacity: int, drop_tokens: bool):
    """x: (N, D), gate_weight: (E, D) -> probs (N, E) fp32, expert, position (N,) int64, kept (N,) bool,
    gate (N,) fp32, lse (N,) fp32, counts (E,) int64, probs_mean (E,) fp32."""
    if x.dim() != 2 or gate_weight.dim() != 2 or x.shape[1] != gate_weight.shape[1]:
        raise ValueError(f"x (N, D) and gate_weight (E, D) expected, got {tuple(x.shape)}, {tuple(gate_weight.shape)}")
    if x.device != gate_weight.device:
        raise ValueError("x and gate_weight must be on one device")
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    n, d = x.shape
    e = gate_weight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    gate_weight = gate_weight.contiguous()
    dev = x.device
    blocks = max(1, triton.cdiv(n, ROUTE_BLOCK_N))
    probs = torch.empty(n, e, dtype=torch.float32, device=dev)
    expert = torch.empty(n, dtype=torch.int64, device=dev)
    position = torch.empty(n, dtype=torch.int64, device=dev)
    kept = torch.empty(n, dtype=torch.int8, device=dev)
    gate = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    block_counts = torch.zeros(blocks, e, dtype=torch.int32, device=dev)
    block_psum = torch.zeros(blocks, e, dtype=torch.float32, device=dev)
    if n > 0:
        block_d = max(16, min(64, triton.next_power_of_2(d)))
        _route_fwd_kernel[(blocks,)](
            x, gate_weight, probs, expert, gate, lse, block_counts, block_psum, n, d, e, x.stride(0),
            BLOCK_N=ROUTE_BLOCK_N, BLOCK_D=block_d, BLOCK_E=_e_block(e),
        )  # fmt: skip
        block_offset = (torch.cumsum(block_counts, 0) - block_counts).to(torch.int32).contiguous()
        _route_pos_kernel[(blocks,)](
            expert, block_offset, position, kept, n, e, int(capacity),
            DROP=bool(drop_tokens), BLOCK_N=ROUTE_BLOCK_N, BLOCK_E=_e_block(e),
        )  # fmt: skip
    counts = block_counts.sum(0).to(torch.int64)
    probs_mean = block_psum.sum(0) / max(n, 1)
    return probs, expert, position, kept.bool(), gate, lse, counts, probs_mean


def route_bwd(probs, expert, grad_gate, grad_probs_mean, grad_lse) -> torch.Tensor:
    """d logits (N, E) fp32 from the gradients of gate (N,), probs_mean (E,) and lse (N,)."""
    n, e = probs.shape
    dlogits = torch.empty_like(probs)
    if n > 0:
        _route_bwd_kernel[(triton.cdiv(n, ROUTE_BLOCK_N),)](
            probs, expert, grad_gate.float().contiguous(), grad_probs_mean.float().contiguous(),
            grad_lse.float().contiguous(), dlogits, n, e, 1.0 / n, BLOCK_N=ROUTE_BLOCK_N, BLOCK_E=_e_block(e),
        )  # fmt: skip
    return dlogits


def gather_rows(src: torch.Tensor, index: torch.Tensor, rows: int, scale=None, scale_by_src=False, out_dtype=None):
    """(rows, D): row r = src[index[r]] (times scale[index[r]] or scale[r]), zeros where index[r] < 0."""
    src = src.contiguous()
    d = src.shape[1]
    out = torch.empty(rows, d, dtype=out_dtype or src.dtype, device=src.device)
    if rows == 0 or d == 0:
        return out
    block_d = min(256, triton.next_power_of_2(d))
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(d, block_d))
    scale_arg = scale.float().contiguous() if scale is not None else src  # unused pointer when HAS_SCALE=False
    _gather_rows_kernel[grid](
        src, index.contiguous(), scale_arg, out, rows, d,
        HAS_SCALE=scale is not None, SCALE_BY_SRC=bool(scale_by_src), BLOCK_R=block_r, BLOCK_D=block_d,
    )  # fmt: skip
    return out


def rowdot(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(R,) fp32: sum_d a[r, d] * b[index[r], d], 0 where index[r] < 0."""
    a, b = a.contiguous(), b.contiguous()
    r, d = a.shape
    out = torch.empty(r, dtype=torch.float32, device=a.device)
    if r == 0:
        return out
    if d == 0:
        return out.zero_()
    block_d = min(128, triton.next_power_of_2(d))
    block_r = 32
    _rowdot_kernel[(triton.cdiv(r, block_r),)](a, b, index.contiguous(), out, r, d, BLOCK_R=block_r, BLOCK_D=block_d)
    return out
