"""Probes on frozen feature arrays: weighted k-NN (DINO), linear probe (logistic regression), mAP, splits.

Everything here works on numpy arrays (N, D) of features and (N,) int labels or (N, K) multi-hot labels, so the
same code serves `python -m trainer.evaluate` and in-training evaluation. Metrics are percentages.

Tie rules (deterministic, tested against a brute-force loop). Similarities and vote fractions are compared after
rounding to 1e-12, so that BLAS summation order cannot split what is mathematically a tie:
- neighbours: train samples are ranked by cosine similarity, equal similarities by lower train index;
- classes: ranked by vote, equal votes by lower class index (a class with no votes can still fill a top-5 slot
  when fewer than five classes were voted for, as in DINO's `knn_classifier`).
"""

from __future__ import annotations

import warnings

import numpy as np

# Inverse regularisation strengths tried by the linear probe on standardised features.
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
TIE_DECIMALS = 12


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm. x: (N, D) -> (N, D) float64 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def _one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(y), num_classes), dtype=np.float64)
    out[np.arange(len(y)), y] = 1.0
    return out


def knn_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, *, k: int = 20,
               temperature: float = 0.07, num_classes: int, chunk: int = 1024) -> np.ndarray:
    """Neighbour votes (N_val, K): each of the k most cosine-similar train samples votes w = exp(s / T) for its
    class(es); a row is divided by its total weight (vote fractions, so multi-label scores compare across rows).

    train_x: (N_train, D); train_y: (N_train,) int class ids or (N_train, K) multi-hot; val_x: (N_val, D).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    tx, vx = l2_normalise(train_x), l2_normalise(val_x)
    ty = np.asarray(train_y)
    votes_of = ty.astype(np.float64) if ty.ndim == 2 else _one_hot(ty.astype(np.int64), num_classes)
    k = min(k, len(tx))
    out = np.zeros((len(vx), votes_of.shape[1]), dtype=np.float64)
    for s in range(0, len(vx), chunk):
        sim = np.round(vx[s : s + chunk] @ tx.T, TIE_DECIMALS)  # (n, N_train)
        # A stable sort of -sim ranks equal similarities by train index (the documented tie rule).
        nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        w = np.exp(np.take_along_axis(sim, nn, axis=1) / temperature)  # (n, k); |s| <= 1 keeps exp finite
        out[s : s + chunk] = np.einsum("nk,nkc->nc", w, votes_of[nn]) / w.sum(axis=1, keepdims=True)
    return np.round(out, TIE_DECIMALS)


def topk_accuracy(scores: np.ndarray, y: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Percent of rows whose true class is among the k highest scores (ties: lower class index first)."""
    order = np.argsort(-scores, axis=1, kind="stable")
    hit = order == np.asarray(y)[:, None]
    return {f"top{k}": float(100.0 * hit[:, : min(k, scores.shape[1])].any(axis=1).mean()) for k in ks}


def knn(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *, k: int = 20,
        temperature: float = 0.07, num_classes: int) -> dict[str, float]:
    """DINO weighted k-NN. (N, D) features, (N,) int labels -> {"top1", "top5"} in percent.

    Multi-label (N, K) labels give {"mAP"} instead, scoring each class by its summed neighbour votes.
    """
    scores = knn_scores(train_x, train_y, val_x, k=k, temperature=temperature, num_classes=num_classes)
    if np.asarray(val_y).ndim == 2:
        return {"mAP": mean_average_precision(val_y, scores)}
    return topk_accuracy(scores, val_y)


def average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """AP of one class, as sklearn's: sum over distinct score thresholds of (R_n - R_{n-1}) * P_n. (N,), (N,)."""
    y_true = np.asarray(y_true).astype(bool)
    if not y_true.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s, t = np.asarray(score, dtype=np.float64)[order], y_true[order]
    tp, fp = np.cumsum(t), np.cumsum(~t)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each run of equal scores
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP in percent over classes with at least one positive. y_true: (N, K) multi-hot, scores: (N, K)."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    aps = [average_precision(y_true[:, c], scores[:, c]) for c in range(y_true.shape[1]) if y_true[:, c].any()]
    if not aps:
        raise ValueError("no class has a positive sample: mAP is undefined")
    return float(100.0 * np.mean(aps))


def stratified_split(labels: np.ndarray, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) sorted index arrays; `fraction` of each class goes to second (at least one when the class
    has two or more samples, never its last one). Multi-label (N, K) labels are split without stratification."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"split fraction must lie in (0, 1), got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    if labels.ndim == 2:
        perm = rng.permutation(n)
        m = min(max(int(round(fraction * n)), 1), n - 1)
        return np.sort(perm[m:]), np.sort(perm[:m])
    second = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        m = 0 if len(idx) < 2 else min(max(int(round(fraction * len(idx))), 1), len(idx) - 1)
        second.append(idx[:m])
    second = np.sort(np.concatenate(second)) if second else np.zeros(0, np.int64)
    first = np.setdiff1d(np.arange(n), second)
    return first, second


def _fit_logreg(x: np.ndarray, y: np.ndarray, c: float, multilabel: bool, max_iter: int, seed: int):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    if multilabel:
        clf = OneVsRestClassifier(clf)
    with warnings.catch_warnings():
        # A few unconverged grid points are expected on tiny sets; the held-out score judges them.
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # OneVsRest: "Label not present in all training examples"
        clf.fit(x, y)
    return clf


def _class_scores(clf, x: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    """(N, num_classes) probabilities; classes absent from the fit get -inf (never predicted)."""
    p = clf.predict_proba(x)
    if multilabel:
        return p
    out = np.full((len(x), num_classes), -np.inf)
    out[:, clf.classes_] = p
    return out


def _score(scores: np.ndarray, y: np.ndarray, multilabel: bool) -> float:
    if multilabel:
        return mean_average_precision(y, scores)
    return topk_accuracy(scores, y, ks=(1,))["top1"]


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                 num_classes: int, c_grid: tuple[float, ...] = C_GRID, holdout: float = 0.2, seed: int = 0,
                 max_iter: int = 1000) -> dict[str, object]:
    """Logistic regression on standardised frozen features. (N, D), (N,) int or (N, K) multi-hot labels.

    C is chosen on a stratified `holdout` part of the train split (best held-out top-1 / mAP; ties: smaller C),
    then the probe is refit on the whole train split. Returns {"top1", "top5"} or {"mAP"}, plus "C" and
    "grid" ({C: held-out score}).
    """
    from sklearn.preprocessing import StandardScaler

    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    multilabel = train_y.ndim == 2
    scaler = StandardScaler().fit(train_x)
    tx, vx = scaler.transform(train_x), scaler.transform(val_x)
    fit_i, hold_i = stratified_split(train_y, holdout, seed=seed)
    grid: dict[float, float] = {}
    can_select = len(hold_i) > 0 and len(np.unique(train_y[fit_i], axis=0)) > 1
    if can_select and len(c_grid) > 1:
        for c in c_grid:
            clf = _fit_logreg(tx[fit_i], train_y[fit_i], c, multilabel, max_iter, seed)
            try:
                grid[c] = _score(_class_scores(clf, tx[hold_i], num_classes, multilabel), train_y[hold_i],
                                 multilabel)
            except ValueError:  # a held-out part without positives: no mAP to judge by
                grid = {}
                break
    best = max(grid, key=lambda c: (grid[c], -c)) if grid else (1.0 if 1.0 in c_grid else c_grid[0])
    clf = _fit_logreg(tx, train_y, best, multilabel, max_iter, seed)
    scores = _class_scores(clf, vx, num_classes, multilabel)
    res: dict[str, object] = {"mAP": mean_average_precision(val_y, scores)} if multilabel else \
        topk_accuracy(scores, val_y)
    res["C"] = best
    res["grid"] = {str(c): v for c, v in grid.items()}
    return res


def histogram_ranges(images: np.ndarray, modality: str, *, lo_pct: float = 1.0,
                     hi_pct: float = 99.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-band histogram range (lo, hi), each (C,): HR's full 0..256; S2 / S1 the lo_pct..hi_pct percentiles of
    `images` (N, C, H, W), which should be the train split so that train and val share the bins."""
    c = images.shape[1]
    if modality == "hr":
        return np.zeros(c), np.full(c, 256.0)
    flat = np.moveaxis(np.asarray(images), 1, 0).reshape(c, -1)
    lo, hi = np.percentile(flat, lo_pct, axis=1), np.percentile(flat, hi_pct, axis=1)
    return lo, np.where(hi > lo, hi, lo + 1.0)


def histogram_features(images: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, bins: int = 16) -> np.ndarray:
    """Colour-histogram baseline: per-band histograms with `bins` bins over [lo, hi) (values outside clipped into
    the end bins), each normalised to sum 1. images: (N, C, H, W) unnormalised -> (N, C * bins) float32."""
    x = np.asarray(images, dtype=np.float64)
    n, c = x.shape[:2]
    lo, hi = np.asarray(lo, np.float64)[None, :, None], np.asarray(hi, np.float64)[None, :, None]
    b = np.floor((x.reshape(n, c, -1) - lo) / (hi - lo) * bins).astype(np.int64)
    b = np.clip(b, 0, bins - 1) + bins * np.arange(c)[None, :, None]
    flat = b.reshape(n, -1) + (c * bins) * np.arange(n)[:, None]
    counts = np.bincount(flat.ravel(), minlength=n * c * bins).reshape(n, c * bins)
    return (counts / (x.shape[2] * x.shape[3])).astype(np.float32)
