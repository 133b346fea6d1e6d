"""trainer.probes: k-NN against a brute-force loop, linear probe, mAP against sklearn, splits, histograms."""

import math

import numpy as np
import pytest

from trainer import probes


def _clusters(rng, n_per: int, classes: int, dim: int, spread: float = 0.3):
    centres = rng.normal(size=(classes, dim)) * 3.0
    y = np.repeat(np.arange(classes), n_per)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def _brute_knn(train_x, train_y, val_x, val_y, k, temperature, num_classes):
    """Plain-python DINO k-NN with the documented tie rules (similarity ties: lower train index; vote ties: lower
    class index; both compared at 1e-12)."""
    def unit(v):
        n = math.sqrt(sum(float(a) * float(a) for a in v))
        return [float(a) / n for a in v]

    tr = [unit(v) for v in train_x]
    hit1 = hit5 = 0
    for v, y in zip(val_x, val_y):
        u = unit(v)
        sims = [(round(sum(a * b for a, b in zip(u, t)), 12), j) for j, t in enumerate(tr)]
        sims.sort(key=lambda p: (-p[0], p[1]))
        votes = [0.0] * num_classes
        total = 0.0
        for s, j in sims[:k]:
            votes[int(train_y[j])] += math.exp(s / temperature)
            total += math.exp(s / temperature)
        ranked = sorted(range(num_classes), key=lambda c: (-round(votes[c] / total, 12), c))
        hit1 += ranked[0] == y
        hit5 += y in ranked[:5]
    return 100.0 * hit1 / len(val_y), 100.0 * hit5 / len(val_y)


def test_knn_separable_clusters_near_100():
    rng = np.random.default_rng(0)
    tx, ty = _clusters(rng, 40, 6, 16)
    vx, vy = tx + 0.3 * rng.normal(size=tx.shape), ty
    r = probes.knn(tx, ty, vx, vy, num_classes=6)
    assert r["top1"] >= 99.0 and r["top5"] == 100.0


def test_knn_shuffled_labels_near_chance():
    rng = np.random.default_rng(1)
    tx, ty = _clusters(rng, 100, 5, 16)
    vx, vy = _clusters(np.random.default_rng(1), 100, 5, 16)  # same centres, fresh noise
    vx = vx + 0.3 * rng.normal(size=vx.shape)
    perm = rng.permutation(len(ty))
    r = probes.knn(tx, ty[perm], vx, vy, num_classes=5)
    assert 10.0 < r["top1"] < 30.0  # chance is 20 %; 500 val samples give a std of ~1.8 points


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_knn_matches_brute_force(seed, k):
    rng = np.random.default_rng(seed)
    # Small integer features: many exactly equal similarities and some equal votes exercise the tie rules.
    tx = rng.integers(-1, 2, size=(30, 3)).astype(np.float64)
    tx[np.all(tx == 0, axis=1)] = 1.0
    ty = rng.integers(0, 7, size=30)
    vx = rng.integers(-1, 2, size=(25, 3)).astype(np.float64)
    vx[np.all(vx == 0, axis=1)] = 1.0
    vy = rng.integers(0, 7, size=25)
    r = probes.knn(tx, ty, vx, vy, k=k, temperature=0.1, num_classes=7)
    b1, b5 = _brute_knn(tx, ty, vx, vy, k, 0.1, 7)
    assert r["top1"] == pytest.approx(b1) and r["top5"] == pytest.approx(b5)


def test_knn_random_floats_match_brute_force():
    rng = np.random.default_rng(5)
    tx, ty = rng.normal(size=(40, 8)), rng.integers(0, 9, size=40)
    vx, vy = rng.normal(size=(30, 8)), rng.integers(0, 9, size=30)
    r = probes.knn(tx, ty, vx, vy, k=20, temperature=0.07, num_classes=9)
    assert (r["top1"], r["top5"]) == pytest.approx(_brute_knn(tx, ty, vx, vy, 20, 0.07, 9))


def test_knn_tie_rules_by_hand():
    a, b = [1.0, 0.0], [0.0, 1.0]
    # Two identical neighbours, labels 1 and 0: equal votes, the lower class (0) wins.
    tx, ty = np.array([a, a, b, b]), np.array([1, 0, 2, 3])
    assert probes.knn(tx, ty, np.array([a]), np.array([0]), k=2, num_classes=4)["top1"] == 100.0
    assert probes.knn(tx, ty, np.array([a]), np.array([1]), k=2, num_classes=4)["top1"] == 0.0
    # k=1 with tied similarity: the lower train index (label 1) is the neighbour.
    assert probes.knn(tx, ty, np.array([a]), np.array([1]), k=1, num_classes=4)["top1"] == 100.0
    # top-5 over 4 classes holds every class.
    assert probes.knn(tx, ty, np.array([a]), np.array([3]), k=1, num_classes=4)["top5"] == 100.0


def test_knn_scores_are_weighted_vote_fractions():
    tx = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    ty = np.array([0, 1, 1])
    s = probes.knn_scores(tx, ty, np.array([[1.0, 0.0]]), k=2, temperature=0.5, num_classes=2)
    w0, w1 = math.exp(1.0 / 0.5), math.exp(0.6 / 0.5)
    np.testing.assert_allclose(s[0], [w0 / (w0 + w1), w1 / (w0 + w1)])


def test_linear_probe_separable_near_100():
    rng = np.random.default_rng(2)
    tx, ty = _clusters(rng, 30, 4, 10)
    vx = tx + 0.3 * rng.normal(size=tx.shape)
    r = probes.linear_probe(tx, ty, vx, ty, num_classes=4)
    assert r["top1"] >= 99.0
    assert r["C"] in probes.C_GRID and len(r["grid"]) == len(probes.C_GRID)


def test_linear_probe_random_labels_near_chance():
    rng = np.random.default_rng(3)
    tx, vx = rng.normal(size=(200, 8)), rng.normal(size=(400, 8))
    r = probes.linear_probe(tx, rng.integers(0, 4, 200), vx, rng.integers(0, 4, 400), num_classes=4)
    assert 12.0 < r["top1"] < 38.0


def test_linear_probe_multilabel_gives_map():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(120, 6))
    y = (x[:, :3] > 0).astype(np.uint8)  # label c is the sign of feature c: linearly separable
    r = probes.linear_probe(x[:60], y[:60], x[60:], y[60:], num_classes=3)
    assert r["mAP"] > 95.0


def test_map_matches_sklearn():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, size=(60, 5))
    y[0] = 1
    scores = np.round(rng.random((60, 5)) + 0.3 * y, 1)  # rounded: many tied scores
    ref = 100.0 * average_precision_score(y, scores, average="macro")
    assert probes.mean_average_precision(y, scores) == pytest.approx(ref, abs=1e-9)
    for c in range(5):
        assert probes.average_precision(y[:, c], scores[:, c]) == pytest.approx(
            average_precision_score(y[:, c], scores[:, c]), abs=1e-12)


def test_map_skips_classes_without_positives():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, size=(30, 4))
    y[:, 2] = 0
    y[0, [0, 1, 3]] = 1
    s = rng.random((30, 4))
    keep = [0, 1, 3]
    ref = 100.0 * average_precision_score(y[:, keep], s[:, keep], average="macro")
    assert probes.mean_average_precision(y, s) == pytest.approx(ref)
    with pytest.raises(ValueError):
        probes.mean_average_precision(np.zeros((3, 2)), s[:3, :2])


def test_stratified_split():
    labels = np.array([0] * 10 + [1] * 6 + [2] * 1 + [3] * 3)
    a, b = probes.stratified_split(labels, 0.5, seed=0)
    assert sorted(np.r_[a, b].tolist()) == list(range(len(labels)))
    assert len(np.intersect1d(a, b)) == 0
    counts = {c: int((labels[b] == c).sum()) for c in range(4)}
    assert counts == {0: 5, 1: 3, 2: 0, 3: 2}  # round(0.5 * 3) = 2, a single sample stays in the first part
    a2, b2 = probes.stratified_split(labels, 0.5, seed=0)
    assert np.array_equal(b, b2)
    assert not np.array_equal(b, probes.stratified_split(labels, 0.5, seed=1)[1])


def test_histogram_features_match_numpy_histogram():
    rng = np.random.default_rng(8)
    imgs = rng.integers(0, 256, size=(3, 2, 9, 7)).astype(np.float32)
    lo, hi = probes.histogram_ranges(imgs, "hr")
    assert np.all(lo == 0) and np.all(hi == 256)
    s2 = rng.normal(1000.0, 100.0, size=(4, 2, 10, 10))
    lo2, hi2 = probes.histogram_ranges(s2, "s2")
    np.testing.assert_allclose(lo2, [np.percentile(s2[:, c], 1) for c in range(2)])
    np.testing.assert_allclose(hi2, [np.percentile(s2[:, c], 99) for c in range(2)])
    f = probes.histogram_features(imgs, lo, hi, bins=8)
    assert f.shape == (3, 16)
    for i in range(3):
        for c in range(2):
            ref, _ = np.histogram(imgs[i, c], bins=8, range=(0, 256))
            np.testing.assert_allclose(f[i, c * 8 : (c + 1) * 8], ref / 63.0, rtol=1e-6)
    # Values outside [lo, hi) land in the end bins.
    out = probes.histogram_features(np.array([[[[-5.0, 300.0]]]]), np.array([0.0]), np.array([256.0]), bins=4)
    np.testing.assert_allclose(out, [[0.5, 0.0, 0.0, 0.5]])
