"""MoE step aggregates against hand-counted routing, and FLOPs per network and view against the full forward."""

import math

import pytest
import torch
from torch import nn

from tests.trainer.test_meta_arch import random_batch
from trainer.config import tiny
from trainer.meta_arch import SSLMetaArch
from trainer.metrics import Metrics, step_flops
from trainer.model.moe import SkyMoE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SSLMetaArch(tiny())


def tokens(experts: list[int]) -> torch.Tensor:
    """One-hot tokens: with a gate of 10 x identity, token i goes to expert experts[i]."""
    return torch.eye(4)[experts]


def test_step_aggregates_hand_counted(model):
    torch.manual_seed(0)
    moe = SkyMoE(4, 8, num_experts=4, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0)
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(10 * torch.eye(4))
    holder = nn.ModuleDict({"ffn": moe})
    model.health()  # start from empty counts
    calls = [  # (network, modality, experts chosen, counted); capacity = ceil(1.0 * N / 4)
        ("student", "hr", [0, 0, 0, 1, 2, 0, 3, 3], True),  # micro-batch 1: cap 2, expert 0 has 4 -> 2 dropped
        ("teacher", "hr", [2, 2], True),  # cap 1 -> 1 dropped
        ("student", "s1", [1, 1], False),  # a zero stand-in row's call: never counted
        ("student", "hr", [1, 1, 1, 1], True),  # micro-batch 2: cap 1 -> 3 dropped
        ("student", "s2", [3], True),  # cap 1, nothing dropped
    ]
    for network, modality, experts, counted in calls:
        holder.train(network == "student")
        moe(tokens(experts))
        model._count_experts(network, modality, holder, counted)
    health = model.health()
    assert model.moe_step == {
        ("student", "hr", "ffn"): {"expert_counts": [4, 5, 1, 2], "kept_counts": [2, 2, 1, 2], "dropped": 5,
                                   "tokens": 12},
        ("student", "s2", "ffn"): {"expert_counts": [0, 0, 0, 1], "kept_counts": [0, 0, 0, 1], "dropped": 0,
                                   "tokens": 1},
        ("teacher", "hr", "ffn"): {"expert_counts": [0, 0, 2, 0], "kept_counts": [0, 0, 1, 0], "dropped": 1,
                                   "tokens": 2},
    }
    # Balance over the student's calls only, modalities summed: [4, 5, 1, 3] -> max / mean = 5 / 3.25.
    assert health["moe_load/ffn"] == pytest.approx(5 / 3.25)
    # What the experts processed (student, modalities summed): [2, 2, 1, 2] + [0, 0, 0, 1] -> max / mean = 3 / 2.
    assert health["moe_kept_max_over_mean"] == pytest.approx(3 / 2)
    assert model.health().get("moe_load/ffn") is None and model.moe_step == {}  # reset after each reading

    m = Metrics(rank=0, port=0, run_dir=None, peak=0.0)
    m.record(step=1, samples=1, tokens=1, flops={}, times={"step": 1.0}, losses={"total": 1.0}, lr=0.0,
             grad_norm=0.0, momentum=0.0, moe={("student", "hr", "ffn"): {"expert_counts": [4, 5, 1, 2], "dropped": 5,
                                                                           "tokens": 12}})
    got = {(s.name, s.labels.get("expert")): s.value for fam in m.registry.collect() for s in fam.samples
           if s.name.startswith("skysense_moe")}
    assert [got[("skysense_moe_expert_tokens", str(e))] for e in range(4)] == [4, 5, 1, 2]
    assert got[("skysense_moe_dropped_tokens_total", None)] == 5
    assert got[("skysense_moe_step_dropped_tokens", None)] == 5


def test_two_micro_batches_count_every_call_by_network_and_modality(model):
    """Every MoE call of two forwards (micro-batches), teacher and student apart, per layer and modality, against
    the gate's argmax recomputed from the tokens each call received; s1 absent from the second micro-batch."""
    calls: list[tuple[str, str, str, torch.Tensor, bool]] = []
    current = {}
    originals = []
    for network in ("student", "teacher"):
        backbone = getattr(model, network)["backbone"]
        ff = backbone.forward_features

        def spy_ff(x, m, *a, _ff=ff, _net=network, **k):
            current["key"] = (_net, m)
            return _ff(x, m, *a, **k)

        backbone.forward_features = spy_ff
        originals.append((backbone, "forward_features"))
        for name, moe in backbone.named_modules():
            if isinstance(moe, SkyMoE):
                layer, run = moe.deepspeed_moe, moe.deepspeed_moe.run

                def spy(x, _name=name, _run=run, _layer=layer):
                    net, mod = current["key"]
                    calls.append((net, mod, _name, x.detach().reshape(-1, x.shape[-1]).clone(), _layer.training))
                    return _run(x)

                layer.run = spy
                originals.append((layer, "run"))
    try:
        model.health()
        batches = [random_batch(b=3, seed=1), random_batch(b=3, seed=2, has={"s1": [False] * 3})]
        for batch in batches:
            model(batch, teacher_temp=0.05)
        model.health()
        got = model.moe_step
    finally:
        for obj, attr in originals:
            delattr(obj, attr)  # the instance attribute hides the class method again
    # Both forwards make the same calls in the same order (a stand-in row runs for an absent modality); micro-batch
    # 2's s1 calls are those stand-ins, which must not count.
    per_forward = len(calls) // 2
    expected: dict[tuple[str, str, str], dict] = {}
    moes = {(net, n): mod for net in ("student", "teacher")
            for n, mod in getattr(model, net)["backbone"].named_modules() if isinstance(mod, SkyMoE)}
    for i, (net, mod, name, x, training) in enumerate(calls):
        if i >= per_forward and mod == "s1":
            continue
        gate = moes[(net, name)].deepspeed_moe.gate
        e = gate.wg.weight.shape[0]
        counts = torch.bincount((x.float() @ gate.wg.weight.detach().float().t()).argmax(-1), minlength=e)
        cf = gate.capacity_factor if training else gate.eval_capacity_factor
        cap = max(gate.min_capacity, math.ceil(cf * x.shape[0] / e))
        acc = expected.setdefault((net, mod, name), {"expert_counts": [0] * e, "kept_counts": [0] * e, "dropped": 0,
                                                      "tokens": 0})
        acc["expert_counts"] = [a + int(c) for a, c in zip(acc["expert_counts"], counts)]
        acc["kept_counts"] = [a + int(c) for a, c in zip(acc["kept_counts"], counts.clamp(max=cap))]
        acc["dropped"] += int((counts - cap).clamp_min(0).sum())
        acc["tokens"] += x.shape[0]
    assert {k[0] for k in got} == {"student", "teacher"} and {k[1] for k in got} == {"hr", "s2", "s1"}
    assert got == expected


@pytest.mark.slow
def test_step_flops_per_network_and_view_match_the_full_forward(model):
    g = torch.Generator().manual_seed(3)
    batch = random_batch(b=2, seed=3)
    small = random_batch(b=2, hr=32, s=8, seed=4)["views"]
    batch["local_views"] = small
    for v in small:
        v["s2"] = torch.randn(v["s2"].shape, generator=g)
    rng = torch.get_rng_state()
    flops = step_flops(model, batch, accum=3)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    model.health()
    assert model.moe_step == {}  # and no expert was counted
    assert set(flops) == {("student", "global", "forward"), ("student", "global", "backward"),
                          ("student", "local", "forward"), ("student", "local", "backward"),
                          ("teacher", "global", "forward")}
    for view in ("global", "local"):
        assert flops[("student", view, "backward")] == 2 * flops[("student", view, "forward")]
    assert flops[("student", "local", "forward")] < flops[("student", "global", "forward")] / 2  # 32 vs 64 px
    # The model's own counter over one real forward: everything outside the objectives (and their heads) is the
    # backbone + fusion of 2 global + 2 local student views and 2 global teacher views, i.e. one micro-batch.
    from torch.utils.flop_counter import FlopCounterMode  # imports triton: not at collection
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(batch, teacher_temp=0.05)
    by_module = counter.get_flop_counts()
    objectives = sum(sum(v.values()) for k, v in by_module.items() if k.count(".") == 2 and
                     k.startswith("SSLMetaArch.objectives."))
    encodes = counter.get_total_flops() - objectives
    forward = sum(v for (_, _, p), v in flops.items() if p == "forward")
    assert forward == pytest.approx(3 * encodes, rel=1e-3)
