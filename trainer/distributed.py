"""Process-group start-up shared by training, tests and tools: gloo on CPU, nccl on CUDA."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float | None = None) -> None:
    """Start DeepSpeed's process group from the launcher's env; a plain `python` run becomes a one-rank world.

    `timeout_s`: how long a collective waits for a missing rank before it fails (DeepSpeed's default otherwise).
    """
    from datetime import timedelta

    import torch

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        # Training never calls inference_all_reduce, the only user of DeepSpeed's shared-memory comm op: skip
        # its 45-85 s JIT build on a fresh machine.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import deepspeed

    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    if timeout_s:
        # Groups made later (DeepSpeed's expert and expert-data-parallel groups) take torch's module default
        # (30 min), not the world group's timeout: without this a dead peer in an MoE all-to-all hangs the job.
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = kwargs["timeout"]
        if hasattr(c10d, "default_pg_nccl_timeout"):
            c10d.default_pg_nccl_timeout = kwargs["timeout"]
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False, **kwargs)


def shutdown_distributed(sync: bool = True) -> None:
    """End the process group. `sync`: first wait for every rank (all ranks got here the same way).

    Without the barrier a fast rank tears down its gloo pairs while a peer is still in a collective or its own
    teardown, and that peer can abort at exit ("terminate called without an active exception", seen in CI after a
    2-rank dry run). A rank leaving on an error of its own passes `sync=False`: its peers may never arrive.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if sync:
        try:
            dist.barrier()
        except RuntimeError:  # a peer already gone: nothing left to wait for
            pass
    dist.destroy_process_group()
