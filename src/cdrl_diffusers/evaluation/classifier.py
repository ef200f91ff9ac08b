"""A small image classifier trained offline, and the sample scores built on it.

The paper scores conditional samples with Inception networks (FID and Inception Score, Fig. 3). Offline, on small
datasets such as scikit-learn's digits, a classifier trained on the data itself plays both roles: its accuracy on
samples generated for a class measures how recognisable the class is (the Inception Score's role), and its
penultimate features give a Fréchet *classifier* distance (FID's role, ``evaluation.features``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..sampling import frozen
from .features import _check_images, _module_device, extract_features, frechet_distance, kernel_distance

#: Bump when the training recipe of ``train_classifier`` changes, so cached classifiers are retrained.
TRAINING_RECIPE_VERSION = 1


class ImageClassifier(ModelMixin, ConfigMixin):
    """Two conv stages (two 3x3 convs + ReLU each, then 2x2 average pooling), a dense feature layer and a linear head.

    ``features(images)`` returns the penultimate activations (width ``feature_dim``), used as the feature space of
    the Fréchet classifier distance; ``forward(images)`` returns class logits. Inputs are images in [-1, 1]. The
    buffer ``feature_scale`` (set by ``train_classifier`` to 1 / RMS of the training features) puts the features of
    ``ClassifierFeatures`` on a unit scale, which KID's polynomial kernel (gamma = 1 / width) assumes.

    Args:
        sample_size: height and width of the inputs (divisible by 4).
        in_channels: image channels.
        num_classes: number of classes.
        block_out_channels: channels of the two conv stages.
        feature_dim: width of the penultimate layer.
        dropout: dropout before the linear head (training only).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
        block_out_channels: tuple[int, int] = (32, 64),
        feature_dim: int = 128,
        dropout: float = 0.3,
    ):
        super().__init__()
        if sample_size % 4:
            raise ValueError(f"`sample_size` must be divisible by 4, got {sample_size}.")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be at least 2, got {num_classes}.")
        if len(block_out_channels) != 2:
            raise ValueError(f"`block_out_channels` must list two stages, got {tuple(block_out_channels)}.")
        first, second = block_out_channels
        self.stages = nn.Sequential(
            nn.Conv2d(in_channels, first, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(first, first, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(second, second, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.feature_layer = nn.Linear(second * (sample_size // 4) ** 2, feature_dim)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    def _check(self, images: torch.Tensor) -> None:
        _check_images(images, "images")
        size, channels = self.config.sample_size, self.config.in_channels
        if images.shape[1] != channels or tuple(images.shape[2:]) != (size, size):
            raise ValueError(
                f"`images` must have shape (batch, {channels}, {size}, {size}), got {tuple(images.shape)}."
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of shape (batch, feature_dim)."""
        self._check(images)
        return F.relu(self.feature_layer(self.stages(images).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of shape (batch, num_classes)."""
        return self.head(self.head_dropout(self.features(images)))


class ClassifierFeatures(nn.Module):
    """A classifier's penultimate features, times its ``feature_scale``: a feature extractor for the distances."""

    def __init__(self, classifier: ImageClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images) * self.classifier.feature_scale


def _check_labels(labels: torch.Tensor | np.ndarray, count: int, name: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.shape != (count,):
        raise ValueError(f"`{name}` must be {count} integer class labels, got shape {tuple(labels.shape)}.")
    return labels.long()


@torch.no_grad()
def predict_classes(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The arg-max class of each image under ``classifier`` (any module returning logits), as a CPU long tensor."""
    _check_images(images, "images")
    device = _module_device(classifier)
    predictions = []
    with frozen(classifier):
        for start in range(0, images.shape[0], batch_size):
            predictions.append(classifier(images[start : start + batch_size].to(device)).argmax(dim=1).cpu())
    return torch.cat(predictions)


def classifier_accuracy(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor | np.ndarray, batch_size: int = 256
) -> float:
    """The fraction of ``images`` that ``classifier`` assigns to ``labels`` (for samples: the requested class)."""
    _check_images(images, "images")
    labels = _check_labels(labels, images.shape[0])
    return float((predict_classes(classifier, images, batch_size) == labels).float().mean())


def feature_diversity(features: torch.Tensor, labels: torch.Tensor | np.ndarray | None = None) -> float:
    """Mean pairwise Euclidean distance between feature vectors, within each class, averaged over classes.

    Lower means less diverse samples (guidance trades diversity for fidelity, Sec. 4.3). Classes with fewer than two
    samples are skipped; with ``labels=None`` all samples form one group.
    """
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] < 2:
        raise ValueError("`features` must be a tensor of shape (num_samples, num_features) with at least 2 samples.")
    labels = (
        torch.zeros(features.shape[0], dtype=torch.long) if labels is None else _check_labels(labels, len(features))
    )
    features = features.double()
    distances = [
        torch.pdist(features[labels == label]).mean() for label in labels.unique() if (labels == label).sum() > 1
    ]
    if not distances:
        raise ValueError("`feature_diversity` needs at least one class with two or more samples.")
    return float(torch.stack(distances).mean())


def _random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background value -1."""
    if max_shift == 0:
        return images
    batch, size = images.shape[0], images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    window = torch.arange(size)
    rows = (offsets[:, :1] + window)[:, :, None]
    cols = (offsets[:, 1:] + window)[:, None, :]
    return padded[torch.arange(batch)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def _cache_key(images: torch.Tensor, labels: torch.Tensor, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(images.detach().cpu().float().contiguous().numpy().tobytes())
    digest.update(labels.cpu().numpy().astype(np.int64).tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_classes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    max_shift: int = 1,
    **model_kwargs,
) -> ImageClassifier:
    """Train an ``ImageClassifier`` on images in [-1, 1] (Adam, random shifts of up to ``max_shift`` pixels).

    Training is seeded and leaves the global RNG untouched: the same data, settings and seed give the same weights.
    With ``cache_dir``, the trained model is saved there (``save_pretrained``: safetensors + config) under a key
    hashing the data, the settings and the seed, and later calls with the same inputs load it instead of training.
    After training, ``feature_scale`` is set so the training images' features have unit RMS.
    Extra keyword arguments configure the ``ImageClassifier``. The model is returned in eval mode, on the CPU.
    """
    _check_images(images, "images")
    labels = _check_labels(labels, images.shape[0])
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"`labels` must lie in [0, {num_classes - 1}].")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    config = {
        "sample_size": images.shape[-1],
        "in_channels": images.shape[1],
        "num_classes": num_classes,
        **model_kwargs,
    }
    settings = {
        "config": config,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "max_shift": max_shift,
        "recipe": TRAINING_RECIPE_VERSION,
    }
    path = None
    if cache_dir is not None:
        path = os.path.join(os.fspath(cache_dir), f"classifier-{_cache_key(images, labels, settings)}")
        if os.path.isfile(os.path.join(path, "config.json")):
            return ImageClassifier.from_pretrained(path).eval()

    images = images.detach().float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        model = ImageClassifier(**config)
        optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(images.shape[0], generator=generator)
            for start in range(0, images.shape[0], batch_size):
                index = order[start : start + batch_size]
                batch = _random_shift(images[index], max_shift, generator)
                loss = F.cross_entropy(model(batch), labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    model.eval()
    with torch.no_grad():
        model.feature_scale.fill_(extract_features(ClassifierFeatures(model), images).pow(2).mean().rsqrt().item())
    if path is not None:
        model.save_pretrained(path)
    return model


@dataclass
class SampleScores:
    """Scores of samples against reference data, in a classifier's feature space.

    Args:
        accuracy: fraction of samples the classifier assigns to the class they were generated for (``None`` for
            samples generated without labels).
        frechet_distance: Fréchet classifier distance between reference and sample features.
        kid_mean: KID in the same feature space (mean over subsets).
        kid_std: KID standard deviation over subsets.
        diversity: mean within-class pairwise feature distance of the samples (``feature_diversity``); without
            sample labels, the classes are the classifier's predictions.
        reference_diversity: the same for the reference data, the value a perfect sampler would reach.
        num_samples: number of samples scored.
    """

    accuracy: float | None
    frechet_distance: float
    kid_mean: float
    kid_std: float
    diversity: float
    reference_diversity: float
    num_samples: int

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def score_samples(
    classifier: ImageClassifier,
    samples: torch.Tensor,
    sample_labels: torch.Tensor | np.ndarray | None,
    reference_images: torch.Tensor,
    reference_labels: torch.Tensor | np.ndarray,
    batch_size: int = 256,
    seed: int = 0,
) -> SampleScores:
    """Accuracy, Fréchet classifier distance, KID and diversity of samples against labelled reference data.

    ``sample_labels`` are the classes the samples were generated for; ``None`` (unconditional samples) skips the
    accuracy and measures diversity within the classes the classifier predicts.
    """
    _check_images(samples, "samples")
    accuracy = None
    if sample_labels is None:
        sample_labels = predict_classes(classifier, samples, batch_size)
    else:
        sample_labels = _check_labels(sample_labels, samples.shape[0], "sample_labels")
        accuracy = classifier_accuracy(classifier, samples, sample_labels, batch_size)
    _check_images(reference_images, "reference_images")
    reference_labels = _check_labels(reference_labels, reference_images.shape[0], "reference_labels")
    extractor = ClassifierFeatures(classifier)
    reference_features = extract_features(extractor, reference_images, batch_size)
    sample_features = extract_features(extractor, samples, batch_size)
    kid_mean, kid_std = kernel_distance(reference_features, sample_features, seed=seed)
    return SampleScores(
        accuracy=accuracy,
        frechet_distance=frechet_distance(reference_features, sample_features),
        kid_mean=kid_mean,
        kid_std=kid_std,
        diversity=feature_diversity(sample_features, sample_labels),
        reference_diversity=feature_diversity(reference_features, reference_labels),
        num_samples=samples.shape[0],
    )
