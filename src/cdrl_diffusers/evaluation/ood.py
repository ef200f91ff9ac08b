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


OOD_SHIFTS: tuple[str, ...] = (
    "uniform",
    "shuffled",
    "inverted",
    "interpolated",
    "rotated",
    "flipped",
    "upside_down",
    "periodic",
)


def _periodic_patterns(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sinusoidal grating per image, spanning that image's value range, shape (batch, C, H, W).

    Each grating cos(2 pi (k_y y / H + k_x x / W) + phi) has a random integer wave vector (k_y, k_x) below the
    Nyquist frequency (so a random orientation and frequency, and a pattern that tiles the image exactly) and a random
    phase phi; it is the same in every channel and is rescaled from [-1, 1] to [min, max] of its image.
    """
    batch, channels, height, width = images.shape
    if min(height, width) < 4:
        raise ValueError(f"`shift='periodic'` needs images of at least 4x4 pixels, got {height}x{width}.")
    device = generator.device if generator is not None else images.device
    # k_y in [0, H/2), k_x in (-W/2, W/2), on the half-plane k_y > 0 or k_x > 0: k and -k are the same grating.
    max_y, max_x = (height - 1) // 2, (width - 1) // 2
    k_y = torch.randint(0, max_y + 1, (batch,), generator=generator, device=device)
    k_x = torch.randint(-max_x, max_x + 1, (batch,), generator=generator, device=device)
    k_x = torch.where((k_y == 0) & (k_x <= 0), k_x.abs().clamp(min=1), k_x)
    phase = torch.rand(batch, generator=generator, device=device) * 2 * torch.pi
    k_y, k_x, phase = (value.to(images.device, torch.float64)[:, None, None] for value in (k_y, k_x, phase))
    rows = torch.arange(height, device=images.device, dtype=torch.float64)[:, None] / height
    columns = torch.arange(width, device=images.device, dtype=torch.float64)[None, :] / width
    grating = torch.cos(2 * torch.pi * (k_y * rows + k_x * columns) + phase)  # (batch, H, W) in [-1, 1]
    low = images.amin(dim=(1, 2, 3)).double()[:, None, None]
    high = images.amax(dim=(1, 2, 3)).double()[:, None, None]
    patterns = low + (grating + 1) / 2 * (high - low)
    return patterns[:, None].expand(-1, channels, -1, -1).to(images).contiguous()


def shift_images(images: torch.Tensor, shift: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A shifted (out-of-distribution) copy of a batch of images in [-1, 1], shape (batch, C, H, W).

    Shifts (``OOD_SHIFTS``): ``"uniform"`` noise in [-1, 1]; ``"shuffled"``: each image's pixel positions permuted
    (its colours kept); ``"inverted"``: -x (the negative image); ``"interpolated"``: the average of each image and
    another image of the batch, the "interpolation" set of Sec. 4.4 / Table 4; ``"rotated"``: a quarter turn
    counter-clockwise (square images); ``"flipped"``: mirrored left-right (a horizontal flip); ``"upside_down"``:
    mirrored top-bottom (a vertical flip); ``"periodic"``: a
    random sinusoidal grating per image, in that image's value range (random frequency, orientation and phase).

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
    if shift == "rotated":
        if height != width:
            raise ValueError(f"`shift='rotated'` needs square images, got {height}x{width}.")
        return images.rot90(1, dims=(2, 3))
    if shift == "flipped":
        return images.flip(3)
    if shift == "upside_down":
        return images.flip(2)
    if shift == "periodic":
        return _periodic_patterns(images, generator)
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
