"""The MoE balance gauge over 2 gloo ranks: the job's load (counts summed over ranks) beside each rank's own."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from trainer.distributed import free_port

pytestmark = pytest.mark.multiproc

# Hand-made student counts per rank (4 experts). Layer A runs on both ranks; layer B only on rank 1 (its modality is
# absent on rank 0), so rank 0 must still join the collective with zeros for it.
COUNTS = {0: {"A": [6, 2, 2, 2]}, 1: {"A": [0, 4, 2, 2], "B": [1, 1, 1, 5]}}
CAPACITY = 3  # kept counts: each rank's counts clipped at a capacity of 3 (what the experts processed)


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    from trainer.config import tiny
    from trainer.distributed import init_distributed, shutdown_distributed
    from trainer.meta_arch import SSLMetaArch
    from trainer.model.moe import SkyMoE

    torch.set_num_threads(1)
    init_distributed()
    torch.manual_seed(0)
    model = SSLMetaArch(tiny())
    names = sorted(n for n, m in model.student["backbone"].named_modules() if isinstance(m, SkyMoE))
    layer = {"A": names[0], "B": names[-1]}
    model._moe_counts = {("student", "hr", layer[k]): [torch.tensor(c), 0, sum(c), torch.tensor(c).clamp(max=CAPACITY)]
                         for k, c in COUNTS[rank].items()}
    model._moe_counts[("teacher", "hr", layer["A"])] = [torch.tensor([100, 0, 0, 0]), 0, 100,
                                                        torch.tensor([3, 0, 0, 0])]  # never in the gauge
    h = model.health()
    queue.put((rank, {k: v for k, v in h.items() if k.startswith("moe_")}, layer))
    shutdown_distributed()


def test_balance_gauge_is_over_all_ranks_and_per_rank():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in procs:
        rank, h, layer = queue.get(timeout=300)
        got[rank] = h
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    a = [x + y for x, y in zip(COUNTS[0]["A"], COUNTS[1]["A"], strict=True)]  # [6, 6, 4, 4]: mean 5
    b = COUNTS[1]["B"]  # [1, 1, 1, 5]: mean 2
    for rank in (0, 1):
        h = got[rank]
        assert h[f"moe_load/{layer['A']}"] == pytest.approx(max(a) / (sum(a) / 4))  # 1.2
        assert h[f"moe_load/{layer['B']}"] == pytest.approx(max(b) / (sum(b) / 4))  # 2.5
        assert h["moe_max_over_mean"] == pytest.approx(2.5)
        # kept, summed over ranks: A [3+0, 2+3, 2+2, 2+2] = [3, 5, 4, 4] (max/mean 1.25); B [1, 1, 1, 3] (2.0)
        assert h["moe_kept_max_over_mean"] == pytest.approx(2.0)
    assert got[0]["moe_max_over_mean_rank"] == pytest.approx(6 / 3)  # rank 0's own layer A only
    assert got[1]["moe_max_over_mean_rank"] == pytest.approx(2.5)
