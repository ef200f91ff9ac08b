"""Fréchet distance and kernel (MMD) distance between image sets, on the features of any ``torch.nn.Module``.

The paper reports FID: the Fréchet distance between Gaussians fitted to Inception-v3 pool features of 50k samples
and of the training set (Heusel et al. 2017). These helpers compute the same statistic, and KID (the unbiased
polynomial-kernel MMD of Bińkowski et al. 2018), with torchmetrics, but on the features of whatever network you pass:
a small classifier trained offline (``evaluation.classifier``), or Inception-v3 loaded from a local weights file
(``InceptionFeatures``). Numbers are only comparable when computed with the same feature network and sample sizes.

Images are float tensors in [-1, 1] of shape (batch, C, H, W), the library's data convention.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from ..sampling import frozen
from ..validation import check_finite


class PrecomputedFeatures(nn.Module):
    """The identity on feature vectors of width ``num_features``.

    torchmetrics' FID/KID run their ``feature`` module inside ``update``; handing them this module lets features be
    extracted once (``extract_features``) and shared by both metrics and across many comparisons.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"Expected features of shape (batch, {self.num_features}), got {tuple(features.shape)}.")
        return features


def _check_images(images: torch.Tensor, name: str) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor of images in [-1, 1].")
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"`{name}` must have shape (batch, channels, height, width), got {tuple(images.shape)}.")
    check_finite(images, name)


def _check_features(features: torch.Tensor, name: str, minimum: int = 2) -> None:
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor of shape (num_samples, num_features).")
    if features.ndim != 2 or features.shape[0] < minimum:
        raise ValueError(
            f"`{name}` must have shape (num_samples, num_features) with at least {minimum} samples, "
            f"got {tuple(features.shape)}."
        )
    if not torch.isfinite(features).all():
        raise ValueError(f"`{name}` contains NaN or infinite values.")


def _module_device(module: nn.Module) -> torch.device:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def extract_features(feature_extractor: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``feature_extractor(images)`` in eval mode and in batches: a float32 (batch, num_features) CPU tensor.

    The extractor's train/eval mode and ``requires_grad`` flags are restored afterwards.
    """
    _check_images(images, "images")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    device = _module_device(feature_extractor)
    chunks = []
    with frozen(feature_extractor):
        for start in range(0, images.shape[0], batch_size):
            features = feature_extractor(images[start : start + batch_size].to(device))
            chunks.append(features.float().reshape(features.shape[0], -1).cpu())
    return torch.cat(chunks)


def _check_feature_pair(real_features: torch.Tensor, fake_features: torch.Tensor) -> None:
    """Both feature sets are valid and of the same width."""
    _check_features(real_features, "real_features")
    _check_features(fake_features, "fake_features")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"`real_features` and `fake_features` must have the same width, got {real_features.shape[1]} and "
            f"{fake_features.shape[1]}."
        )


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    r"""||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2}) of Gaussians fitted to two feature sets (FID's formula).

    Computed by torchmetrics' ``FrechetInceptionDistance`` (float64 moments, unbiased covariances) on the given
    features. Like FID, it is biased upwards for small sample sizes: compare values at equal sample sizes.
    """
    _check_feature_pair(real_features, fake_features)
    # The features are this process's own: no all-gather across processes (one rank alone may be evaluating).
    # normalize=False: with it True, torchmetrics before 1.4 turns even custom features into uint8 (x * 255).
    metric = FrechetInceptionDistance(
        feature=PrecomputedFeatures(real_features.shape[1]), normalize=False, sync_on_compute=False
    )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def kernel_distance(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    subsets: int = 100,
    subset_size: int | None = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: the unbiased squared MMD with the cubic polynomial kernel, mean and std over random subsets.

    Computed by torchmetrics' ``KernelInceptionDistance``. ``subset_size`` is capped at the smaller set's size
    (``None``: use that size). The subsets are drawn with ``seed``, leaving the global RNG untouched. Unlike the
    Fréchet distance, KID is unbiased: two samples of one distribution give values around 0 (possibly negative).
    """
    _check_feature_pair(real_features, fake_features)
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"`subsets` must be a positive integer, got {subsets!r}.")
    largest = min(real_features.shape[0], fake_features.shape[0])
    if subset_size is not None and (isinstance(subset_size, bool) or not isinstance(subset_size, int)):
        raise ValueError(f"`subset_size` must be a positive integer or None, got {subset_size!r}.")
    if subset_size is not None and subset_size < 2:
        raise ValueError(f"`subset_size` must be at least 2, got {subset_size}.")
    subset_size = largest if subset_size is None else min(subset_size, largest)
    with warnings.catch_warnings():  # torchmetrics warns that KID buffers the features: here, that is the point
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=PrecomputedFeatures(real_features.shape[1]),
            subsets=subsets,
            subset_size=subset_size,
            normalize=False,  # float features as they are, whatever the torchmetrics version (see frechet_distance)
            sync_on_compute=False,  # the features are this process's own, as in `frechet_distance`
        )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


@dataclass
class FeatureDistances:
    """Distances between a reference set and a generated set in one feature space.

    Args:
        frechet_distance: the Fréchet distance (FID's formula) between the two feature sets.
        kid_mean: the mean KID over random subsets.
        kid_std: its standard deviation over subsets.
        num_real: reference set size.
        num_fake: generated set size.
    """

    frechet_distance: float
    kid_mean: float
    kid_std: float
    num_real: int
    num_fake: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def feature_distances(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    feature_extractor: nn.Module,
    batch_size: int = 256,
    kid_subsets: int = 100,
    kid_subset_size: int | None = 1000,
    seed: int = 0,
) -> FeatureDistances:
    """Fréchet distance and KID between two image sets on the features of ``feature_extractor``.

    With ``InceptionFeatures`` this is FID/KID as usually reported (at the paper's 50k samples); with a
    classifier's features (``ClassifierFeatures``) it is a Fréchet *classifier* distance, meaningful for comparisons
    that share the classifier and sample sizes.
    """
    _check_images(real_images, "real_images")
    _check_images(fake_images, "fake_images")
    real = extract_features(feature_extractor, real_images, batch_size)
    fake = extract_features(feature_extractor, fake_images, batch_size)
    kid_mean, kid_std = kernel_distance(real, fake, kid_subsets, kid_subset_size, seed)
    return FeatureDistances(
        frechet_distance=frechet_distance(real, fake),
        kid_mean=kid_mean,
        kid_std=kid_std,
        num_real=real.shape[0],
        num_fake=fake.shape[0],
    )


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features from a local weights file, for the standard FID/KID without downloads.

    Uses torchmetrics' ``NoTrainInceptionV3`` (the TensorFlow-compatible network of torch-fidelity, which the paper's
    FID numbers are comparable to). It needs ``torch-fidelity`` installed (``pip install torch-fidelity``) and the
    converted weights file ``weights-inception-2015-12-05-6726825d.pth`` that torch-fidelity would otherwise download
    (from its GitHub release); copy that file to the offline machine and pass its path. Inputs are images in [-1, 1]
    with 1 or 3 channels; they are quantised to uint8 RGB and resized to 299x299 inside the network.

    Args:
        weights_path: path to the Inception weights (a PyTorch state dict).
        feature: which layer's pooled features: 64, 192, 768 or 2048 (the standard FID uses 2048).
        antialias: resize with antialiased bilinear interpolation (torchmetrics' default) instead of the
            TensorFlow-1 bilinear resize of the original FID code (``False``, comparable to published numbers).
    """

    FEATURE_SIZES = (64, 192, 768, 2048)

    def __init__(self, weights_path: str | os.PathLike, feature: int = 2048, antialias: bool = False):
        super().__init__()
        if feature not in self.FEATURE_SIZES:
            raise ValueError(f"`feature` must be one of {self.FEATURE_SIZES}, got {feature!r}.")
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(f"`weights_path` {os.fspath(weights_path)!r} is not a file.")
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError("InceptionFeatures needs torch-fidelity: `pip install torch-fidelity`.")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.num_features = feature
        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(feature)],
            feature_extractor_weights_path=os.fspath(weights_path),
            antialias=antialias,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, "images")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] != 3:
            raise ValueError(f"Inception needs 1- or 3-channel images, got {images.shape[1]} channels.")
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return self.inception(pixels)
