"""Offline evaluation: densities on a grid, sample distances, feature-based metrics and OOD scores."""

from .backbones import TransformersFeatures  # noqa: F401
from .classifier import (  # noqa: F401
    ClassifierFeatures,
    ImageClassifier,
    SampleScores,
    classifier_accuracy,
    feature_diversity,
    predict_classes,
    score_samples,
    train_classifier,
)
from .density import (  # noqa: F401
    DensityGrid,
    density_grid,
    energy_log_density,
    fraction_in_support,
    grid_log_probabilities,
    kl_divergence_on_grid,
    mmd_rbf,
    sliced_wasserstein_distance,
)
from .features import (  # noqa: F401
    FeatureDistances,
    InceptionFeatures,
    PrecomputedFeatures,
    extract_features,
    feature_distances,
    frechet_distance,
    kernel_distance,
)
from .ood import OOD_SHIFTS, ood_auroc, shift_images  # noqa: F401
