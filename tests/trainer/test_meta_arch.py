"""Student/teacher module: EMA equation, fp32 teacher under bf16, missing modalities, DINO loss by hand."""

import copy

import pytest
import torch
import torch.nn.functional as F

from trainer.config import tiny
from trainer.meta_arch import SSLMetaArch
from trainer.objectives.centering import Centering
from trainer.objectives.image import dino_cross_entropy


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
    crit = Centering(5, momentum=0.9)
    crit.center.fill_(0.2)
    s = [torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)]  # two globals and one local student view
    t = [torch.randn(3, 5), torch.randn(3, 5)]
    w = torch.tensor([1.0, 0.0, 1.0])
    probs = [crit.teacher_probs(x, 0.05) for x in t]
    got = dino_cross_entropy(s, probs, w, student_temp=0.1)
    want = 0.0
    for i, j in ((0, 1), (1, 0), (2, 0), (2, 1)):  # never a view against itself
        tp = F.softmax((t[j] - 0.2) / 0.05, dim=-1)
        ce = -(tp * F.log_softmax(s[i] / 0.1, dim=-1)).sum(-1)
        want += (ce[0] + ce[2]) / 2
    torch.testing.assert_close(got, want / 4)


def test_teacher_stays_in_eval_mode_without_drop_path_and_gets_no_grad():
    cfg = tiny()
    cfg.model.drop_path = 0.5
    torch.manual_seed(0)
    m = SSLMetaArch(cfg).train()
    assert m.student.training and not any(mod.training for mod in m.teacher.modules())
    batch = random_batch(b=2)
    with torch.no_grad():
        a = m.encode(m.teacher, batch["views"][0])["pooled"]["hr"]
        b = m.encode(m.teacher, batch["views"][0])["pooled"]["hr"]
        c = m.encode(m.student, batch["views"][0])["pooled"]["hr"]
        d = m.encode(m.student, batch["views"][0])["pooled"]["hr"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # no drop path in the teacher: deterministic
    assert not torch.allclose(c, d)  # the student drops paths
    m(batch, teacher_temp=0.04)["total"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())


def test_total_is_the_weighted_sum_of_terms_whatever_is_absent(model):
    m = copy.deepcopy(model)
    losses = m(random_batch(b=2, has={"s2": [False, False], "s1": [False, False]}), teacher_temp=0.04)
    assert losses["image/s2"].item() == 0.0 and losses["image/s1"].item() == 0.0
    want = sum(v for k, v in losses.items() if k.startswith("image/")) + losses["moe_aux"]
    torch.testing.assert_close(losses["total"], want)  # not divided by the number of terms


def test_all_levels_with_local_views_give_every_rank_the_same_grad_set():
    cfg = tiny()
    cfg.loss.pixel_weight = cfg.loss.object_weight = 1.0
    torch.manual_seed(0)
    m = SSLMetaArch(cfg)

    def grads(batch):
        mm = copy.deepcopy(m)
        out = mm(batch, teacher_temp=0.04)
        out["total"].backward()
        return out, {n for n, p in mm.student.named_parameters() if p.grad is not None}

    full = random_batch(b=2)
    full["local_views"] = [random_batch(b=2, hr=32, s=8, seed=3)["views"][0]]
    # another rank's batch: no S1, and a local view whose box misses the globals (no pixel overlap)
    part = random_batch(b=2, has={"s1": [False, False]}, seed=5)
    part["local_views"] = [random_batch(b=2, hr=32, s=8, has={"s1": [False, False]}, seed=4)["views"][0]]
    for v in part["views"]:
        v["box"] = torch.tensor([[0.0, 0.0, 0.4, 0.4]] * 2)
    part["local_views"][0]["box"] = torch.tensor([[0.6, 0.6, 1.0, 1.0]] * 2)
    out_full, g_full = grads(full)
    out_part, g_part = grads(part)
    assert {k for k in out_full if k.startswith(("pixel/", "object/"))} == {
        f"{lvl}/{t}" for lvl in ("pixel", "object") for t in ("hr", "s2", "s1", "fus")}
    assert g_full == g_part and any("pixel_head" in n for n in g_full)


def test_centre_moves_once_per_optimizer_step(model):
    m = copy.deepcopy(model)
    centre = m.objectives["image"].centers["hr"].center.clone()
    m(random_batch(b=2), teacher_temp=0.04)
    m(random_batch(b=2, seed=1), teacher_temp=0.04)  # two micro-batches of one step
    torch.testing.assert_close(m.objectives["image"].centers["hr"].center, centre)  # not yet
    m.step_objectives()
    assert not torch.equal(m.objectives["image"].centers["hr"].center, centre)


def test_health_gauges_match_an_independent_computation(model):
    """Entropy, feature spread and MoE balance recomputed from the teacher's own backbone and the gates' inputs."""
    import numpy as np

    from trainer.model.moe import SkyMoE

    m = copy.deepcopy(model)
    m.student.train()
    m.objectives["image"].centers["hr"].center.normal_(0, 0.1)  # a non-trivial centre
    seen: dict[str, list[torch.Tensor]] = {}
    for name, moe in m.student["backbone"].named_modules():
        if isinstance(moe, SkyMoE):
            layer, run = moe.deepspeed_moe, moe.deepspeed_moe.run

            def spy(x, _name=name, _run=run, _layer=layer):
                seen.setdefault(_name, []).append(x.detach().reshape(-1, x.shape[-1]).clone())
                return _run(x)
            layer.run = spy
    batch = random_batch(b=4)
    center = m.objectives["image"].centers["hr"].center.clone()
    m(batch, teacher_temp=0.05)
    h = m.health()

    with torch.no_grad():
        pooled = [m.teacher["backbone"].forward_features(v["hr"], "hr")["pooled"] for v in batch["views"]]
        logits = [m.teacher["head"](p).double() for p in pooled]
    probs = [torch.softmax((x - center.double()) / 0.05, -1).numpy() for x in logits]
    ent = np.mean([-(p * np.log(np.maximum(p, 1e-12))).sum(-1) for p in probs])
    z = np.concatenate([p.numpy() for p in pooled]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    cos = [z[i] @ z[j] for i in range(4) for j in range(4) if i != j]  # first view's samples
    assert h["teacher_entropy"] == pytest.approx(ent, rel=1e-4)
    assert h["feature_std"] == pytest.approx(z.std(axis=0, ddof=1).mean() * np.sqrt(z.shape[1]), rel=1e-4)
    assert h["feature_cosine"] == pytest.approx(np.mean(cos), rel=1e-4, abs=1e-6)

    assert set(seen) and all(f"moe_load/{n}" in h for n in seen)
    moes = dict(m.student["backbone"].named_modules())
    for name, xs in seen.items():  # every student call of the step (both views, every modality)
        w = moes[name].deepspeed_moe.gate.wg.weight.detach()
        counts = np.bincount(torch.cat([(x @ w.t()).argmax(-1) for x in xs]).numpy(), minlength=w.shape[0])
        assert h[f"moe_load/{name}"] == pytest.approx(counts.max() / counts.mean(), rel=1e-6)
    assert h["moe_max_over_mean"] == max(h[f"moe_load/{n}"] for n in seen)
    assert "moe_max_over_mean" not in m.health()  # counts reset after each reading
