"""Student/teacher module: EMA equation, fp32 teacher under bf16, missing modalities, DINO loss by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer.config import tiny
from trainer.meta_arch import SSLMetaArch
from trainer.objectives.dino import DINOLoss


def random_batch(b=2, hr=64, s=16, t2=4, t1=2, has=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    has = has or {}

    def view():
        return {"hr": torch.randn(b, 3, hr, hr, generator=g, dtype=dtype),
                "s2": torch.randn(b, t2, 10, s, s, generator=g, dtype=dtype),
                "s1": torch.randn(b, t1, 2, s, s, generator=g, dtype=dtype),
                "s2_doy": torch.randint(0, 366, (b, t2), generator=g),
                "s1_doy": torch.randint(0, 366, (b, t1), generator=g),
                **{f"has_{m}": torch.tensor(has.get(m, [True] * b)) for m in ("hr", "s2", "s1")}}
    return {"views": [view(), view()]}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SSLMetaArch(tiny())


def test_teacher_is_a_frozen_copy(model):
    s = dict(model.student.named_parameters())
    for name, p in model.teacher.named_parameters():
        assert not p.requires_grad and torch.equal(p, s[name])


def test_update_teacher_is_the_ema_equation(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in m.teacher.named_parameters()}
    student = dict(m.student.named_parameters())
    m.update_teacher(0.9)
    for n, p in m.teacher.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[n] + 0.1 * student[n])


def test_bf16_keeps_an_fp32_teacher_that_moves(model):
    m = copy.deepcopy(model)
    for p in m.parameters():  # what DeepSpeed does to every parameter under bf16
        p.data = p.data.to(torch.bfloat16)
    m.keep_teacher_fp32(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in m.teacher.parameters())
    name, t = next((n, p) for n, p in m.teacher.named_parameters() if p.ndim == 2)
    s = dict(m.student.named_parameters())[name]
    with torch.no_grad():
        s.add_(0.01)
    t0 = t.clone()
    m.update_teacher(0.999)
    # (1 - m) * 0.01 = 1e-5 per element: kept by fp32, lost entirely by a bf16 teacher.
    torch.testing.assert_close(t - t0, 0.001 * (s.float() - t0), atol=1e-7, rtol=1e-3)
    assert (t0.to(torch.bfloat16) + 1e-5).to(torch.bfloat16).eq(t0.to(torch.bfloat16)).float().mean() > 0.5
    losses = m(random_batch(dtype=torch.bfloat16), teacher_temp=0.04)
    assert torch.isfinite(losses["total"]).item()


def test_missing_modalities_are_masked_and_every_param_gets_a_grad(model):
    def grads_of(batch):
        m = copy.deepcopy(model)
        losses = m(batch, teacher_temp=0.04)
        losses["total"].backward()
        return m, losses, {n for n, p in m.student.named_parameters() if p.grad is not None}

    _, _, full = grads_of(random_batch(b=3))
    m, losses, partial = grads_of(random_batch(b=3, has={"s1": [False, False, False], "hr": [True, False, True]}))
    assert losses["image/s1"].item() == 0.0  # no sample has S1
    # The same parameters get gradients whatever the batch holds, so every rank runs the same graph.
    assert partial == full and len(full) > 100
    grads = [p.grad for p in m.student.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max().item() for g in grads) < 1e3  # no blow-up through zero stand-ins


def test_dino_loss_against_hand_computation():
    torch.manual_seed(1)
    crit = DINOLoss(5, student_temp=0.1, center_momentum=0.9)
    crit.center.fill_(0.2)
    s = [torch.randn(3, 5), torch.randn(3, 5)]
    t = [torch.randn(3, 5), torch.randn(3, 5)]
    w = torch.tensor([1.0, 0.0, 1.0])
    probs = [crit.teacher_probs(x, 0.05) for x in t]
    got = crit(s, probs, w)
    want = 0.0
    for i, j in ((0, 1), (1, 0)):
        tp = F.softmax((t[j] - 0.2) / 0.05, dim=-1)
        ce = -(tp * F.log_softmax(s[i] / 0.1, dim=-1)).sum(-1)
        want += (ce[0] + ce[2]) / 2
    torch.testing.assert_close(got, want / 2)
    crit.update_center(t, w)
    mean = (t[0][[0, 2]].sum(0) + t[1][[0, 2]].sum(0)) / 4
    torch.testing.assert_close(crit.center[0], 0.9 * torch.full((5,), 0.2) + 0.1 * mean)
