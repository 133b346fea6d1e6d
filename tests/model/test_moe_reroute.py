"""Overflow re-routing (ops.reroute_overflow, MoEConfig.reroute) against a token-by-token reference of the same rule,
and the MoE layer's output against a per-token computation."""

from __future__ import annotations

import pytest
import torch

from trainer.model import ops
from trainer.model.moe import SkyMoE, moe_capacity


def reference(choice: torch.Tensor, capacity: int, rounds: int) -> tuple[list, list]:
    """The rule one token at a time in plain Python: first choices fill slots in token order; then, per round, every
    still-dropped token picks its best expert among those not full at the round's start, in token order."""
    n, e = choice.shape
    c = choice.tolist()
    expert, position, taken, pending = [None] * n, [None] * n, [0] * e, []
    for i in range(n):
        j = max(range(e), key=lambda k: c[i][k])
        if taken[j] < capacity:
            expert[i], position[i] = j, taken[j]
            taken[j] += 1
        else:
            pending.append(i)
    for _ in range(rounds):
        open_ = [k for k in range(e) if taken[k] < capacity]
        if not pending or not open_:
            break
        picks = {i: max(open_, key=lambda k: c[i][k]) for i in pending}
        still = []
        for i in pending:
            j = picks[i]
            if taken[j] < capacity:
                expert[i], position[i] = j, taken[j]
                taken[j] += 1
            else:
                still.append(i)
        pending = still
    return expert, position


def skewed(n: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(e, 8, generator=g)
    x[:, 0] += 1.0
    w[:, 0] = 0.0
    w[0, 0] = 1.5  # most tokens prefer expert 0: it overflows
    return x, w


@pytest.mark.parametrize("rounds", [1, 2, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_token_by_token_reference(rounds, seed):
    n, e = 64, 4
    x, w = skewed(n, e, seed)
    cap = moe_capacity(n, e, 1.25, 0)
    r = ops.top1_route(x, w, cap, True, reroute=rounds)
    probs = torch.softmax(x @ w.t(), -1)
    want_e, want_p = reference(probs, cap, rounds)
    kept = [v is not None for v in want_e]
    assert r.kept.tolist() == kept
    assert [int(v) for v, k in zip(r.expert, kept) if k] == [v for v in want_e if v is not None]
    assert [int(v) for v, k in zip(r.position, kept) if k] == [v for v in want_p if v is not None]
    assert r.dropped == n - sum(kept)
    # The gate is the (unbiased) probability of the expert finally taken; counts and aux loss stay the first choice.
    torch.testing.assert_close(r.gate, probs[torch.arange(n), r.expert])
    plain = ops.top1_route(x, w, cap, True)
    assert torch.equal(r.counts, plain.counts) and torch.equal(r.aux_loss, plain.aux_loss)
    assert plain.dropped > r.dropped  # the skew made first choices overflow, and re-routing placed some
    load = torch.bincount(r.expert[r.kept], minlength=e)
    assert int(load.max()) <= cap


def test_enough_rounds_and_slots_drop_nothing_and_slots_are_unique():
    n, e = 60, 4
    x, w = skewed(n, e, 5)
    cap = moe_capacity(n, e, 1.0, 0)  # exactly n slots
    r = ops.top1_route(x, w, cap, True, reroute=e)
    assert r.dropped == 0 and bool(r.kept.all())
    slots = {(int(a), int(b)) for a, b in zip(r.expert, r.position)}
    assert len(slots) == n and all(0 <= p < cap for _, p in slots)


def test_bias_steers_the_reroute_choice_too():
    n, e = 64, 4
    x, w = skewed(n, e, 3)
    cap = moe_capacity(n, e, 1.25, 0)
    bias = torch.tensor([0.0, 0.2, -0.2, 0.0])
    r = ops.top1_route(x, w, cap, True, bias=bias, reroute=2)
    probs = torch.softmax(x @ w.t(), -1)
    want_e, _ = reference(probs + bias, cap, 2)
    assert [int(v) if k else None for v, k in zip(r.expert, r.kept)] == want_e
    torch.testing.assert_close(r.gate, probs[torch.arange(n), r.expert])


def test_layer_output_is_gate_times_the_expert_taken():
    torch.manual_seed(0)
    n, e = 48, 4
    x, w = skewed(n, e, 7)
    moe = SkyMoE(8, 16, num_experts=e, capacity_factor=1.0, min_capacity=0, reroute=2).train()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(w)
    out, _, counts = moe(x)
    probs = torch.softmax(x @ w.t(), -1)
    want_e, _ = reference(probs, moe_capacity(n, e, 1.0, 0), 2)
    experts = moe.deepspeed_moe.experts.deepspeed_experts
    for i, j in enumerate(want_e):
        if j is None:
            assert (out[i] == 0).all()
        else:
            torch.testing.assert_close(out[i], probs[i, j] * experts[j](x[i]), atol=1e-6, rtol=1e-5)
    st = moe.stats()
    assert st["expert_counts"] == torch.bincount(probs.argmax(-1), minlength=e).tolist() == counts.tolist()
    assert st["kept_counts"] == [want_e.count(j) for j in range(e)]
    assert st["dropped"] == want_e.count(None) < sum(max(0, c - st["capacity"]) for c in st["expert_counts"])
