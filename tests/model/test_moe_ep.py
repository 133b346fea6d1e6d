"""Expert parallelism: SkyMoE with ep_size=2 on 2 gloo ranks equals ep_size=1 (outputs and every gradient)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from trainer.distributed import free_port

pytestmark = pytest.mark.multiproc


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    import torch.distributed as dist
    from deepspeed.utils import groups

    from trainer.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    groups._create_expert_and_data_parallel(2)
    for mode, drop_tokens, reroute in MODES:
        queue.put((rank, mode, _compare(rank, drop_tokens, reroute)))
    dist.barrier()
    dist.destroy_process_group()


MODES = (("drop", True, 0), ("no-drop", False, 0), ("reroute", True, 1))  # (name, drop_tokens, reroute rounds)


def _compare(rank: int, drop_tokens: bool, reroute: int) -> dict[str, float]:
    import torch.distributed as dist

    from trainer.model.moe import SkyMoE

    dim, hidden, experts = 16, 32, 4
    kw = dict(num_experts=experts, capacity_factor=1.0, min_capacity=2, drop_tokens=drop_tokens, reroute=reroute)
    torch.manual_seed(0)  # same reference weights on both ranks
    ref = SkyMoE(dim, hidden, ep_size=1, **kw)
    ep = SkyMoE(dim, hidden, ep_size=2, **kw)
    ep.set_deepspeed_parallelism()
    local = experts // 2
    with torch.no_grad():
        ep.deepspeed_moe.gate.wg.weight.copy_(ref.deepspeed_moe.gate.wg.weight)
        for i in range(local):
            src = ref.deepspeed_moe.experts.deepspeed_experts[rank * local + i].state_dict()
            ep.deepspeed_moe.experts.deepspeed_experts[i].load_state_dict(src)
    torch.manual_seed(100 + rank)  # different tokens per rank; rank 1 has more, so capacity is agreed by max
    n = 24 + 8 * rank
    x = torch.randn(n, dim)
    x_ref, x_ep = x.clone().requires_grad_(), x.clone().requires_grad_()
    # The ep_size=1 reference must use the capacity the group agrees on (max tokens over ranks).
    ref.deepspeed_moe.gate.capacity_factor = 1e-6
    ref.deepspeed_moe.gate.min_capacity = 8  # ceil(1.0 * 32 / 4)
    y_ref, aux_ref, _ = ref(x_ref)
    y_ep, aux_ep, _ = ep(x_ep)
    w = torch.randn(n, dim)
    ((y_ref * w).sum() + aux_ref).backward()
    ((y_ep * w).sum() + aux_ep).backward()
    # Expert weights see tokens of both ranks under ep: sum the reference expert grads over ranks.
    ref_grads = [p.grad.clone() for p in ref.deepspeed_moe.experts.parameters()]
    for g in ref_grads:
        dist.all_reduce(g)
    per_expert = len(ref_grads) // experts
    mine = ref_grads[rank * local * per_expert : (rank + 1) * local * per_expert]
    ep_grads = [p.grad for p in ep.deepspeed_moe.experts.parameters()]
    return {
        "out": (y_ref - y_ep).abs().max().item(),
        "aux": (aux_ref - aux_ep).abs().item(),
        "dx": (x_ref.grad - x_ep.grad).abs().max().item(),
        "gate": (ref.deepspeed_moe.gate.wg.weight.grad - ep.deepspeed_moe.gate.wg.weight.grad).abs().max().item(),
        "experts": max((a - b).abs().max().item() for a, b in zip(mine, ep_grads, strict=True)),
        "dropped": ep.stats()["dropped"],
        "dropped_ref": ref.stats()["dropped"],
        "capacity": ep.stats()["capacity"],
    }


def test_ep2_matches_ep1() -> None:
    """With and without token dropping, and with overflow re-routing (each rank re-routes its own tokens, as the
    reference does); the first launch JIT-compiles DeepSpeed's shm comm op: ~1-2 min."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(2 * len(MODES)):
        rank, mode, res = queue.get(timeout=300)
        results[rank, mode] = res
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for (rank, mode), res in results.items():
        for key in ("out", "aux", "dx", "gate", "experts"):
            assert res[key] < 1e-5, (rank, mode, key, res)
        assert res["dropped"] == res["dropped_ref"]
        if mode != "no-drop":
            assert res["capacity"] == 8  # ceil(1.0 * 32 / 4): the larger rank's token count on both ranks
    dropped = {mode: sum(results[r, mode]["dropped"] for r in range(2)) for mode, _, _ in MODES}
    assert dropped["drop"] > dropped["reroute"], dropped  # the test exercises dropping, and re-routing places some
