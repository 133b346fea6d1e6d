"""The InfoNCE fallback against a loop computation, and its queue."""

import math

import torch
import torch.nn.functional as F

from trainer.objectives.contrastive import ContrastiveObjective, info_nce


def test_info_nce_against_a_loop():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(3, 4, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    w = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    want = 0.0
    for b in (0, 2):
        cands = [float(q[b] @ k[c]) / 0.2 for c in range(3)] + [float(q[b] @ queue[c]) / 0.2 for c in range(5)]
        want += -(cands[b] - math.log(sum(math.exp(x) for x in cands)))
    torch.testing.assert_close(info_nce(q, k, queue, w, 0.2).double(), torch.tensor(want / 2, dtype=torch.float64))


def test_queue_takes_the_step_keys_in_order_and_wraps():
    obj = ContrastiveObjective(("hr",), dim=2, queue=5, temp=0.2)
    heads = {"contrast_head": torch.nn.Identity()}
    for step in range(2):
        keys = [torch.tensor([[1.0 + step, 0.0], [0.0, 1.0 + step]]), torch.tensor([[3.0, 4.0], [4.0, 3.0]])]
        teacher = [{"pooled": {"hr": x}} for x in keys]
        obj(teacher, teacher, heads, heads, {"hr": torch.ones(2)}, 0.04)
        obj.step()
    # step 0 wrote slots 0-3, step 1 wrote slots 4, 0, 1, 2 (the oldest leave first)
    expect = F.normalize(torch.tensor([[0.0, 2.0], [3.0, 4.0], [4.0, 3.0], [4.0, 3.0], [2.0, 0.0]]), dim=1)
    torch.testing.assert_close(obj.queue_hr, expect)
    assert int(obj.queue_ptr) == 3
