"""Compile every Triton kernel variant ahead of time for CUDA targets, on a machine without a GPU.

`python -m kernels.cuda_compile [--targets 80,90] [--quick]` builds each kernel (all dtype / constexpr variants
the host wrappers launch at paper shapes) through Triton's full pipeline, TTIR -> TTGIR -> LLVM -> PTX -> cubin
(Triton ships ptxas), and prints per variant the registers, spills and shared memory where the compiler reports
them. The interpreter checks the numerics on CPU; this checks what the interpreter cannot: that the kernels type-
check, lower and assemble for real GPUs. Must not run with TRITON_INTERPRET=1 (the kernels would be interpreted).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
# Max dynamic shared memory per block (bytes): a kernel that compiles but exceeds it fails at launch.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _variants(quick: bool):
    """(module, kernel name, {arg: signature type}, {constexpr: value}, num_warps) for each variant."""
    dtypes = ["bf16"] if quick else ["fp32", "fp16", "bf16"]
    out = []
    # Window attention: paper window 8 (shifted and not), window 7 (N = 49 < block 64), window 4 (block 16).
    windows = [(8, 4)] if quick else [(8, 0), (8, 4), (7, 3), (4, 2)]
    for dt in dtypes:
        for window, shift, d in [(w, s, 32) for w, s in windows] + ([] if quick else [(8, 4, 64)]):
            n = window * window
            const = dict(NH=11, HEAD_D=d, WINDOW=window, SHIFT=shift, BLOCK_N=max(16, 1 << (n - 1).bit_length()),
                         BLOCK_D=d, IS_FP32=dt == "fp32", QK_MODE={"fp32": 0, "fp16": 1, "bf16": 2}[dt])  # fmt: skip
            warps = 4 if n <= 64 else 8
            for name, ptrs in (("_wa_fwd_kernel", "Q K V O"), ("_wa_bwd_kernel", "Q K V DO DQ DK DV")):
                sig = {p: PTR[dt] for p in ptrs.split()}
                sig |= {p: "*fp32" for p in ("LS", "BIAS", "DSCALE", "DBIAS")}
                out.append(("window_attention", name, sig, const, warps))
    # APM merge: C = 352 (block 512) and C = 1408 (block 2048), reduce and keep.
    for dt in dtypes:
        for c, reduce in [(1408, True)] if quick else [(352, True), (352, False), (1408, True), (1408, False)]:
            block = 1 << (c - 1).bit_length()
            const = dict(REDUCE=reduce, BLOCK_C=block)
            out.append(("apm_merge", "_apm_fwd_kernel",
                        {"X": PTR[dt], "LN_W": "*fp32", "LN_B": "*fp32", "Z": PTR[dt], "MEAN": "*fp32",
                         "RSTD": "*fp32", "eps": "fp32"}, const, min(16, max(1, block // 256))))  # fmt: skip
            out.append(("apm_merge", "_apm_bwd_kernel",
                        {"X": PTR[dt], "LN_W": "*fp32", "DZ": PTR[dt], "MEAN": "*fp32", "RSTD": "*fp32",
                         "DX": PTR[dt], "DW_PART": "*fp32", "DB_PART": "*fp32"}, const,
                        min(16, max(1, block // 128))))  # fmt: skip
    # Routing: 8 experts (block 16), D = 1408 (block 64); dispatch/combine gathers with and without gate scale.
    for dt in dtypes:
        for wdt in ["fp32", dt] if dt != "fp32" and not quick else ["fp32"]:
            out.append(("moe_routing", "_route_fwd_kernel",
                        {"X": PTR[dt], "WG": PTR[wdt], "PROBS": "*fp32", "EXPERT": "*i64", "GATE": "*fp32",
                         "LSE": "*fp32", "BLOCK_COUNTS": "*i32", "BLOCK_PSUM": "*fp32"},
                        dict(BLOCK_N=64, BLOCK_D=64, BLOCK_E=16), 4))  # fmt: skip
        for has_scale, by_src in ((True, True),) if quick else ((False, False), (True, False), (True, True)):
            out.append(("moe_routing", "_gather_rows_kernel",
                        {"SRC": PTR[dt], "IDX": "*i64", "SCALE": "*fp32" if has_scale else PTR[dt], "OUT": PTR[dt]},
                        dict(HAS_SCALE=has_scale, SCALE_BY_SRC=by_src, BLOCK_R=16, BLOCK_D=256), 4))  # fmt: skip
        out.append(("moe_routing", "_rowdot_kernel", {"A": PTR[dt], "B": PTR[dt], "IDX": "*i64", "OUT": "*fp32"},
                    dict(BLOCK_R=32, BLOCK_D=128), 4))  # fmt: skip
    for drop in (True,) if quick else (True, False):
        out.append(("moe_routing", "_route_pos_kernel",
                    {"EXPERT": "*i64", "BLOCK_OFFSET": "*i32", "POSITION": "*i64", "KEPT": "*i8"},
                    dict(DROP=drop, BLOCK_N=64, BLOCK_E=16), 4))  # fmt: skip
    out.append(("moe_routing", "_route_bwd_kernel",
                {"PROBS": "*fp32", "EXPERT": "*i64", "DGATE": "*fp32", "DPMEAN": "*fp32", "DLSE": "*fp32",
                 "DLOGITS": "*fp32", "inv_n": "fp32"}, dict(BLOCK_N=64, BLOCK_E=16), 4))  # fmt: skip
    return out


def ptxas_for(sm: int) -> tuple[str, str]:
    """(path, CUDA release) of the ptxas Triton assembles sm_<sm> kernels with (its bundled one unless
    TRITON_PTXAS_PATH, or TRITON_PTXAS_BLACKWELL_PATH for sm_90+, names another)."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(sm)
    return tool.path, tool.version


def compile_all(targets: list[int], quick: bool = False) -> int:
    """Compile every variant for each sm target; print one line each; return the number of failures."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    failures = 0
    for sm in targets:
        target = GPUTarget("cuda", sm, 32)
        path, release = ptxas_for(sm)
        print(f"sm_{sm}: ptxas {path} (CUDA {release}); the driver must support CUDA {release} to load these")
        for op, name, sig, const, warps in _variants(quick):
            fn = getattr(importlib.import_module(f"kernels.{op}.kernel"), name)
            signature = {a: ("constexpr" if a in const else sig.get(a, "i32")) for a in fn.arg_names}
            dtypes = "/".join(sorted({t[1:] for t in sig.values() if t.startswith("*")}))
            label = f"sm_{sm} {name:20s} [{dtypes}] " + " ".join(f"{k}={v}" for k, v in const.items())
            label += f" warps={warps}"
            t = time.perf_counter()
            try:
                k = triton_compile(ASTSource(fn, signature, const), target=target, options={"num_warps": warps})
            except Exception as exc:
                failures += 1
                print(f"FAIL {label}\n     {type(exc).__name__}: {str(exc)[:1500]}")
                continue
            limit = SHARED_LIMIT.get(sm)
            if limit is not None and k.metadata.shared > limit:
                failures += 1
                print(f"FAIL {label}\n     needs {k.metadata.shared} B of shared memory, sm_{sm} has {limit} B")
                continue
            regs = getattr(k, "n_regs", None)
            spills = getattr(k, "n_spills", None)
            extra = f" regs={regs} spills={spills}" if regs is not None else ""
            print(f"ok   {label} shared={k.metadata.shared}B{extra} ({time.perf_counter() - t:.1f}s)")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.cuda_compile", description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="80,90", help="comma-separated compute capabilities (80 = A100, 90 = H100)")
    p.add_argument("--quick", action="store_true", help="one bf16 variant per kernel at paper shapes")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    failures = compile_all([int(t) for t in args.targets.split(",") if t.strip()], args.quick)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
