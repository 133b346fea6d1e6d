"""MGCL pixel / object levels, centring, Sinkhorn and KoLeo against independent float64 loop computations."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from trainer.distributed import free_port
from trainer.geometry import ground_to_view, view_to_ground
from trainer.objectives.centering import Centering, sinkhorn_knopp
from trainer.objectives.dino import DINOHead
from trainer.objectives.koleo import koleo_loss
from trainer.objectives.object import ObjectLoss, cluster_assignments
from trainer.objectives.pixel import PixelLoss, pixel_targets
from trainer.objectives.sinkhorn import sinkhorn

D = torch.float64


# ---------------------------------------------------------------- independent references (loops, float64)

def ref_softmax(v: list[float]) -> list[float]:
    top = max(v)
    e = [math.exp(a - top) for a in v]
    return [a / sum(e) for a in e]


def ref_sinkhorn_knopp(logits, temp, n_iters):
    """DINOv2's algorithm written as loops over prototypes and samples. logits: N lists of K."""
    n, k = len(logits), len(logits[0])
    q = [[math.exp(logits[b][p] / temp) for b in range(n)] for p in range(k)]  # K x N
    tot = sum(map(sum, q))
    q = [[a / tot for a in row] for row in q]
    for _ in range(n_iters):
        for p in range(k):
            s = sum(q[p])
            q[p] = [a / s / k for a in q[p]]
        for b in range(n):
            s = sum(q[p][b] for p in range(k))
            for p in range(k):
                q[p][b] = q[p][b] / s / n
    return [[q[p][b] * n for p in range(k)] for b in range(n)]


def ref_sinkhorn(scores, eps, n_iters):
    n, k = len(scores), len(scores[0])
    q = [[math.exp(scores[r][c] / eps) for c in range(k)] for r in range(n)]
    tot = sum(map(sum, q))
    q = [[a / tot for a in row] for row in q]
    for _ in range(n_iters):
        for c in range(k):
            s = sum(q[r][c] for r in range(n))
            for r in range(n):
                q[r][c] *= 1 / k / s
        for r in range(n):
            s = sum(q[r])
            q[r] = [a / n / s for a in q[r]]
    return q


def ref_clusters(feats, nc, eps, n_iters, kmeans_iters):
    """Spherical k-means with Sinkhorn assignment steps, anchors starting at evenly spaced points. feats (G, C)."""
    f = [r / r.norm() for r in feats]
    g = len(f)
    anchors = [f[round(c * (g - 1) / max(nc - 1, 1))] for c in range(nc)]
    for it in range(kmeans_iters + 1):
        plan = ref_sinkhorn([[float(p @ a) for a in anchors] for p in f], eps, n_iters)
        assign = [[q * g for q in row] for row in plan]
        if it < kmeans_iters:
            anchors = [sum(assign[p][c] * f[p] for p in range(g)) for c in range(nc)]
            anchors = [a / a.norm() for a in anchors]
    return torch.tensor(assign, dtype=D)


def ref_bilinear(fmap, u, v):
    """fmap (h, w, C); view point (u, v) -> (C,), grid_sample(align_corners=False, padding_mode="border")."""
    h, w = fmap.shape[:2]
    y, x = min(max(u * h - 0.5, 0.0), h - 1.0), min(max(v * w - 0.5, 0.0), w - 1.0)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    wy, wx = y - y0, x - x0
    return ((1 - wy) * (1 - wx) * fmap[y0, x0] + (1 - wy) * wx * fmap[y0, x1]
            + wy * (1 - wx) * fmap[y1, x0] + wy * wx * fmap[y1, x1])


def ref_points(geom_a, geom_b, b, grid):
    """Cell centres of the overlap of sample b's boxes, and whether the boxes overlap."""
    a, c = geom_a["box"][b].tolist(), geom_b["box"][b].tolist()
    y0, x0, y1, x1 = max(a[0], c[0]), max(a[1], c[1]), min(a[2], c[2]), min(a[3], c[3])
    pts = [(y0 + (r + 0.5) / grid * (y1 - y0), x0 + (q + 0.5) / grid * (x1 - x0))
           for r in range(grid) for q in range(grid)]
    return pts, (y1 > y0 and x1 > x0)


def ref_feature(fmap, geom, b, point):
    g = {k: geom[k][b] for k in ("box", "flip_y", "flip_x", "rot")}
    u, v = ground_to_view(torch.tensor(point, dtype=D), g["box"], g["flip_y"], g["flip_x"], g["rot"]).tolist()
    return ref_bilinear(fmap[b], u, v)


def ref_ce(s_logits, t_logits, center, t_temp, s_temp) -> float:
    t = ref_softmax([(a - c) / t_temp for a, c in zip(t_logits.tolist(), center.tolist())])
    s = [a / s_temp for a in s_logits.tolist()]
    lse = max(s) + math.log(sum(math.exp(a - max(s)) for a in s))
    return -sum(ti * (si - lse) for ti, si in zip(t, s))


# ---------------------------------------------------------------- fixtures

def random_geom(b: int, gen: torch.Generator) -> dict:
    lo = torch.rand(b, 2, generator=gen, dtype=D) * 0.4
    size = 0.4 + torch.rand(b, 2, generator=gen, dtype=D) * 0.5
    return {"box": torch.cat([lo, (lo + size).clamp(max=1.0)], -1), "flip_y": torch.rand(b, generator=gen) < 0.5,
            "flip_x": torch.rand(b, generator=gen) < 0.5, "rot": torch.randint(0, 4, (b,), generator=gen)}


def views(seed: int = 0, b: int = 3, c: int = 5):
    """2 global + 2 local student views (4x4, 4x4, 2x2, 1x1 maps) and the teacher's 2 global views."""
    gen = torch.Generator().manual_seed(seed)
    geoms = [random_geom(b, gen) for _ in range(4)]
    geoms[3]["box"][0] = torch.tensor([0.95, 0.95, 1.0, 1.0], dtype=D)  # local view of sample 0 off both globals
    for g in geoms[:2]:
        g["box"][0] = torch.tensor([0.0, 0.0, 0.6, 0.6], dtype=D)
    s_maps = [torch.randn(b, n, n, c, generator=gen, dtype=D, requires_grad=True) for n in (4, 4, 2, 1)]
    t_maps = [torch.randn(b, 4, 4, c, generator=gen, dtype=D, requires_grad=True) for _ in range(2)]
    return s_maps, geoms, t_maps, geoms[:2]


def heads(c: int = 5, k: int = 7):
    torch.manual_seed(0)
    return DINOHead(c, k, 16, 8, dtype=D), DINOHead(c, k, 16, 8, dtype=D)


def pairs(n_student: int, n_teacher: int):
    return [(j, i) for j in range(n_teacher) for i in range(n_student) if i != j]


# ---------------------------------------------------------------- centring

def test_probs_formula():
    cen = Centering(4, 0.9)
    cen.center.copy_(torch.tensor([[0.1, -0.2, 0.3, 0.0]]))
    x = torch.randn(3, 4, dtype=D)
    got = cen.probs(x, 0.5)
    for n in range(3):
        want = ref_softmax([(x[n, k].item() - cen.center[0, k].item()) / 0.5 for k in range(4)])
        torch.testing.assert_close(got[n], torch.tensor(want, dtype=D))


def test_accumulate_twice_then_step_is_one_ema_over_both_batches():
    m, k = 0.8, 3
    cen = Centering(k, m)
    c0 = torch.tensor([[0.5, -1.0, 2.0]])
    cen.center.copy_(c0)
    a, b = torch.randn(4, k), torch.randn(2, k)
    wa, wb = torch.tensor([1.0, 0.0, 1.0, 1.0]), None
    cen.accumulate(a, wa)
    cen.accumulate(b, wb)
    cen.step()
    rows = [a[i] for i in range(4) if wa[i] > 0] + [b[i] for i in range(2)]
    mean = [sum(r[q].item() for r in rows) / len(rows) for q in range(k)]
    want = [m * c0[0, q].item() + (1 - m) * mean[q] for q in range(k)]
    torch.testing.assert_close(cen.center, torch.tensor([want]), atol=1e-6, rtol=1e-6)
    assert cen.pending_count.item() == 0 and cen.pending_sum.abs().sum().item() == 0
    before = cen.center.clone()
    cen.step()  # nothing pending
    torch.testing.assert_close(cen.center, before, atol=0, rtol=0)
    cen.accumulate(a, torch.zeros(4))  # only masked rows pending
    cen.step()
    torch.testing.assert_close(cen.center, before, atol=0, rtol=0)
    assert set(cen.state_dict()) == {"center", "pending_sum", "pending_count"}


def test_mode_switch():
    x = torch.randn(5, 4, dtype=D)
    torch.testing.assert_close(Centering(4, 0.9).teacher_probs(x, 0.3), Centering(4, 0.9).probs(x, 0.3))
    torch.testing.assert_close(Centering(4, 0.9, "sinkhorn").teacher_probs(x, 0.3), sinkhorn_knopp(x, 0.3))
    with pytest.raises(ValueError):
        Centering(4, 0.9, "softmax")


# ---------------------------------------------------------------- Sinkhorn

def test_sinkhorn_knopp_matches_loops_and_meets_marginals():
    x = torch.randn(6, 4, dtype=D)
    for it in (1, 3):  # with 0 iterations DINOv2 returns unnormalised rows; ours are always assignments
        want = torch.tensor(ref_sinkhorn_knopp(x.tolist(), 0.2, it), dtype=D)
        torch.testing.assert_close(sinkhorn_knopp(x, 0.2, it), want)
    q = sinkhorn_knopp(x, 0.5, 300)
    torch.testing.assert_close(q.sum(1), torch.ones(6, dtype=D))
    torch.testing.assert_close(q.sum(0), torch.full((4,), 6 / 4, dtype=D), atol=1e-6, rtol=0)
    assert sinkhorn_knopp(x.float() * 50, 0.01).isfinite().all()  # exp(5000) without the shift


def test_sinkhorn_knopp_masked_rows_take_no_mass():
    x = torch.randn(7, 5, dtype=D) * 3
    x[2] = 80.0  # a huge masked row must not change the others
    w = torch.tensor([1.0, 1, 0, 1, 0, 1, 1])
    got = sinkhorn_knopp(x, 0.1, 3, w)
    keep = w > 0
    assert got[~keep].abs().max().item() == 0
    want = torch.tensor(ref_sinkhorn_knopp(x[keep].tolist(), 0.1, 3), dtype=D)
    torch.testing.assert_close(got[keep], want)


def test_uniform_sinkhorn_matches_loops_and_meets_marginals():
    s = torch.randn(2, 6, 3, dtype=D)
    got = sinkhorn(s, 0.3, 4)
    for b in range(2):
        torch.testing.assert_close(got[b], torch.tensor(ref_sinkhorn(s[b].tolist(), 0.3, 4), dtype=D))
    plan = sinkhorn(s, 0.5, 300)
    torch.testing.assert_close(plan.sum(-1), torch.full((2, 6), 1 / 6, dtype=D))
    torch.testing.assert_close(plan.sum(-2), torch.full((2, 3), 1 / 3, dtype=D), atol=1e-8, rtol=0)
    assert sinkhorn(s.half(), 0.05, 3).dtype == torch.float32


# ---------------------------------------------------------------- alignment (RoIAlign-style sampling)

def linear_pattern(geom: dict, n: int) -> torch.Tensor:
    """(B, n, n, 3) map whose pixel centres hold an affine function of their ground (y, x)."""
    t = (torch.arange(n, dtype=D) + 0.5) / n
    uv = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1)  # (n, n, 2)
    col = {k: geom[k][:, None, None] for k in ("box", "flip_y", "flip_x", "rot")}
    g = view_to_ground(uv[None], col["box"], col["flip_y"], col["flip_x"], col["rot"])  # (B, n, n, 2)
    return torch.stack([g[..., 0], g[..., 1], 2 * g[..., 0] - 3 * g[..., 1] + 0.5], -1)


def test_same_ground_points_read_the_same_features_in_both_views():
    b = 8
    combos = [(fy, fx, r) for fy in (0, 1) for fx in (0, 1) for r in range(4)]
    ga = {"box": torch.tensor([[0.1, 0.2, 0.7, 0.8]], dtype=D).expand(b, 4), "flip_y": torch.tensor([c[0] for c in
          combos[:b]]).bool(), "flip_x": torch.tensor([c[1] for c in combos[:b]]).bool(),
          "rot": torch.tensor([c[2] for c in combos[:b]])}
    gb = {"box": torch.tensor([[0.25, 0.3, 0.85, 1.0]], dtype=D).expand(b, 4), "flip_y": ga["flip_x"].roll(1),
          "flip_x": ~ga["flip_y"], "rot": (ga["rot"] + torch.arange(b)) % 4}
    fa, fb = linear_pattern(ga, 8), linear_pattern(gb, 12)
    sa, sb, valid = pixel_targets(fa, ga, fb, gb, grid=4)
    assert sa.shape == (b, 16, 3) and valid.all()
    torch.testing.assert_close(sa, sb)
    pts, _ = ref_points(ga, gb, 0, 4)
    y, x = torch.tensor(pts, dtype=D).unbind(-1)
    want = torch.stack([y, x, 2 * y - 3 * x + 0.5], -1)  # bilinear sampling of an affine pattern is exact
    torch.testing.assert_close(sa, want.expand(b, 16, 3))


def test_sampling_matches_loops_and_works_on_1x1_maps():
    s_maps, geoms, _, _ = views()
    for i, j in ((0, 1), (2, 0), (3, 1)):
        s, t, valid = pixel_targets(s_maps[i], geoms[i], s_maps[j], geoms[j], grid=3)
        for b in range(3):
            pts, ok = ref_points(geoms[i], geoms[j], b, 3)
            assert bool(valid[b]) == ok
            for g, p in enumerate(pts):
                torch.testing.assert_close(s[b, g], ref_feature(s_maps[i], geoms[i], b, p))
                torch.testing.assert_close(t[b, g], ref_feature(s_maps[j], geoms[j], b, p))
    assert not pixel_targets(s_maps[3], geoms[3], s_maps[0], geoms[0], 2)[2][0]  # disjoint boxes


# ---------------------------------------------------------------- pixel and object losses

def ref_terms(s_maps, geoms, t_maps, t_geoms, sh, th, weight, grid, assign=None):
    """Per (pair, sample): mask and the (student, teacher) logits of each point, or of each cluster centre given
    `assign` (teacher point features (1, G, C) -> (1, G, N_C)), computed one point at a time."""
    out = []
    for j, i in pairs(len(s_maps), len(t_maps)):
        for b in range(weight.shape[0]):
            pts, ok = ref_points(geoms[i], t_geoms[j], b, grid)
            sf = [ref_feature(s_maps[i], geoms[i], b, p) for p in pts]
            tf = [ref_feature(t_maps[j], t_geoms[j], b, p) for p in pts]
            if assign is not None:
                a = assign(torch.stack(tf)[None])[0].to(D)
                torch.testing.assert_close(a.sum(-1), torch.ones(len(pts), dtype=D))
                sf, tf = ([sum(a[g, c] * f[g] for g in range(len(pts))) / a[:, c].sum() for c in range(a.shape[1])]
                          for f in (sf, tf))
            logits = [(sh(s[None])[0], th(t[None])[0]) for s, t in zip(sf, tf)]
            out.append((weight[b].item() * ok, logits))
    return out


def ref_loss(terms, center, t_temp, s_temp, mode="center"):
    if mode == "sinkhorn":  # one plan over every valid item of every pair, as the loss does
        rows = [t.tolist() for m, lg in terms if m > 0 for _, t in lg]
        plan = iter(ref_sinkhorn_knopp(rows, t_temp, 3))
    num = den = 0.0
    for m, logits in terms:
        ce = []
        for s, t in logits:
            if mode == "center":
                ce.append(ref_ce(s, t, center, t_temp, s_temp))
            elif m > 0:
                p, ls = next(plan), [a / s_temp for a in s.tolist()]
                lse = max(ls) + math.log(sum(math.exp(a - max(ls)) for a in ls))
                ce.append(-sum(pi * (si - lse) for pi, si in zip(p, ls)))
        num, den = (num + m * sum(ce) / len(ce), den + m) if m > 0 else (num, den)
    return num / den


@pytest.mark.parametrize("mode", ["center", "sinkhorn"])
def test_pixel_loss_matches_loops(mode):
    s_maps, geoms, t_maps, t_geoms = views()
    sh, th = heads()
    crit = PixelLoss(7, 0.1, 0.9, grid=2, mode=mode)
    crit.centering.center.copy_(torch.randn(1, 7) * 0.3)
    weight = torch.tensor([1.0, 0.0, 1.0])
    got = crit(s_maps, geoms, t_maps, t_geoms, sh, th, 0.05, weight)
    with torch.no_grad():
        terms = ref_terms(s_maps, geoms, t_maps, t_geoms, sh, th, weight, 2)
        assert sum(m == 0 for m, _ in terms) >= 8 and any(m > 0 for m, _ in terms)  # masked samples, disjoint pairs
        want = ref_loss(terms, crit.centering.center[0], 0.05, 0.1, mode)
        acc = sum(m * t for m, lg in terms for _, t in lg)
        count = sum(m * len(lg) for m, lg in terms)
    assert abs(got.item() - want) < 1e-9
    torch.testing.assert_close(crit.centering.pending_sum, acc.float())
    assert crit.centering.pending_count.item() == count


def test_pixel_loss_gradients_reach_the_student_only():
    s_maps, geoms, t_maps, t_geoms = views()
    sh, th = heads()
    crit = PixelLoss(7, 0.1, 0.9)
    crit(s_maps, geoms, t_maps, t_geoms, sh, th, 0.05, torch.tensor([1.0, 0.0, 1.0])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sh.parameters())
    assert all(p.grad is None for p in th.parameters()) and all(m.grad is None for m in t_maps)
    assert all(m.grad[[0, 2]].abs().sum() > 0 for m in s_maps[:3]) and s_maps[0].grad[1].abs().max() == 0


@pytest.mark.parametrize("crit", [PixelLoss(7, 0.1, 0.9), ObjectLoss(7, 0.1, 0.9, num_clusters=3, grid=3)])
@pytest.mark.parametrize("case", ["no weight", "no overlap"])
def test_nothing_valid_gives_a_graph_connected_zero(crit, case):
    s_maps, geoms, t_maps, t_geoms = views()
    weight = torch.zeros(3) if case == "no weight" else torch.ones(3)
    if case == "no overlap":
        for g in t_geoms:
            g["box"] = torch.tensor([[0.0, 0.0, 0.3, 0.3]], dtype=D).expand(3, 4)
        for g in geoms[2:]:
            g["box"] = torch.tensor([[0.5, 0.5, 1.0, 1.0]], dtype=D).expand(3, 4)
        geoms = t_geoms + geoms[2:]  # the globals now coincide with the teacher's, the locals miss them
        t_geoms = [dict(g, box=torch.tensor([[0.6, 0.0, 1.0, 0.3]], dtype=D).expand(3, 4)) for g in t_geoms]
    sh, th = heads()
    loss = crit(s_maps, geoms, t_maps, t_geoms, sh, th, 0.05, weight)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in sh.parameters())


def test_object_loss_matches_loops_from_the_same_assignments():
    s_maps, geoms, t_maps, t_geoms = views(seed=1)
    sh, th = heads()
    crit = ObjectLoss(7, 0.1, 0.9, num_clusters=3, grid=3)
    crit.centering.center.copy_(torch.randn(1, 7) * 0.3)
    weight = torch.tensor([1.0, 1.0, 0.0])
    got = crit(s_maps, geoms, t_maps, t_geoms, sh, th, 0.07, weight)
    with torch.no_grad():
        terms = ref_terms(s_maps, geoms, t_maps, t_geoms, sh, th, weight, 3, assign=crit.assignments)
        want = ref_loss(terms, crit.centering.center[0], 0.07, 0.1)
    assert abs(got.item() - want) < 1e-9
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sh.parameters())
    assert all(p.grad is None for p in th.parameters())


@pytest.mark.parametrize("nc,kmeans_iters", [(1, 0), (3, 0), (3, 2), (4, 3)])
def test_cluster_assignments_match_loops(nc, kmeans_iters):
    feats = torch.randn(2, 9, 4, dtype=D)
    got = cluster_assignments(feats, nc, 0.1, 3, kmeans_iters)
    for b in range(2):
        torch.testing.assert_close(got[b], ref_clusters(feats[b], nc, 0.1, 3, kmeans_iters))
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 9, dtype=D))


def test_cluster_assignments_group_separated_points():
    torch.manual_seed(0)
    base = torch.eye(3, dtype=D)[[0, 0, 0, 0, 1, 1, 1, 1]] + 0.05 * torch.randn(8, 3, dtype=D)
    a = cluster_assignments(base[None], 2)
    torch.testing.assert_close(a.sum(-1), torch.ones(1, 8, dtype=D))
    assert (a[0, :4, 0] > 0.99).all() and (a[0, 4:, 1] > 0.99).all()
    same = cluster_assignments(torch.ones(2, 5, 4), 3)  # a 1 x 1 map: every point is the same feature
    torch.testing.assert_close(same, torch.full((2, 5, 3), 1 / 3))


# ---------------------------------------------------------------- KoLeo

def test_koleo_matches_pairwise_loop():
    x = torch.randn(6, 4, dtype=D)
    z = [r / r.norm() for r in x]
    want = -sum(math.log(min((z[i] - z[j]).norm().item() for j in range(6) if j != i) + 1e-8) for i in range(6)) / 6
    assert abs(koleo_loss(x).item() - want) < 1e-6
    dup = torch.cat([x[:3], x[:1]]).requires_grad_()
    koleo_loss(dup).backward()
    assert dup.grad.isfinite().all()
    assert koleo_loss(x[:1]).item() == 0


# ---------------------------------------------------------------- two ranks agree with one

def _dist_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, w = _dist_inputs()
    part = slice(4 * rank, 4 * rank + 4)
    q = sinkhorn_knopp(x[part], 0.2, 3, w[part])
    cen = Centering(5, 0.7)
    cen.accumulate(x[part], w[part])
    if rank == 0:
        cen.accumulate(2 * x[part])  # a second micro-batch on one rank only
    cen.step()
    queue.put((rank, q.tolist(), cen.center.tolist()))
    dist.barrier()
    dist.destroy_process_group()


def _dist_inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(8, 5, generator=gen, dtype=D), torch.tensor([1.0, 0, 1, 1, 1, 1, 0, 1])


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_match_one_process():
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2):
        rank, q, center = queue.get(timeout=120)
        got[rank] = (torch.tensor(q, dtype=D), torch.tensor(center))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    x, w = _dist_inputs()
    torch.testing.assert_close(torch.cat([got[0][0], got[1][0]]), sinkhorn_knopp(x, 0.2, 3, w))
    one = Centering(5, 0.7)
    one.accumulate(x, w)
    one.accumulate(2 * x[:4])
    one.step()
    for r in range(2):
        torch.testing.assert_close(got[r][1], one.center)
