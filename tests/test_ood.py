"""OOD detection: ood_auroc against a pairwise count, and log_density's batching, sign and gradient contract."""

import numpy as np
import pytest
import torch
from conftest import TINY_SIZE, QuadraticImageEnergy, tiny_initializer, tiny_pipeline

from cdrl_diffusers import CDRLPipeline, CDRLScheduler
from cdrl_diffusers.evaluation import OOD_SHIFTS, ood_auroc, shift_images


def pairwise_auroc(positives, negatives):
    """P(score_in > score_out) + 0.5 P(tie), the definition of the AUROC."""
    diff = np.asarray(positives)[:, None] - np.asarray(negatives)[None, :]
    return (diff > 0).mean() + 0.5 * (diff == 0).mean()


def test_ood_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    in_scores, out_scores = rng.normal(1.0, 1.0, 50), rng.normal(0.0, 1.0, 70)
    assert ood_auroc(in_scores, out_scores) == pytest.approx(pairwise_auroc(in_scores, out_scores))
    rounded_in, rounded_out = np.round(in_scores), np.round(out_scores)  # many ties
    assert ood_auroc(rounded_in, rounded_out) == pytest.approx(pairwise_auroc(rounded_in, rounded_out))
    assert ood_auroc(torch.tensor([3.0, 4.0]), [1.0, 2.0]) == 1.0  # higher = in-distribution
    assert ood_auroc([1.0, 2.0], torch.tensor([3.0, 4.0])) == 0.0
    assert ood_auroc([1.0, 1.0], [1.0]) == 0.5


@pytest.mark.parametrize(
    "in_scores, out_scores, message",
    [
        ([], [1.0], "in_scores"),
        ([1.0], np.zeros((2, 2)), "out_scores"),
        ([1.0, float("nan")], [0.0], "NaN"),
        ([1.0], [float("inf")], "infinite"),
    ],
)
def test_ood_auroc_rejects_bad_scores(in_scores, out_scores, message):
    with pytest.raises(ValueError, match=message):
        ood_auroc(in_scores, out_scores)


def test_log_density_is_invariant_to_batch_composition():
    pipe = tiny_pipeline(num_class_embeds=3)
    images = torch.rand(6, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    others = torch.rand(4, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
    scores = pipe.log_density(images)
    permutation = torch.tensor([4, 0, 5, 2, 1, 3])
    torch.testing.assert_close(pipe.log_density(images[permutation]), scores[permutation])
    torch.testing.assert_close(pipe.log_density(torch.cat([others, images]))[4:], scores)
    torch.testing.assert_close(pipe.log_density(images, batch_size=1), scores)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    conditional = pipe.log_density(images, class_labels=labels)
    torch.testing.assert_close(
        pipe.log_density(images[permutation], class_labels=labels[permutation]), conditional[permutation]
    )
    assert not torch.allclose(conditional, scores)  # class-conditional and unconditional densities differ


def test_log_density_builds_no_parameter_gradients():
    pipe = tiny_pipeline()
    for param in pipe.energy_model.parameters():
        param.requires_grad_(True)
    scores = pipe.log_density(torch.rand(2, 3, TINY_SIZE, TINY_SIZE) * 2 - 1)
    assert not scores.requires_grad
    assert all(param.grad is None and param.requires_grad for param in pipe.energy_model.parameters())


def test_in_distribution_images_score_higher_than_shifted_ones():
    """An energy centred on a constant grey image: images near it score higher; AUROC against shifted sets is high."""
    pipe = CDRLPipeline(
        energy_model=QuadraticImageEnergy(class_means=(0.3,), curvature=1.0),
        initializer=tiny_initializer(),
        scheduler=CDRLScheduler(),
    )
    generator = torch.Generator().manual_seed(0)
    in_distribution = 0.3 + 0.1 * torch.randn(32, 3, TINY_SIZE, TINY_SIZE, generator=generator)
    shifted = {
        "uniform noise": torch.rand(32, 3, TINY_SIZE, TINY_SIZE, generator=generator) * 2 - 1,
        "inverted": -in_distribution,
    }
    in_scores = pipe.log_density(in_distribution)
    for images in shifted.values():
        assert ood_auroc(in_scores, pipe.log_density(images)) > 0.99


def test_shifted_sets():
    images = torch.rand(5, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    shifted = {shift: shift_images(images, shift, torch.Generator().manual_seed(0)) for shift in OOD_SHIFTS}
    for shift, batch in shifted.items():
        assert batch.shape == images.shape and batch.min() >= -1 and batch.max() <= 1
        assert torch.equal(batch, shift_images(images, shift, torch.Generator().manual_seed(0)))  # reproducible
        assert not torch.allclose(batch, images)
    assert torch.equal(shifted["inverted"], -images)
    # Shuffling moves whole pixels: each image keeps its multiset of colours.
    for original, shuffled in zip(images, shifted["shuffled"]):
        pixels, moved = original.flatten(1).T.tolist(), shuffled.flatten(1).T.tolist()
        assert sorted(pixels) == sorted(moved) and pixels != moved
    # Interpolation averages each image with a different image of the batch.
    for index, mixed in enumerate(shifted["interpolated"]):
        partners = [other for other in range(5) if torch.allclose(2 * mixed - images[index], images[other])]
        assert len(partners) == 1 and partners[0] != index
    with pytest.raises(ValueError, match="shift"):
        shift_images(images, "blurred")
    with pytest.raises(ValueError, match="two images"):
        shift_images(images[:1], "interpolated")
    with pytest.raises(ValueError, match="images"):
        shift_images(images[0], "inverted")


def test_rotated_and_mirrored_shifts_are_exact_geometric_maps():
    images = torch.rand(4, 3, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(2)) * 2 - 1
    rotated = shift_images(images, "rotated")
    assert torch.equal(rotated[:, :, 0, 0], images[:, :, 0, -1])  # counter-clockwise: the top-right corner moves left
    assert torch.equal(rotated[:, :, 1, 2], images[:, :, 2, TINY_SIZE - 2])  # new (i, j) = old (j, W - 1 - i)
    turns = [images]
    for _ in range(4):
        turns.append(shift_images(turns[-1], "rotated"))
    assert not any(torch.equal(turn, images) for turn in turns[1:4])
    assert torch.equal(turns[4], images)  # four quarter turns are the identity
    flipped = shift_images(images, "flipped")
    assert torch.equal(flipped, images[..., torch.arange(TINY_SIZE - 1, -1, -1)])  # left-right mirror
    assert torch.equal(shift_images(flipped, "flipped"), images)  # an involution
    upside_down = shift_images(images, "upside_down")
    assert torch.equal(upside_down, images[:, :, torch.arange(TINY_SIZE - 1, -1, -1)])  # top-bottom mirror
    # Both mirrors together are a half turn.
    assert torch.equal(shift_images(upside_down, "flipped"), shift_images(shift_images(images, "rotated"), "rotated"))
    with pytest.raises(ValueError, match="square"):
        shift_images(torch.zeros(2, 1, 8, 6), "rotated")


def test_periodic_shift_is_one_grating_per_image_in_its_value_range():
    size = 16
    images = torch.rand(32, 3, size, size, generator=torch.Generator().manual_seed(3)) * 1.5 - 0.75
    patterns = shift_images(images, "periodic", torch.Generator().manual_seed(0))
    assert patterns.shape == images.shape
    assert torch.equal(patterns, shift_images(images, "periodic", torch.Generator().manual_seed(0)))
    assert not torch.equal(patterns, shift_images(images, "periodic", torch.Generator().manual_seed(1)))
    assert torch.equal(patterns, patterns[:, :1].expand_as(patterns))  # the same grating in every channel
    assert (patterns.amin(dim=(1, 2, 3)) >= images.amin(dim=(1, 2, 3))).all()
    assert (patterns.amax(dim=(1, 2, 3)) <= images.amax(dim=(1, 2, 3))).all()
    wave_vectors = set()
    for pattern in patterns[:, 0].double():
        # One spatial frequency: the whole non-constant part of the DFT sits on the conjugate bins k and -k.
        spectrum = torch.fft.fft2(pattern - pattern.mean()).abs()
        k_y, k_x = divmod(int(spectrum.argmax()), size)
        peaks = spectrum[[k_y, -k_y % size], [k_x, -k_x % size]]
        assert (k_y, k_x) != (0, 0) and (-k_y % size, -k_x % size) != (k_y, k_x)
        assert spectrum.pow(2).sum().item() == pytest.approx(peaks.pow(2).sum().item(), rel=1e-9)
        # Constant along the stripes (a translation orthogonal to k), so periodic along k with period size / |k|.
        torch.testing.assert_close(pattern.roll((k_x, -k_y), dims=(0, 1)), pattern)
        wave_vectors.add(min((k_y, k_x), (-k_y % size, -k_x % size)))
    assert len(wave_vectors) > 5  # random frequencies and orientations
    with pytest.raises(ValueError, match="4x4"):
        shift_images(torch.zeros(2, 1, 3, 8), "periodic")
