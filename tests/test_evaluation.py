"""Offline image metrics against independent computations, and the cached, seeded classifier trainer."""

from __future__ import annotations

import json

import huggingface_hub.constants
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from cdrl_diffusers.evaluation import (
    ClassifierFeatures,
    ImageClassifier,
    InceptionFeatures,
    TransformersFeatures,
    classifier_accuracy,
    extract_features,
    feature_distances,
    feature_diversity,
    frechet_distance,
    kernel_distance,
    predict_classes,
    score_samples,
    train_classifier,
)


def exact_moments(mean: np.ndarray, cov: np.ndarray, num_samples: int, seed: int) -> torch.Tensor:
    """Samples whose empirical mean and unbiased covariance are exactly ``mean`` and ``cov``."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((num_samples, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whitened: cov(z) = I exactly
    return torch.from_numpy(mean + z @ np.linalg.cholesky(cov).T)


def reference_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def reference_kid(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), on equal-size sets."""
    kernel = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
    m = len(a)
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2 * k_ab.sum() / m**2)


class MeanSignClassifier(nn.Module):
    """Class 1 when an image's mean pixel is positive, else class 0."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.flatten(1).mean(dim=1)
        return torch.stack([-mean, mean], dim=1)


def test_frechet_distance_of_gaussians_with_known_moments():
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = exact_moments(mean_a, np.diag(std_a**2), 400, seed=0)
    b = exact_moments(mean_b, np.diag(std_b**2), 300, seed=1)
    # Diagonal covariances: d^2 = ||mu_a - mu_b||^2 + sum (sigma_a - sigma_b)^2 = 5 + 2 = 7.
    expected = ((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


@pytest.fixture
def torchmetrics_before_1_4(monkeypatch):
    """FID/KID ``update`` as in torchmetrics 1.0-1.3: ``(imgs * 255).byte()`` whenever ``normalize=True``, even with a
    custom feature network (1.4 skips it for custom networks). The metrics must be right on either version."""
    for metric_class in (FrechetInceptionDistance, KernelInceptionDistance):
        update = metric_class.update

        def update_before_1_4(self, imgs, real, update=update):
            return update(self, (imgs * 255).byte() if self.normalize else imgs, real)

        monkeypatch.setattr(metric_class, "update", update_before_1_4)


def test_frechet_and_kernel_distances_keep_float_features_on_older_torchmetrics(torchmetrics_before_1_4):
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.5])
    a = exact_moments(mean_a, np.diag(std_a**2), 400, seed=0)
    b = exact_moments(mean_b, np.diag(std_b**2), 400, seed=1)
    expected = ((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()  # closed form for two Gaussians: 7
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    mean, _ = kernel_distance(a, b, subsets=2, subset_size=None)
    assert mean == pytest.approx(reference_kid(a.numpy(), b.numpy()), rel=1e-9)


def test_frechet_distance_matches_scipy_on_correlated_features():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=generator, dtype=torch.float64) @ torch.randn(
        5, 5, generator=generator, dtype=torch.float64
    )
    b = torch.randn(150, 5, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(reference_frechet(a.numpy(), b.numpy()), rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_kernel_distance_matches_the_unbiased_mmd_and_vanishes_for_identical_sets():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(400, 4, generator=generator, dtype=torch.float64)
    b = torch.randn(400, 4, generator=generator, dtype=torch.float64) + 1.0
    mean, std = kernel_distance(a, b, subsets=3, subset_size=None)
    assert mean == pytest.approx(reference_kid(a.numpy(), b.numpy()), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)  # every subset is the whole (permuted) set
    assert mean > 0.5
    same, _ = kernel_distance(a, a, subsets=3, subset_size=None)
    assert same == pytest.approx(reference_kid(a.numpy(), a.numpy()), rel=1e-9)
    assert abs(same) < 0.01 * mean  # only the O(1/m) diagonal terms remain


def test_kernel_distance_is_seeded_and_leaves_the_global_rng_alone():
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(200, 4, generator=generator)
    b = torch.randn(200, 4, generator=generator)
    torch.manual_seed(123)
    expected_next = torch.rand(())
    torch.manual_seed(123)
    first = kernel_distance(a, b, subsets=10, subset_size=50, seed=5)
    assert torch.rand(()) == expected_next
    assert kernel_distance(a, b, subsets=10, subset_size=50, seed=5) == first
    assert kernel_distance(a, b, subsets=10, subset_size=50, seed=6) != first
    mean, std = first
    assert abs(mean) < 3 * std + 1e-3  # two samples of one distribution: KID around zero


def test_metric_inputs_are_validated():
    a, b = torch.randn(10, 3), torch.randn(10, 4)
    with pytest.raises(ValueError, match="same width"):
        frechet_distance(a, b)
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="subset_size"):
        kernel_distance(a, a, subset_size=1)
    with pytest.raises(TypeError, match="images"):
        extract_features(nn.Flatten(), torch.zeros(2, 1, 4, 4, dtype=torch.long))


def test_extract_features_batches_and_restores_the_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5), nn.Flatten()).train()
    images = torch.randn(7, 1, 5, 5)
    whole = extract_features(net, images, batch_size=64)
    assert whole.shape == (7, 18)
    torch.testing.assert_close(extract_features(net, images, batch_size=3), whole)
    net.eval()
    torch.testing.assert_close(whole, net(images).detach())  # dropout was off during extraction
    net.train()
    assert net.training and all(param.requires_grad for param in net.parameters())


def test_accuracy_of_a_fixed_classifier():
    means = torch.tensor([0.5, -0.5, 0.2, -0.1, 0.3, -0.4, 0.1, -0.2])
    images = means[:, None, None, None].expand(-1, 1, 4, 4).clone()
    labels = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0])  # two of eight disagree with the sign
    classifier = MeanSignClassifier()
    assert predict_classes(classifier, images, batch_size=3).tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert classifier_accuracy(classifier, images, labels) == pytest.approx(0.75)
    assert classifier_accuracy(classifier, images, labels.numpy(), batch_size=2) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="labels"):
        classifier_accuracy(classifier, images, labels[:5])


def test_feature_diversity_is_the_mean_within_class_pairwise_distance():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 3, generator=generator)
    labels = torch.tensor([0] * 5 + [1] * 6 + [2])  # class 2 has one sample and is skipped
    expected = np.mean([scipy.spatial.distance.pdist(features[labels == c].numpy()).mean() for c in (0, 1)])
    assert feature_diversity(features, labels) == pytest.approx(expected, rel=1e-6)
    assert feature_diversity(features) == pytest.approx(scipy.spatial.distance.pdist(features.numpy()).mean())
    assert feature_diversity(features * 0.5, labels) == pytest.approx(expected / 2, rel=1e-6)


def stripe_data(num_samples: int = 64, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: a bright top half; class 1: a bright bottom half; plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % 2
    images = -torch.ones(num_samples, 1, size, size)
    images[labels == 0, :, : size // 2] = 1.0
    images[labels == 1, :, size // 2 :] = 1.0
    images += 0.3 * torch.randn(images.shape, generator=generator)
    return images.clamp(-1, 1), labels


TINY_CLASSIFIER = {
    "block_out_channels": (4, 8),
    "feature_dim": 8,
    "epochs": 15,
    "batch_size": 16,
    "learning_rate": 3e-3,
}


def test_train_classifier_is_seeded_learns_and_scales_its_features():
    images, labels = stripe_data()
    state = torch.get_rng_state()
    first = train_classifier(images, labels, seed=0, **TINY_CLASSIFIER)
    assert torch.equal(torch.get_rng_state(), state)
    second = train_classifier(images, labels, seed=0, **TINY_CLASSIFIER)
    other = train_classifier(images, labels, seed=1, **TINY_CLASSIFIER)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.head.weight, other.head.weight)
    test_images, test_labels = stripe_data(seed=1)
    assert classifier_accuracy(first, test_images, test_labels) >= 0.95
    features = extract_features(ClassifierFeatures(first), images)
    assert features.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)


def test_train_classifier_caches_in_safetensors(tmp_path, monkeypatch):
    images, labels = stripe_data()
    trained = train_classifier(images, labels, cache_dir=tmp_path, **TINY_CLASSIFIER)
    (entry,) = tmp_path.iterdir()
    assert (entry / "diffusion_pytorch_model.safetensors").is_file() and (entry / "config.json").is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(torch.optim, "Adam", no_training)
    cached = train_classifier(images, labels, cache_dir=tmp_path, **TINY_CLASSIFIER)
    assert isinstance(cached, ImageClassifier) and not cached.training
    for name, value in trained.state_dict().items():
        assert torch.equal(value, cached.state_dict()[name]), name
    with pytest.raises(AssertionError, match="cached"):  # other data: a new cache entry, so training runs
        train_classifier(images[:-2], labels[:-2], cache_dir=tmp_path, **TINY_CLASSIFIER)


def test_score_samples_of_the_reference_itself():
    images, labels = stripe_data()
    classifier = train_classifier(images, labels, **TINY_CLASSIFIER)
    scores = score_samples(classifier, images, labels, images, labels)
    assert scores.accuracy == pytest.approx(classifier_accuracy(classifier, images, labels))
    assert scores.frechet_distance == pytest.approx(0.0, abs=1e-6)
    assert scores.diversity == pytest.approx(scores.reference_diversity)
    unlabelled = score_samples(classifier, images, None, images, labels)  # unconditional samples
    assert unlabelled.accuracy is None
    features = extract_features(ClassifierFeatures(classifier), images)
    predicted = predict_classes(classifier, images)
    assert unlabelled.diversity == pytest.approx(feature_diversity(features, predicted))
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert score_samples(classifier, noise, labels, images, labels).frechet_distance > 0.1
    distances = feature_distances(images, noise, ClassifierFeatures(classifier), kid_subset_size=32)
    assert distances.num_real == distances.num_fake == 64 and distances.kid_mean > 0


def test_inception_features_need_a_local_file_and_feed_uint8_rgb(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="weights_path"):
        InceptionFeatures(tmp_path / "missing.pth")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="feature"):
        InceptionFeatures(weights, feature=1000)

    import torchmetrics.image.fid
    import torchmetrics.utilities.imports

    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ImportError, match="torch-fidelity"):
        InceptionFeatures(weights)

    class FakeInception(nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path, antialias):
            super().__init__()
            self.arguments = (name, features_list, feature_extractor_weights_path, antialias)

        def forward(self, pixels):
            self.seen = pixels
            return pixels.float().flatten(1)[:, :64]

    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", FakeInception)
    extractor = InceptionFeatures(weights, feature=64)
    assert extractor.num_features == 64
    assert extractor.inception.arguments == ("inception-v3-compat", ["64"], str(weights), False)
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    extractor(images)
    assert extractor.inception.seen.dtype == torch.uint8
    assert extractor.inception.seen.shape == (1, 3, 2, 2)
    assert extractor.inception.seen[0, 2].flatten().tolist() == [0, 128, 255, 255]


DINOV2_PREPROCESSING = {  # DINOv2's preprocessing (bicubic resize, center crop, ImageNet statistics), scaled down
    "image_processor_type": "BitImageProcessor",
    "do_resize": True,
    "size": {"shortest_edge": 36},
    "resample": 3,
    "do_center_crop": True,
    "crop_size": {"height": 32, "width": 32},
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def save_tiny_dinov2(folder) -> None:
    """A randomly initialised DINOv2-architecture backbone (hidden size 32) with its image processor config."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    Dinov2Model(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSING))


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    save_tiny_dinov2(folder)
    return folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_transformers_backbone_features_and_distances_offline(tiny_dinov2, offline):
    backbone = TransformersFeatures(tiny_dinov2)
    generator = torch.Generator().manual_seed(0)
    real = torch.rand(12, 3, 16, 16, generator=generator) * 2 - 1
    fake = (torch.rand(12, 3, 16, 16, generator=generator) * 2 - 1) * 0.3
    features = extract_features(backbone, real, batch_size=5)
    assert features.shape == (12, 32) and features.dtype == torch.float32
    # The backbone's own preprocessing (resize 16 -> 36, crop 32, ImageNet normalisation) on the uint8 images.
    pixels = ((real + 1) * 127.5).round().to(torch.uint8)
    inputs = backbone.processor(images=list(pixels), return_tensors="pt")["pixel_values"]
    assert inputs.shape == (12, 3, 32, 32)
    with torch.no_grad():
        expected = backbone.model(pixel_values=inputs).pooler_output
    torch.testing.assert_close(features, expected)
    # DINOv2's pooler output is its layer-normed CLS token; "mean" averages the tokens instead.
    torch.testing.assert_close(extract_features(TransformersFeatures(tiny_dinov2, pooling="cls"), real), features)
    mean_features = extract_features(TransformersFeatures(tiny_dinov2, pooling="mean"), real)
    assert mean_features.shape == (12, 32) and not torch.allclose(mean_features, features)
    # Grey-scale images are the RGB images with three equal channels.
    grey = real[:, :1]
    torch.testing.assert_close(
        extract_features(backbone, grey), extract_features(backbone, grey.expand(-1, 3, -1, -1))
    )

    distances = feature_distances(real, fake, backbone, kid_subsets=2, kid_subset_size=None)
    assert distances.frechet_distance > 0.1 and distances.num_real == 12
    assert feature_distances(real, real, backbone, kid_subsets=2, kid_subset_size=None).frechet_distance == (
        pytest.approx(0.0, abs=1e-6)
    )


def test_transformers_backbone_loads_by_hub_id_from_the_cache_offline(tmp_path, tiny_dinov2, offline):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--facebook--dinov2-tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in tiny_dinov2.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    by_id = extract_features(TransformersFeatures("facebook/dinov2-tiny", cache_dir=tmp_path), images)
    torch.testing.assert_close(by_id, extract_features(TransformersFeatures(tiny_dinov2), images))


def test_transformers_backbone_arguments_are_checked(tiny_dinov2, offline):
    with pytest.raises(ValueError, match="pooling"):
        TransformersFeatures(tiny_dinov2, pooling="max")
    with pytest.raises(ValueError, match="trust_remote_code"):
        TransformersFeatures(tiny_dinov2, trust_remote_code=True)
    with pytest.raises(ValueError, match="3-channel images, got 2"):
        TransformersFeatures(tiny_dinov2)(torch.zeros(2, 2, 16, 16))
