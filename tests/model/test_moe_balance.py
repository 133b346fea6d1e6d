"""Bias-based expert balancing (DeepSeek-V3's auxiliary-loss-free scheme): the choice, the update, the meta-arch."""

from __future__ import annotations

import pytest
import torch

from trainer.config import tiny
from trainer.meta_arch import SSLMetaArch
from trainer.model import ops
from trainer.model.moe import SkyMoE


def test_bias_changes_the_choice_not_the_gate_value():
    torch.manual_seed(0)
    x, w = torch.randn(50, 8), torch.randn(4, 8)
    bias = torch.tensor([0.3, -0.2, 0.0, 0.1])
    r = ops.top1_route(x, w, capacity=50, drop_tokens=True, bias=bias)
    probs = torch.softmax(x @ w.t(), -1)
    want = [int(torch.argmax(probs[i] + bias)) for i in range(50)]
    assert r.expert.tolist() == want
    torch.testing.assert_close(r.gate, probs[torch.arange(50), torch.tensor(want)])
    assert r.counts.tolist() == [want.count(e) for e in range(4)]
    assert (r.expert != probs.argmax(-1)).any()  # the bias did move some tokens


def test_balance_step_is_the_proportional_rule_recentred():
    torch.manual_seed(0)
    moe = SkyMoE(8, 16, num_experts=4, capacity_factor=4.0, min_capacity=0).train()
    layer = moe.deepspeed_moe
    layer._step_counts = torch.tensor([10, 2, 2, 3])
    layer.balance_step(0.1)
    step = torch.tensor([4.25 - 10, 4.25 - 2, 4.25 - 2, 4.25 - 3]) / 4.25  # mean 4.25; already sums to 0
    torch.testing.assert_close(layer.route_bias, 0.1 * step)
    assert layer._step_counts is None
    layer._step_counts = torch.tensor([5, 5, 5, 5])  # balanced: the bias stays where it is
    layer.balance_step(0.1)
    torch.testing.assert_close(layer.route_bias, 0.1 * step)


def test_no_counting_without_balancing():
    moe = SkyMoE(8, 16, num_experts=4).train()
    moe(torch.randn(20, 8))
    assert moe.deepspeed_moe._step_counts is None  # off by default: nothing accumulates
    moe.deepspeed_moe.balancing = True
    moe(torch.randn(20, 8))
    assert int(moe.deepspeed_moe._step_counts.sum()) == 20


def test_balancing_spreads_a_collapsed_router():
    """Every token prefers expert 0: with the balancer (rate 0.01) the load evens out within ~100 steps, without not."""
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    x[:, 0] = 1.0
    w = 0.5 * torch.randn(4, 8)
    w[:, 0] = torch.tensor([4.0, 0.0, 0.0, 0.0])

    def loads(rate, steps=150):
        moe = SkyMoE(8, 16, num_experts=4, capacity_factor=4.0, min_capacity=0).train()
        moe.deepspeed_moe.balancing = True
        with torch.no_grad():
            moe.deepspeed_moe.gate.wg.weight.copy_(w)
        out = []
        for _ in range(steps):
            moe(x)
            counts = moe.deepspeed_moe._step_counts.float()
            out.append(float(counts.max() / counts.mean()))
            if rate:
                moe.deepspeed_moe.balance_step(rate)
            else:
                moe.deepspeed_moe._step_counts = None
        return out

    off, on = loads(0.0), loads(0.01)
    assert off[-1] > 3.0 and on[0] == pytest.approx(off[0])
    assert max(on[-20:]) < 1.5


def test_meta_arch_steps_the_bias_and_the_teacher_follows():
    cfg = tiny()
    cfg.model.moe.balance_rate = 0.05
    torch.manual_seed(0)
    m = SSLMetaArch(cfg)
    m.train()
    from tests.trainer.test_meta_arch import random_batch

    m(random_batch(b=2, has={"s1": [False, False]}), teacher_temp=0.04)
    student = [x for x in m.student.modules() if isinstance(x, SkyMoE)]
    teacher = [x for x in m.teacher.modules() if isinstance(x, SkyMoE)]
    counts = [s.deepspeed_moe._step_counts.clone() for s in student]
    m.step_objectives()
    for s, t, c in zip(student, teacher, counts, strict=True):
        c = c.float()
        torch.testing.assert_close(s.deepspeed_moe.route_bias, 0.05 * (c.mean() - c) / c.mean())
        torch.testing.assert_close(t.deepspeed_moe.route_bias, s.deepspeed_moe.route_bias)
        assert t.deepspeed_moe._step_counts is None  # the teacher (eval mode) never counts
    # The step's counts are those of the present modalities only (S1 absent: its stand-in row is not counted).
    seen = []
    for s in student:
        def spy(x, _run=s.deepspeed_moe.run, _layer=s.deepspeed_moe):
            seen.append((x.numel() // x.shape[-1], _layer.balance_counting))
            return _run(x)
        s.deepspeed_moe.run = spy
    m(random_batch(b=2, has={"s1": [False, False]}), teacher_temp=0.04)
    assert sum(int(s.deepspeed_moe._step_counts.sum()) for s in student) == sum(n for n, on in seen if on)
    assert any(not on for _, on in seen) and any(on for _, on in seen)


def test_state_dicts_from_before_the_routing_bias_still_load_strictly():
    torch.manual_seed(0)
    moe = SkyMoE(8, 16, num_experts=4)
    old = {k: v for k, v in moe.state_dict().items() if not k.endswith("route_bias")}
    fresh = SkyMoE(8, 16, num_experts=4)
    fresh.deepspeed_moe.route_bias.fill_(0.3)
    fresh.load_state_dict(old)  # strict
    assert fresh.deepspeed_moe.route_bias.abs().sum() == 0
    x = torch.randn(20, 8)
    torch.testing.assert_close(fresh(x)[0], moe(x)[0])
