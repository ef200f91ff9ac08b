"""Out-of-distribution detection from CDRL log-densities (Sec. 4.4)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

Scores = torch.Tensor | np.ndarray | Sequence[float]


def _as_scores(scores: Scores, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"`{name}` must be a non-empty one-dimensional array of scores, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or infinite scores.")
    return array


def ood_auroc(in_scores: Scores, out_scores: Scores) -> float:
    """Area under the ROC curve for telling in-distribution from out-of-distribution inputs by their scores.

    Scores follow ``CDRLPipeline.log_density``: higher = more in-distribution. In-distribution inputs are the
    positive class, so 1.0 means every in-distribution score exceeds every OOD score and 0.5 is chance (ties count
    one half). Computed with scikit-learn's ``roc_auc_score``.

    Args:
        in_scores: scores of in-distribution inputs, shape (N,).
        out_scores: scores of out-of-distribution inputs, shape (M,).
    """
    positives = _as_scores(in_scores, "in_scores")
    negatives = _as_scores(out_scores, "out_scores")
    labels = np.concatenate([np.ones(positives.size), np.zeros(negatives.size)])
    return float(roc_auc_score(labels, np.concatenate([positives, negatives])))
