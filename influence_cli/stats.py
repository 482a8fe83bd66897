"""Correlation statistics shared by the commands: Pearson, Spearman (average ranks for ties), and
their bootstrap intervals (verify), all in numpy."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two 1-d arrays; NaN when either is constant or shorter than 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return math.nan
    return _pearson(a, b)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either is constant or shorter than 2."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return math.nan
    return _pearson(ranks(a), ranks(b))


def correlations(pred: np.ndarray, actual: np.ndarray, generator: np.random.Generator,
                 n_boot: int = 1000) -> dict[str, Any]:
    """Pearson and Spearman (average ranks for ties) of predicted vs actual, each with a percentile
    bootstrap 95% interval over resampled pairs (NaN where a resample is constant), and
    magnitude_ratio = sum|pred| / sum|actual| (1 = the right size; < 1 = influence underestimates)."""
    pred, actual = np.asarray(pred, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if pred.shape != actual.shape or pred.ndim != 1:
        raise ValueError(f"pred and actual must be 1-d of equal length, got {pred.shape} and {actual.shape}")
    k = len(pred)
    out: dict[str, Any] = {"n": k, "pearson": _pearson(pred, actual), "spearman": _pearson(ranks(pred), ranks(actual))}
    denom = float(np.abs(actual).sum())
    out["magnitude_ratio"] = float(np.abs(pred).sum()) / denom if denom > 0 else math.nan
    if k >= 3 and n_boot > 0:
        idx = generator.integers(0, k, size=(n_boot, k))
        boot = {"pearson": _pearson_rows(pred[idx], actual[idx]),
                "spearman": _pearson_rows(ranks_rows(dense_codes(pred)[idx]), ranks_rows(dense_codes(actual)[idx]))}
        for name, values in boot.items():
            ok = values[np.isfinite(values)]
            out[f"{name}_ci95"] = ([float(np.quantile(ok, 0.025)), float(np.quantile(ok, 0.975))] if len(ok)
                                   else [math.nan, math.nan])
    else:
        out["pearson_ci95"] = out["spearman_ci95"] = [math.nan, math.nan]
    return out



def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else math.nan


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson of each row pair of (B, k) arrays; NaN where a row is constant."""
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def dense_codes(values: np.ndarray) -> np.ndarray:
    """Dense integer ranks 0.. (equal values share one), so resamples can be ranked as integers."""
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def ranks_rows(codes: np.ndarray) -> np.ndarray:
    """Average-tie ranks within each row of a (B, k) array of dense integer codes < k, vectorized:
    rank = (#smaller) + (#equal + 1) / 2, counted by one global sort with rows offset apart."""
    rows, k = codes.shape
    keyed = (codes + np.arange(rows)[:, None] * k).reshape(-1)
    ordered = np.sort(keyed)
    less = np.searchsorted(ordered, keyed, side="left") - np.repeat(np.arange(rows) * k, k)
    equal = np.searchsorted(ordered, keyed, side="right") - np.searchsorted(ordered, keyed, side="left")
    return (less + (equal + 1) / 2.0).reshape(rows, k)


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


