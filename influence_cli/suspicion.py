"""How likely each training row's label is wrong (`suspicion`), which rows to flag, and the error rate.

Pure numpy on arrays selfcheck already has: the training loss L_i, the Newton leave-one-out loss and
outputs from `signals.loo_loss` (LooResult.loo_loss, .loo_outputs), and the labels y_i.

suspicion (method SUSPICION_METHOD, higher = more suspect, in (0, 1]):

    suspicion_i = w rank(L)_i / n + (1 - w) mean over the other components c of rank(c)_i / n
                  (average ranks for ties; w = ONE_FIT_LOSS_WEIGHT for one fit of a classifier, else the
                  plain mean: w = 1 / the number of components)

with the components, for classification and binary:
  - L_i = -log q_i(y_i), the training loss (q = the model's probabilities): how surprised the fitted
    model is by the label. Strong when the model cannot memorize the row.
  - LOO_i = -log p_i(y_i), the Newton leave-one-out loss (p = softmax of f_i + df_i, the outputs after
    one Newton step without the row): the same surprise once the row's own pull on theta is removed,
    i.e. an approximate out-of-sample (cross-validated) probability at the cost of one fit.
  - M_i = max_{k != y_i} p_i(k) - p_i(y_i), the leave-one-out margin (cleanlab's "normalized margin"
    on leave-one-out instead of K-fold probabilities): how strongly another class is preferred.
For binary (one logit) M_i = 1 - 2 p_i(y_i) ranks like LOO_i.
For regression the components are L_i and LOO_i (squared training and leave-one-out residuals).
Rank averaging (Borda) puts the components on one scale. How much the training loss weighs was measured
(benchmarks/label_errors.py, six noise draws of 24 cells per model):
  - one fit of a model that cannot memorize (logistic regression): its training loss already is almost its
    held-out loss, and the leave-one-out terms mostly add leverage (high-leverage clean rows look
    out-of-sample wrong), so they break ties: w = 0.8 was within 0.01 of the best of loss / self_influence /
    confident learning in 24 of 24 cells (worst -0.007), equal weights in 19 (worst -0.036), the loss alone
    in 22; chosen on draws 0-2 (22 of 24, the smallest such w), then 21 of 24 on the unseen draws 5-7
    against 16 for equal weights.
  - out-of-fold outputs of a model that memorized (selfcheck's cross-fit): the out-of-fold terms carry the
    signal and equal weights were best (22 of 24 cells over draws 0-2; w = 0.5: 14, w = 0.8: 5).
  - regression: equal weights (the leave-one-out residual r_i / (1 - h_i) is what unmasks a high-leverage
    outlier; nothing measured says otherwise).

Without the Newton pass (more than NEWTON_MAX_CLASSES classes, or a solver without ihvp), use
LOO_i ~= L_i + self_influence_i / n (signals.loo_loss_first_order) and the training margin from q:
method SUSPICION_METHOD_FIRST_ORDER.

flag_errors (classification, binary): confident learning (Northcutt et al. 2021) on the
leave-one-out probabilities. Per class k the threshold t_k = mean of p_i(k) over rows labeled k; row
i "confidently belongs" to the classes k with p_i(k) >= t_k, and to the likeliest of them, k*_i.
flagged_i = (k*_i exists and k*_i != y_i). The confident joint counts (y_i, k*_i); calibrated so each
row sums to the class's count, its off-diagonal mass / n is the estimated error rate; its interval is
a percentile bootstrap over rows. Cost O(n C) per evaluation, O(bootstrap * n C) in all.
selfcheck then flags that many rows from the top of suspicion (flag_most_suspect: confident learning
says how many labels are wrong, the ranking which ones).

flag_residuals (regression): rows whose leave-one-out residual exceeds RESIDUAL_Z robust standard
deviations (sigma = median |r| / 0.6745); the error rate is the flagged fraction, Wilson interval.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

ONE_FIT_LOSS_WEIGHT = 0.8  # suspicion's weight on the training loss's rank for one fit of a classifier
_W, _REST = f"{ONE_FIT_LOSS_WEIGHT:g}", f"{(1 - ONE_FIT_LOSS_WEIGHT) / 2:g}"
SUSPICION_METHOD = f"weighted_rank_mean(loss:{_W},loo_loss:{_REST},loo_margin:{_REST})"
SUSPICION_METHOD_FIRST_ORDER = f"weighted_rank_mean(loss:{_W},loo_loss_first_order:{_REST},margin:{_REST})"
SUSPICION_METHOD_REGRESSION = "rank_mean(loss,loo_loss)"
FLAG_METHOD = "confident_learning_count(loo_probs),top_suspicion"
FLAG_METHOD_REGRESSION = "loo_residual_robust_z"
NEWTON_MAX_CLASSES = 64  # the Newton pass costs ~C self-influence passes; beyond this use the first-order form
RESIDUAL_Z = 3.5


@dataclass(frozen=True)
class Flags:
    """flagged (n,) bool; suggested (n,) int64, the confidently preferred class k* (the argmax of the
    probabilities where no class passes its threshold; -1 for regression); error_rate, the estimated
    fraction of wrong labels, with its `interval` (lo, hi) at `confidence`; class_error_rate (C,),
    the estimated fraction of wrong labels among rows given each label (empty for regression)."""

    flagged: np.ndarray
    suggested: np.ndarray
    error_rate: float
    interval: tuple[float, float]
    class_error_rate: np.ndarray
    confidence: float


def class_probs(outputs: np.ndarray) -> np.ndarray:
    """Class probabilities (n, C) from logits (n, C) by softmax; one binary logit (n, 1) -> (n, 2) [1-s, s]."""
    f = np.asarray(outputs, dtype=np.float64)
    if f.ndim == 1 or f.shape[1] == 1:
        s = 0.5 * (1.0 + np.tanh(0.5 * f.reshape(-1)))  # the logistic function without overflow
        return np.stack([1.0 - s, s], axis=1)
    z = np.exp(f - f.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


TEMPERATURE_RANGE = (0.01, 100.0)  # 1 / T searched over [1/100, 1/0.01]


def fit_temperature(outputs: np.ndarray, labels: np.ndarray, iterations: int = 80) -> float:
    """The temperature T minimizing the mean cross-entropy of the given labels under outputs / T (Guo et al. 2017's
    temperature scaling), for logits (n, C) or one binary logit (n, 1). The loss is convex in beta = 1 / T, so a
    golden-section search on log beta over TEMPERATURE_RANGE finds its minimum. Out-of-fold outputs of models that
    memorize are overconfident (T of 4-5 measured on the benchmark's MLPs): confident learning on them flags
    1.2-2.5x too many rows, on the scaled ones about the number of flips (benchmarks/label_errors.md)."""
    f = np.asarray(outputs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    f = f.reshape(len(y), -1)
    if f.shape[1] == 1:  # binary: logits of class 1 against 0
        f = np.concatenate([np.zeros_like(f), f], axis=1)

    def loss(log_beta: float) -> float:
        z = f * np.exp(log_beta)
        top = z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z - top).sum(axis=1)) + top[:, 0] - z[np.arange(len(y)), y]))

    lo, hi = np.log(1.0 / TEMPERATURE_RANGE[1]), np.log(1.0 / TEMPERATURE_RANGE[0])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(1.0 / np.exp(0.5 * (lo + hi)))


def label_margin(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """max_{k != y_i} p_i(k) - p_i(y_i), in [-1, 1]: > 0 where another class is preferred. (n, C), (n,) -> (n,)."""
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    return _other_classes(probs, y).max(axis=1) - probs[np.arange(len(y)), y]


def _other_classes(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A copy of probs (n, C) with each row's given label at -inf: its max / argmax is the best other class."""
    other = np.array(probs, dtype=np.float64)
    other[np.arange(len(labels)), labels] = -np.inf
    return other


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """rank_i / n in (0, 1], 1 = the largest; ties share their average rank; NaN ranks lowest. (n,) -> (n,)."""
    v = np.asarray(values, dtype=np.float64)
    v = np.where(np.isnan(v), -np.inf, v)
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
    group = np.cumsum(starts) - 1
    bounds = np.r_[np.flatnonzero(starts), len(v)]
    average = 0.5 * (bounds[group] + 1 + bounds[group + 1])  # mean of the 1-based ranks in the tie group
    ranks = np.empty(len(v))
    ranks[order] = average
    return ranks / max(len(v), 1)


def suspicion(loss: np.ndarray, loo_loss: np.ndarray, margin: np.ndarray | None = None,
              loss_weight: float | None = None) -> np.ndarray:
    """The weighted mean percentile rank of the training loss (weight `loss_weight`; None: the plain mean), the
    leave-one-out loss and (classification, binary) the leave-one-out margin
    `label_margin(class_probs(loo_outputs), labels)`, which share the rest equally; see the module docstring
    for the math, the weights and the method names. All (n,), float64; higher = more likely mislabeled."""
    others = [loo_loss] + ([] if margin is None else [margin])
    w = 1.0 / (1 + len(others)) if loss_weight is None else float(loss_weight)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"suspicion: loss_weight must be in [0, 1], got {loss_weight}")
    return w * percentile_rank(loss) + (1.0 - w) * np.mean([percentile_rank(p) for p in others], axis=0)


def flag_errors(labels: np.ndarray, probs: np.ndarray, *, confidence: float = 0.9, bootstrap: int = 200,
                seed: int = 0) -> Flags:
    """Confident learning on (leave-one-out) class probabilities (n, C) for labels (n,) in 0..C-1 (see
    the module docstring). `bootstrap` row resamples give the error rate's percentile interval
    (0: a Wilson interval around the flagged fraction instead)."""
    y = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n, classes = probs.shape
    suggested, confident = _confident_class(y, probs)
    flagged = confident & (suggested != y)
    per_class = _calibrated_off_diagonal(y, suggested, confident, classes)
    rate = float(per_class @ np.bincount(y, minlength=classes)) / n
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        draws = np.empty(bootstrap)
        label_probs = probs[np.arange(n), y]
        for b in range(bootstrap):
            # a resample of rows is a count per row: the same draw as probs[rows], without copying (n, C)
            weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
            sb, cb = _confident_class(y, probs, weights, label_probs)
            draws[b] = _calibrated_off_diagonal(y, sb, cb, classes, weights) @ np.bincount(
                y, weights=weights, minlength=classes) / n
        tail = 50.0 * (1.0 - confidence)
        lo, hi = np.percentile(draws, [tail, 100.0 - tail])
        interval = (float(min(lo, rate)), float(max(hi, rate)))
    else:
        interval = wilson_interval(int(flagged.sum()), n, confidence)
    return Flags(flagged, suggested, rate, interval, per_class, confidence)


def flag_most_suspect(flags: Flags, suspicion: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> Flags:
    """`flags` with the same number of rows flagged, taken from the top of `suspicion` (ties by row order, as
    selfcheck.csv sorts): confident learning says how many labels are wrong, the ranking which ones. Its own
    set holds rows the ranking puts lower (a class with a loose threshold), so the top rows are the more precise
    choice at the same count: at 10% noise over three draws of the benchmark's 24 cells (count within 30% of
    the flips at precision >= 0.7), 17 cells against 15 for confident learning's own rows (iris's precision
    0.53 -> 0.64). A flagged row's suggested label is confident learning's k*, or where that is its own label
    (no class passed its threshold and the label is still the likeliest), the likeliest other class of `probs`
    (n, C). The error rate and its interval are confident learning's."""
    from .report import top_mask  # here, not at the top: this module imports nothing beyond numpy otherwise

    y = np.asarray(labels).astype(np.int64)
    top = top_mask(suspicion, int(flags.flagged.sum()))
    suggested = np.where(top & (flags.suggested == y), _other_classes(probs, y).argmax(axis=1), flags.suggested)
    return replace(flags, flagged=top, suggested=suggested)


def flag_residuals(loo_loss: np.ndarray, *, z: float = RESIDUAL_Z, confidence: float = 0.9) -> Flags:
    """Regression: flag rows whose leave-one-out residual |r_i| = sqrt(loo_loss_i) (the root of the
    mean squared error over outputs) exceeds z * median|r| / 0.6745 (a robust standard deviation;
    on clean Gaussian noise this flags 0.05% of rows at z = 3.5). Error rate = flagged fraction."""
    r = np.sqrt(np.clip(np.asarray(loo_loss, dtype=np.float64), 0.0, None))
    sigma = np.median(r) / 0.6745
    flagged = r > z * sigma if sigma > 0 else r > 0
    count, n = int(flagged.sum()), len(r)
    return Flags(flagged, np.full(n, -1, dtype=np.int64), count / max(n, 1), wilson_interval(count, n, confidence),
                 np.zeros(0), confidence)


def wilson_interval(count: int, n: int, confidence: float = 0.9) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion count / n."""
    from statistics import NormalDist

    if n == 0:
        return (0.0, 1.0)
    zq = NormalDist().inv_cdf(0.5 + confidence / 2)
    phat = count / n
    centre = (phat + zq * zq / (2 * n)) / (1 + zq * zq / n)
    half = zq * np.sqrt(phat * (1 - phat) / n + zq * zq / (4 * n * n)) / (1 + zq * zq / n)
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))


def _confident_class(y: np.ndarray, probs: np.ndarray, weights: np.ndarray | None = None,
                     label_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(k*_i, whether any class passes its threshold): per-class thresholds t_k = mean p(k) over rows
    labeled k (a class with no rows never passes); k*_i = the likeliest class with p_i(k) >= t_k, or
    the argmax where none does. `weights` (n,): each row counted that many times (a bootstrap draw)."""
    classes = probs.shape[1]
    if label_probs is None:
        label_probs = probs[np.arange(len(y)), y]
    counts = np.bincount(y, weights=weights, minlength=classes)
    sums = np.bincount(y, weights=label_probs if weights is None else label_probs * weights, minlength=classes)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    above = probs >= thresholds
    confident = above.any(axis=1)
    chosen = np.where(above, probs, -np.inf).argmax(axis=1)
    return np.where(confident, chosen, probs.argmax(axis=1)), confident


def _calibrated_off_diagonal(y: np.ndarray, suggested: np.ndarray, confident: np.ndarray, classes: int,
                             weights: np.ndarray | None = None) -> np.ndarray:
    """Per given label k: the off-diagonal share of the confident joint's row k, (C,). Calibrating
    row k to the class's count n_k makes n_k times this the estimated number of wrong labels in it.
    `weights` (n,): each row counted that many times."""
    cells = y[confident] * classes + suggested[confident]
    counted = None if weights is None else weights[confident]
    joint = np.bincount(cells, weights=counted, minlength=classes * classes).reshape(classes, classes).astype(float)
    totals = joint.sum(axis=1)
    off = totals - np.diag(joint)
    return np.where(totals > 0, off / np.maximum(totals, 1.0), 0.0)
