"""Held-out evaluation during training: the offline metrics of ``cdrl_diffusers.evaluation`` on samples."""

from __future__ import annotations

import datasets
import torch
from datasets import ClassLabel

from ..evaluation import (
    ClassifierFeatures,
    classifier_accuracy,
    extract_features,
    frechet_distance,
    kernel_distance,
    train_classifier,
)
from ..pipelines import CDRLPipeline
from .data import image_tensors

# The evaluation classifier trains for this many epochs on at most this many training images (a seeded subset of
# larger datasets): a minute or two on a CPU, once per dataset (it is cached).
CLASSIFIER_EPOCHS, CLASSIFIER_MAX_IMAGES = 10, 5_000


def evaluation_label_column(rows: datasets.Dataset, label_columns: list[str]) -> str | None:
    """The classes of the evaluation classifier: the first of ``label_columns``, else any ``ClassLabel`` column."""
    if label_columns:
        return label_columns[0]
    return next((name for name, feature in rows.features.items() if isinstance(feature, ClassLabel)), None)


class HeldOutEvaluator:
    """Scores samples of a pipeline against held-out images (see docs/evaluation.md).

    Metrics: the Fréchet distance and KID between the features of ``num_samples`` samples and of the held-out
    images and, for class-conditional models, the accuracy of samples generated for each class in turn with guidance
    weight ``guidance_scale``. The feature space is the penultimate layer of a small classifier of the data's labels
    (``train_classifier`` on the training rows, seeded and cached in ``cache_dir``); data without a label column is
    compared in pixel space. Samples are drawn with the same seed at every evaluation.

    Args:
        train_rows: the training rows (the classifier's data).
        validation_rows: the held-out rows, never trained on.
        image_column: the column of the images.
        resolution: the training resolution; ``channels``: 1 or 3.
        label_columns: the class-label column(s) of training (``--label_column`` or ``--attribute_columns``).
        class_conditional: whether the model is class-conditional (guided samples of each class, accuracy).
        num_samples: how many samples to generate at each evaluation.
        batch_size: the sampling batch size.
        guidance_scale: the guidance weight of class-conditional samples.
        seed: the sampling seed, the same at every evaluation.
        cache_dir: where the classifier is cached.
        device: where the feature network runs.
    """

    def __init__(
        self,
        train_rows: datasets.Dataset,
        validation_rows: datasets.Dataset,
        image_column: str,
        resolution: int,
        channels: int,
        label_columns: list[str],
        class_conditional: bool,
        num_samples: int = 256,
        batch_size: int = 32,
        guidance_scale: float = 1.0,
        seed: int = 0,
        cache_dir: str | None = None,
        device: torch.device | str = "cpu",
    ):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.class_conditional = class_conditional
        self.guidance_scale = guidance_scale if class_conditional else 0.0
        reference, _ = image_tensors(validation_rows, image_column, resolution, channels)
        label_column = evaluation_label_column(train_rows, label_columns)
        num_classes = train_rows.features[label_column].num_classes if label_column else 0
        self.classifier = None
        if num_classes < 2 or resolution % 4:
            reason = "no label column" if num_classes < 2 else f"resolution {resolution} not divisible by 4"
            self.features, self.description = torch.nn.Flatten(), f"raw pixels ({reason} for a classifier)"
        else:
            if len(train_rows) > CLASSIFIER_MAX_IMAGES:
                train_rows = train_rows.shuffle(seed=seed).select(range(CLASSIFIER_MAX_IMAGES))
            images, labels = image_tensors(train_rows, image_column, resolution, channels, label_column)
            with torch.random.fork_rng(devices=[]):  # training the classifier must not move the caller's RNG
                classifier = train_classifier(
                    images, labels, num_classes=num_classes, cache_dir=cache_dir, seed=seed, epochs=CLASSIFIER_EPOCHS
                )
            self.classifier = classifier.to(device)
            self.features = ClassifierFeatures(self.classifier)
            self.description = (
                f"penultimate features of a {label_column!r} classifier trained on {len(images)} training images"
            )
        self.reference_features = extract_features(self.features, reference)

    def summary(self, metrics: dict[str, float]) -> str:
        """One line: the metrics, the samples and the feature space."""
        values = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
        guidance = f" (guidance w = {self.guidance_scale})" if self.class_conditional else ""
        return (
            f"{values}; {self.num_samples} samples{guidance} vs {len(self.reference_features)} held-out images, "
            f"{self.description}"
        )

    @torch.no_grad()
    def __call__(self, pipeline: CDRLPipeline) -> dict[str, float] | None:
        """The metrics of the pipeline's samples (``None`` when some samples are not finite)."""
        num_classes = pipeline.energy_model.config.num_class_embeds if self.class_conditional else None
        labels = None if num_classes is None else torch.arange(self.num_samples) % num_classes
        generator = torch.Generator(pipeline.device).manual_seed(self.seed)
        batches = []
        for start in range(0, self.num_samples, self.batch_size):
            stop = min(start + self.batch_size, self.num_samples)
            images = pipeline(
                batch_size=stop - start,
                class_labels=None if labels is None else labels[start:stop],
                guidance_scale=self.guidance_scale,
                generator=generator,
                output_type="pt",
            ).images
            batches.append(images.float().cpu() * 2 - 1)
        samples = torch.cat(batches)
        if not torch.isfinite(samples).all():
            return None
        features = extract_features(self.features, samples)
        kid, kid_std = kernel_distance(self.reference_features, features, seed=self.seed)
        metrics = {"frechet_distance": frechet_distance(self.reference_features, features), "kid": kid}
        metrics["kid_std"] = kid_std
        if labels is not None and self.classifier is not None:
            metrics["accuracy"] = classifier_accuracy(self.classifier, samples, labels)
        return metrics
