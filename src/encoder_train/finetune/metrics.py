"""GLUE's metrics, as plain functions of (predictions, references), and which ones each task reports.

Classification metrics take label ids; regression metrics take numbers. Each returns a float in GLUE's
own scale (accuracy 0..1, correlations -1..1); tables multiply by 100. The definitions are the ones GLUE's
scoring uses (the same as scikit-learn's and SciPy's):

  accuracy   share of exact matches
  f1         F1 of label id 1, the positive class of a binary task (GLUE's MRPC and QQP: "is a paraphrase",
             "is a duplicate")
  macro_f1   the unweighted mean of every label's F1, for more than two labels
  matthews   Matthews correlation, multi-class form (Gorodkin 2004), 0 when either side is constant (CoLA)
  pearson    Pearson correlation (STS-B)
  spearman   Pearson correlation of the ranks, tied values sharing their average rank (STS-B)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Metric = Callable[[Sequence[float], Sequence[float]], float]


def accuracy(predictions: Sequence[int], references: Sequence[int]) -> float:
    p, r = _pair(predictions, references)
    return float((p == r).mean())


def f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    p, r = _pair(predictions, references)
    return _f1_of(p, r, 1)


def macro_f1(predictions: Sequence[int], references: Sequence[int]) -> float:
    p, r = _pair(predictions, references)
    return float(np.mean([_f1_of(p, r, c) for c in np.union1d(p, r)]))


def _f1_of(p: np.ndarray, r: np.ndarray, label: int) -> float:
    tp = int(((p == label) & (r == label)).sum())
    fp = int(((p == label) & (r != label)).sum())
    fn = int(((p != label) & (r == label)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(predictions: Sequence[int], references: Sequence[int]) -> float:
    p, r = _pair(predictions, references)
    labels = np.union1d(p, r)
    confusion = (r[:, None] == labels[None, :]).T.astype(np.float64) @ (p[:, None] == labels[None, :])  # (C, C)
    n = confusion.sum()
    correct = np.trace(confusion)
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    numerator = correct * n - true_counts @ predicted_counts
    denominator = np.sqrt((n * n - predicted_counts @ predicted_counts) * (n * n - true_counts @ true_counts))
    return float(numerator / denominator) if denominator else 0.0


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    p, r = _pair(predictions, references, np.float64)
    p, r = p - p.mean(), r - r.mean()
    denominator = np.sqrt((p * p).sum() * (r * r).sum())
    return float((p * r).sum() / denominator) if denominator else 0.0


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    p, r = _pair(predictions, references, np.float64)
    return pearson(_ranks(p), _ranks(r))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1; equal values share the mean of the ranks they span ([10, 20, 20] -> [1, 2.5, 2.5])."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks, minlength=len(values))
    counts = np.bincount(inverse, minlength=len(values))
    return (sums / counts)[inverse]


def _pair(predictions: Sequence, references: Sequence, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions, dtype=dtype).reshape(-1), np.asarray(references, dtype=dtype).reshape(-1)
    if len(p) != len(r) or not len(p):
        raise ValueError(f"need as many predictions as references, at least one ({len(p)} vs {len(r)})")
    return p, r


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "f1": f1,
    "macro_f1": macro_f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}
CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def score(metrics: dict[str, float]) -> float:
    """A task's one number, as GLUE ranks it: the unweighted mean of the metrics it reports."""
    return float(np.mean(list(metrics.values())))
