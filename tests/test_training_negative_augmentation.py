"""Negative data augmentation in the training step: known non-data images ranked below the data (logistic terms)."""

from __future__ import annotations

import pytest
import torch
from conftest import QuadraticEnergy, ShiftInitializer

from cdrl_diffusers import CDRLScheduler, cdrl_training_step, training
from cdrl_diffusers.evaluation import shift_images

CENTRE = torch.tensor([0.0, 0.1, 0.2])  # the quadratic EBM's mean for the null class


def step(augmented_negatives=None):
    energy, initializer = QuadraticEnergy(data_dim=3, curvature=4.0), ShiftInitializer(data_dim=3)
    scheduler = CDRLScheduler(num_langevin_steps=2)
    clean = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    output = cdrl_training_step(
        energy,
        initializer,
        scheduler,
        clean,
        generator=torch.Generator().manual_seed(0),
        augmented_negatives=augmented_negatives,
    )
    return output, energy, scheduler, clean


def test_augmented_negatives_add_logistic_terms_on_the_first_rows():
    plain, _, scheduler, clean = step()
    negatives = clean[:2].flip(1) + 0.3
    output, energy, _, _ = step(negatives)
    assert torch.equal(output.initializer_loss, plain.initializer_loss)  # the chains and the initializer: unchanged

    # The step's first draws, replayed: the levels and the pair noise of Eq. 9, shared by rows 0 and 1.
    replay = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, scheduler.num_noise_levels, (6,), generator=replay)
    noise = torch.randn(6, 3, generator=replay)
    positive, _ = scheduler.training_pair(clean[:2], timesteps[:2], noise[:2])
    augmented, _ = scheduler.training_pair(negatives, timesteps[:2], noise[:2])

    def neg_energy(y):
        return -2.0 * (y - CENTRE).pow(2).sum(1)

    logistic = torch.nn.functional.softplus(neg_energy(augmented) - neg_energy(positive))
    extra = scheduler.loss_weight[timesteps[:2]] * logistic
    expected = plain.ebm_loss + extra.sum() / 6  # averaged over the batch of 6
    assert output.ebm_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_augmented_negatives_push_their_energy_up():
    """One gradient step on the EBM loss lowers f_hat of the negatives relative to the data."""
    clean = torch.full((4, 3), 0.5)
    negatives = torch.full((4, 3), -0.5)
    energy = QuadraticEnergy(data_dim=3, curvature=4.0)
    scheduler = CDRLScheduler(num_langevin_steps=1)
    initializer = ShiftInitializer(data_dim=3)

    def margin():
        logsnr = scheduler.energy_logsnr(torch.zeros(4, dtype=torch.long))
        return (energy(clean, logsnr).neg_energy - energy(negatives, logsnr).neg_energy).mean().item()

    before = margin()
    models = (energy, initializer, scheduler, clean)
    output = cdrl_training_step(*models, generator=torch.Generator().manual_seed(0), augmented_negatives=negatives)
    plain = cdrl_training_step(*models, generator=torch.Generator().manual_seed(0))
    params = [p for p in energy.parameters() if p.requires_grad]
    with_negatives = torch.autograd.grad(output.ebm_loss, params)
    without = torch.autograd.grad(plain.ebm_loss, params)
    with torch.no_grad():
        for parameter, gradient, base in zip(params, with_negatives, without):
            parameter -= 0.05 * (gradient - base)  # only the augmented terms' share of the gradient
    assert margin() > before


@pytest.mark.parametrize(
    ("negatives", "error", "match"),
    [
        (torch.zeros(7, 3), ValueError, r"1 <= n <= 6"),
        (torch.zeros(2, 4), ValueError, r"shape \(n, 3\)"),
        (torch.zeros(0, 3), ValueError, "augmented_negatives"),
        (torch.zeros(2, 3, dtype=torch.long), TypeError, "floating-point"),
        ([[0.0, 0.0, 0.0]], TypeError, "augmented_negatives"),
    ],
)
def test_bad_augmented_negatives(negatives, error, match):
    with pytest.raises(error, match=match):
        step(negatives)


def test_shifted_negatives_turn_the_first_share_of_the_batch():
    images = torch.rand(8, 1, 5, 5, generator=torch.Generator().manual_seed(0)) * 2 - 1
    negatives = training.shifted_negatives(images, ["flipped", "upside_down"], 0.5, torch.Generator().manual_seed(1))
    assert negatives.shape == (4, 1, 5, 5)
    kinds = []
    for row in range(4):
        if torch.equal(negatives[row], images[row].flip(2)):
            kinds.append("flipped")
        else:
            assert torch.equal(negatives[row], images[row].flip(1))
            kinds.append("upside_down")
    assert set(kinds) == {"flipped", "upside_down"}  # this seed draws both
    again = training.shifted_negatives(images, ["flipped", "upside_down"], 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(negatives, again)
    assert torch.equal(images, images.clone())  # the batch itself is untouched
    single = training.shifted_negatives(images, ["rotated"], 0.25)
    assert torch.equal(single, shift_images(images[:2], "rotated"))
    assert training.shifted_negatives(images, ["flipped"], 0.0) is None


@pytest.mark.parametrize(
    ("shifts", "share", "match"),
    [("flipped", 0.5, "shifts"), ([], 0.5, "shifts"), (["mirrored"], 0.5, "shifts"), (["flipped"], 1.5, "share")],
)
def test_shifted_negatives_bad_arguments(shifts, share, match):
    with pytest.raises(ValueError, match=match):
        training.shifted_negatives(torch.zeros(4, 1, 4, 4), shifts, share)


def test_conditional_ebm_ranks_augmented_negatives_under_the_label_the_null_class_and_the_classifier():
    energy = QuadraticEnergy(data_dim=3, curvature=4.0, num_class_embeds=2)
    initializer, scheduler = ShiftInitializer(data_dim=3), CDRLScheduler(num_langevin_steps=2)
    clean = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.tensor([0, 1, 1, 0, 1, 0])
    negatives = clean[:3].flip(1) + 0.3

    def run(augmented_negatives=None):
        return cdrl_training_step(
            energy,
            initializer,
            scheduler,
            clean,
            class_labels=labels,
            generator=torch.Generator().manual_seed(0),
            label_dropout=0.0,
            augmented_negatives=augmented_negatives,
        )

    plain, output = run(), run(negatives)
    replay = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, scheduler.num_noise_levels, (6,), generator=replay)
    noise = torch.randn(6, 3, generator=replay)
    positive, _ = scheduler.training_pair(clean[:3], timesteps[:3], noise[:3])
    augmented, _ = scheduler.training_pair(negatives, timesteps[:3], noise[:3])

    def neg_energy(y, mean):
        return -2.0 * (y - mean).pow(2).sum(1)

    softplus = torch.nn.functional.softplus
    means = energy.means.detach()
    under_label = softplus(neg_energy(augmented, means[labels[:3]]) - neg_energy(positive, means[labels[:3]]))
    under_null = softplus(neg_energy(augmented, means[2]) - neg_energy(positive, means[2]))  # the null class: 2

    def classifier(y):  # log p(c | y) up to a constant: f_hat_c - f_hat_null
        return neg_energy(y, means[labels[:3]]) - neg_energy(y, means[2])

    by_classifier = softplus(classifier(augmented) - classifier(positive))
    terms = under_label + under_null + by_classifier
    expected = plain.ebm_loss + (scheduler.loss_weight[timesteps[:3]] * terms).sum() / 6
    assert output.ebm_loss.item() == pytest.approx(expected.item(), rel=1e-5)
