"""SkyMoE against DeepSpeed's own MoE (same weights) and hand-computed drop accounting / aux loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from deepspeed.moe.layer import MoE

from trainer.model.moe import Mlp, SkyMoE, moe_capacity


def _pair(dim=16, hidden=32, experts=4, **kw):
    torch.manual_seed(0)
    ours = SkyMoE(dim, hidden, num_experts=experts, capacity_factor=float(experts), min_capacity=0, **kw)
    ds = MoE(
        dim,
        Mlp(dim, hidden),
        num_experts=experts,
        k=1,
        capacity_factor=float(experts),
        eval_capacity_factor=float(experts),
        min_capacity=0,
        use_rts=False,
    )
    # Same module tree and parameter names as DeepSpeed's; our routing-bias buffer is the one extra entry.
    ds.load_state_dict({k: v for k, v in ours.state_dict().items() if k != "deepspeed_moe.route_bias"})
    return ours, ds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_deepspeed_moe(dtype):
    ours, ds = _pair()
    ours, ds = ours.to(dtype), ds.to(dtype)
    x = torch.randn(3, 20, 16, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, aux_a, counts_a = ours(xa)
    yb, aux_b, counts_b = ds(xb)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ya, yb, **tol)
    torch.testing.assert_close(aux_a, aux_b)
    assert torch.equal(counts_a, counts_b)
    g = torch.randn_like(ya)
    ((ya * g).sum() + aux_a).backward()
    ((yb * g).sum() + aux_b).backward()
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (na, pa), (nb, pb) in zip(ours.named_parameters(), ds.named_parameters(), strict=True):
        assert na == nb
        torch.testing.assert_close(pa.grad, pb.grad, **tol)


def test_drop_accounting_and_aux_loss_by_hand():
    torch.manual_seed(1)
    dim, experts, n = 8, 4, 40
    moe = SkyMoE(
        dim, 16, num_experts=experts, capacity_factor=1.0, min_capacity=2, aux_loss_weight=0.5, z_loss_weight=0.1
    )
    x = torch.randn(n, dim)
    out, loss = moe.forward_with_loss(x)
    cap = moe_capacity(n, experts, 1.0, 2)
    assert cap == 10
    wg = moe.deepspeed_moe.gate.wg.weight
    logits = x @ wg.t()
    probs = torch.softmax(logits, -1)
    choice = probs.argmax(-1).tolist()
    seen = [0] * experts
    kept = []
    for c in choice:
        kept.append(seen[c] < cap)
        seen[c] += 1
    stats = moe.stats()
    assert stats["expert_counts"] == seen and stats["capacity"] == cap and stats["tokens"] == n
    assert stats["dropped"] == sum(max(0, s - cap) for s in seen) > 0
    for i in range(n):
        if kept[i]:
            expert = moe.deepspeed_moe.experts.deepspeed_experts[choice[i]]
            torch.testing.assert_close(out[i], probs[i, choice[i]] * expert(x[i]), atol=1e-6, rtol=1e-5)
        else:
            assert (out[i] == 0).all()  # dropped: the residual carries the token
    aux = experts * sum(seen[j] / n * probs[:, j].mean() for j in range(experts))
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(loss, 0.5 * aux + 0.1 * z)


def test_eval_capacity_and_no_drop():
    moe = SkyMoE(8, 16, num_experts=4, capacity_factor=1.0, eval_capacity_factor=3.0, min_capacity=1)
    x = torch.randn(32, 8)
    moe.train()
    moe(x)
    assert moe.stats()["capacity"] == 8
    moe.eval()
    moe(x)
    assert moe.stats()["capacity"] == math.ceil(3.0 * 32 / 4)
    nodrop = SkyMoE(8, 16, num_experts=4, capacity_factor=0.1, drop_tokens=False)
    nodrop(x)
    s = nodrop.stats()
    assert s["dropped"] == 0 and s["capacity"] == max(s["expert_counts"])


def test_expert_param_tags_survive_deepcopy_and_moves():
    moe = SkyMoE(8, 16, num_experts=4, ep_size=2)  # builds without any process group
    teacher = copy.deepcopy(moe)
    meta = SkyMoE(8, 16, num_experts=4).to("meta").to_empty(device="cpu")
    for m in (moe, teacher, meta):
        experts = list(m.deepspeed_moe.experts.parameters())
        assert experts and all(p.allreduce is False and p.group_name == m.expert_group_name for p in experts)
        assert not hasattr(m.deepspeed_moe.gate.wg.weight, "allreduce")
    assert len(moe.deepspeed_moe.experts.deepspeed_experts) == 2  # local experts


def test_init_experts_by_global_id_is_layout_independent():
    """ep_size=2, ep rank 1 holds global experts 2, 3: they must equal experts 2, 3 of the ep_size=1 model."""
    from trainer.model import build_model, tiny_model
    from trainer.model.moe import init_experts

    def experts(ep_size, ep_rank):
        cfg = tiny_model()
        cfg.moe.ep_size = ep_size
        m = build_model(cfg)
        init_experts(m, seed=7, ep_rank=ep_rank)
        return {n: p for n, p in m.named_parameters() if "deepspeed_experts" in n}

    full, rank1 = experts(1, 0), experts(2, 1)
    for name, p in rank1.items():
        local = int(name.split("deepspeed_experts.")[1].split(".")[0])
        twin = name.replace(f"deepspeed_experts.{local}.", f"deepspeed_experts.{local + 2}.")
        assert torch.equal(p, full[twin]), name
    w = [p for n, p in full.items() if n.endswith("fc1.weight")]
    assert not torch.equal(w[0], w[1])  # every expert has its own weights
    assert abs(float(w[0].detach().std()) - 0.02) < 0.004  # trunc_normal(std=0.02), as the rest of the model


def test_whole_model_init_is_independent_of_ep_size_and_fc2_is_not_fc1():
    """Dense weights after the first MoE layer, and the heads built after the backbone, must not depend on how
    many experts are local; and an expert's fc2 is drawn from its own stream, not fc1's values again."""
    from trainer.config import tiny
    from trainer.meta_arch import SSLMetaArch

    def build(ep_size, ep_rank):
        cfg = tiny()
        cfg.model.moe.ep_size = ep_size
        torch.manual_seed(0)
        m = SSLMetaArch(cfg)
        if ep_rank:  # what rank `ep_rank` of an expert-parallel group builds
            from trainer.model.moe import init_experts

            init_experts(m.student["backbone"], cfg.train.seed, ep_rank)
        return dict(m.student.named_parameters())

    full, half = build(1, 0), build(2, 0)
    dense = [n for n in full if "deepspeed_experts" not in n]
    assert len(dense) > 50 and set(dense) == {n for n in half if "deepspeed_experts" not in n}
    for name in dense:
        assert torch.equal(full[name], half[name]), name
    for name, p in half.items():
        if "deepspeed_experts" in name:
            assert torch.equal(p, full[name]), name  # local experts 0, 1 of ep rank 0 are global 0, 1
    fc1 = next(p for n, p in full.items() if n.endswith("deepspeed_experts.0.fc1.weight"))
    fc2 = next(p for n, p in full.items() if n.endswith("deepspeed_experts.0.fc2.weight"))
    flat1, flat2 = fc1.detach().flatten(), fc2.detach().t().flatten()
    assert not torch.equal(flat1[:64], fc2.detach().flatten()[:64]) and not torch.equal(flat1, flat2)
