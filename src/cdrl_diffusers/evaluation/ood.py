"""Out-of-distribution detection from CDRL log-densities (Sec. 4.4): the AUROC and synthetic shifted test sets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from ..validation import check_float_tensor

Scores = torch.Tensor | np.ndarray | Sequence[float]


def _as_scores(scores: Scores, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().double().numpy()
    try:
        array = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"`{name}` must be numbers (a tensor, an array or a list of floats): {error}.") from error
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


OOD_SHIFTS: tuple[str, ...] = ("uniform", "shuffled", "inverted", "interpolated")


def shift_images(images: torch.Tensor, shift: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A shifted (out-of-distribution) copy of a batch of images in [-1, 1], shape (batch, C, H, W).

    Shifts (``OOD_SHIFTS``): ``"uniform"`` noise in [-1, 1]; ``"shuffled"``: each image's pixel positions permuted
    (its colours kept); ``"inverted"``: -x (the negative image); ``"interpolated"``: the average of each image and
    another image of the batch, the "interpolation" set of Sec. 4.4 / Table 4.

    Args:
        images: the in-distribution batch.
        shift: one of ``OOD_SHIFTS``.
        generator: makes the random shifts reproducible.
    """
    check_float_tensor(images, "images")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"`images` must be a non-empty tensor of shape (batch, C, H, W), got {tuple(images.shape)}.")
    if shift not in OOD_SHIFTS:
        raise ValueError(f"`shift` must be one of {OOD_SHIFTS}, got {shift!r}.")
    device = generator.device if generator is not None else images.device
    batch, channels, height, width = images.shape
    if shift == "uniform":
        return (torch.rand(images.shape, generator=generator, device=device) * 2 - 1).to(images)
    if shift == "inverted":
        return -images
    if shift == "shuffled":
        order = torch.rand(batch, height * width, generator=generator, device=device).argsort(dim=1)
        order = order.to(images.device)[:, None, :].expand(-1, channels, -1)
        return images.flatten(2).gather(2, order).view_as(images)
    if batch < 2:
        raise ValueError("`shift='interpolated'` needs a batch of at least two images.")
    # A random pairing without fixed points: image i is averaged with image (i + offset) of a shuffled batch.
    order = torch.randperm(batch, generator=generator, device=device).to(images.device)
    partner = order.roll(1)
    mixed = images.clone()
    mixed[order] = 0.5 * (images[order] + images[partner])
    return mixed
