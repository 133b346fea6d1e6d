"""SkyMoE under `deepspeed.initialize` with ep_size=2, ZeRO-1, 2 gloo ranks: DeepSpeed sees the MoE layer, splits
expert params into their own optimizer group, and its checkpoint holds every expert (ranks 0 and 1) under global
ids, loading back exactly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from trainer.distributed import free_port

pytestmark = pytest.mark.multiproc


def _worker(rank: int, port: int, ckpt: str, queue) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from torch import nn

    from trainer.distributed import init_distributed
    from trainer.model.moe import SkyMoE

    torch.set_num_threads(1)
    init_distributed()

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(8, 8)
            self.moe = SkyMoE(8, 16, num_experts=4, ep_size=2, capacity_factor=2.0)

        def forward(self, x):
            y, aux, _ = self.moe(self.inp(x))
            return y.square().mean() + 0.01 * aux

    def engine(seed: int):
        torch.manual_seed(seed + 10 * rank)  # experts differ per rank, as they do with global ids
        net = Net()
        groups = split_params_into_different_moe_groups_for_optimizer(
            [{"params": list(net.parameters()), "name": "all"}]
        )
        cfg = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
        }
        eng, *_ = deepspeed.initialize(model=net, model_parameters=groups, config=cfg)
        return eng

    eng = engine(0)
    res = {"has_moe": eng.has_moe_layers, "groups": len(eng.optimizer.param_groups)}
    x = torch.randn(4, 8)
    loss = eng(x)
    eng.backward(loss)
    eng.step()
    eng.save_checkpoint(ckpt, tag="t")
    local = {k: v.clone() for k, v in eng.module.state_dict().items()}
    fresh = engine(1)
    res["differs_before"] = not all(torch.equal(v, fresh.module.state_dict()[k]) for k, v in local.items())
    fresh.load_checkpoint(ckpt, tag="t")
    res["load_exact"] = all(torch.equal(v, fresh.module.state_dict()[k]) for k, v in local.items())
    res["experts"] = {k: v.numpy() for k, v in local.items() if "deepspeed_experts" in k}  # no shared tensors
    queue.put((rank, res))
    torch.distributed.barrier()


def test_deepspeed_engine_checkpoint_holds_every_expert(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=400) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for res in results.values():
        assert res["has_moe"] and res["groups"] >= 2  # dense group + expert group
        assert res["load_exact"] and res["differs_before"]
    files = sorted(f.name for f in (tmp_path / "t").iterdir() if "expert" in f.name)
    assert files == [f"layer_0_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)]
    for rank in range(2):
        for local_id in range(2):
            global_id = rank * 2 + local_id
            saved = torch.load(tmp_path / "t" / files[global_id], map_location="cpu", weights_only=False)
            key = f"moe.deepspeed_moe.experts.deepspeed_experts.{global_id}.fc1.weight"
            local_key = f"moe.deepspeed_moe.experts.deepspeed_experts.{local_id}.fc1.weight"
            torch.testing.assert_close(saved[key], torch.from_numpy(results[rank]["experts"][local_key]))
