"""Hardware and data tables for the capacity planner: every number here is an assumption the plan prints.

GPU figures are vendor datasheet values (dense bf16 tensor-core peak, memory, NVLink per GPU). Interconnects are
per-GPU NICs in a rail-optimised node (one NIC per GPU), with an achievable fraction of line rate for NCCL's
bus bandwidth. The dataprep figures are those `python -m dataprep bench` measured (docs/dataprep.md).
"""

from __future__ import annotations

# name: peak dense bf16 TFLOP/s, memory GiB usable by tensors, NVLink GB/s per GPU (one direction), HBM TB/s
GPUS = {
    "h20": {"peak_tflops": 148.0, "mem_gib": 96.0, "nvlink_GBps": 450.0, "hbm_TBps": 4.0},
    "h100": {"peak_tflops": 989.0, "mem_gib": 80.0, "nvlink_GBps": 450.0, "hbm_TBps": 3.35},
    "h800": {"peak_tflops": 989.0, "mem_gib": 80.0, "nvlink_GBps": 200.0, "hbm_TBps": 3.35},
    "h200": {"peak_tflops": 989.0, "mem_gib": 141.0, "nvlink_GBps": 450.0, "hbm_TBps": 4.8},
    "a100": {"peak_tflops": 312.0, "mem_gib": 80.0, "nvlink_GBps": 300.0, "hbm_TBps": 2.0},
}

# name: line rate per GPU in Gb/s, achievable fraction for collectives (NCCL bus bandwidth / line rate)
NETS = {
    "ib400": {"gbit": 400.0, "efficiency": 0.80},
    "ib200": {"gbit": 200.0, "efficiency": 0.80},
    "roce400": {"gbit": 400.0, "efficiency": 0.70},
    "roce200": {"gbit": 200.0, "efficiency": 0.70},
}

NVLINK_EFFICIENCY = 0.75  # NCCL bus bandwidth over NVLink, fraction of the one-direction datasheet rate

# Achieved fraction of the bf16 peak on the model's matmul FLOPs. An assumption to argue with: dense transformer
# training reaches 0.4-0.55 on H100-class parts; this model has many small matmuls (S2/S1 frames of 16 tokens,
# 8x8 windows) and a 24-layer fusion over 17-token sequences, so 0.35 is the default.
COMPUTE_EFFICIENCY = 0.35
# Achieved fraction of HBM bandwidth for the memory-bound ops (elementwise, layer norm, softmax, copies), whose time
# the planner takes from the bytes they write (plan_trace.LiveBytes.written). Assumption: PyTorch's eager
# elementwise kernels reach 0.5-0.8 of HBM on large tensors, less on this model's small ones.
MEMORY_EFFICIENCY = 0.5
DEFAULT_HBM_TBPS = 2.0  # for a --gpu-kind given only by --set-hw without hbm_TBps
LAUNCH_US = 6.0  # per dispatched op on a GPU (launch + framework), added to the compute time
CUDA_OVERHEAD_GIB = 2.5  # CUDA context, NCCL buffers, cuBLAS workspaces, per GPU
FRAGMENTATION = 0.10  # caching-allocator slack on top of the activation peak

# dataprep bench (docs/dataprep.md, blosc-zstd level 3 + shuffle): compression ratio raw/stored per modality and
# conversion MB (raw) per CPU-second per worker. HR: synthetic sets (no real 2048 px imagery was measured);
# S2: EuroSAT; S1: TerraMind, same codec.
DATAPREP = {"compression": {"hr": 1.18, "s2": 1.74, "s1": 2.75}, "MB_per_cpu_s": 54.0,
            "source": "docs/dataprep.md: dataprep bench on the 2-core dev machine"}

# The paper's data (skysense-v2-paper.txt section 4): 21M sets of HR 2048 px RGB uint8, ~65 S2 dates (10 bands,
# uint16) and ~10 S1 dates (2 bands, float32 dB) of 64 px; dataprep stores each frame as one chunk and HR in
# 256 px chunks.
PAPER_DATA = {"sets": 21_000_000, "hr_px": 2048, "ms_px": 64, "s2_dates": 65, "s1_dates": 10,
              "bytes": {"hr": 1, "s2": 2, "s1": 4}, "bands": {"hr": 3, "s2": 10, "s1": 2}}

# Compute the papers report, for comparison with a plan (objectives-notes.md, skysense-v2-paper.txt).
REPORTED = [
    "SkySense V2 (paper): 128 H20, batch 1024, 600k iterations; no GPU-hours or wall time reported",
    "SkySense V1 (summary): 80 A100-80GB, batch 240, 875k iterations, ~24.6k GPU-hours (~12.8 days)",
]
