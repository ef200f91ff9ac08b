"""2-D toy data and the grid-density / sample-distance metrics, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from cdrl_diffusers import CDRLScheduler, EnergyMLP
from cdrl_diffusers.data import (
    TOY_DATASETS,
    checkerboard,
    eight_gaussians,
    has_density,
    sample_toy,
    toy_log_density,
    toy_support,
    two_spirals,
)
from cdrl_diffusers.evaluation import (
    density_grid,
    energy_log_density,
    fraction_in_support,
    grid_log_probabilities,
    kl_divergence_on_grid,
    mmd_rbf,
    sliced_wasserstein_distance,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TOY_DATASETS)
def test_samplers_are_seeded_and_scaled(name):
    first = sample_toy(name, 500, generator=generator(3), scale=4.0)
    torch.testing.assert_close(first, sample_toy(name, 500, generator=generator(3), scale=4.0))
    torch.testing.assert_close(first / 4.0, sample_toy(name, 500, generator=generator(3)))
    assert first.shape == (500, 2)
    assert not torch.equal(first, sample_toy(name, 500, generator=generator(4), scale=4.0))
    assert first.abs().max() <= 4.0 * 2.5


def test_checkerboard_fills_the_black_squares_uniformly():
    points = checkerboard(80_000, generator=generator(), scale=1.0)
    assert toy_support("checkerboard", points).all()
    cells = torch.floor(points).long() + 2
    counts = torch.bincount(cells[:, 1] * 4 + cells[:, 0], minlength=16).view(4, 4)
    black = (torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 == 1  # floor(x) + floor(y) odd
    assert (counts[~black] == 0).all()
    assert torch.allclose(counts[black].float() / 10_000, torch.ones(8), atol=0.05)


def test_eight_gaussians_support_holds_the_three_sigma_mass():
    points = eight_gaussians(40_000, generator=generator(), scale=2.0)
    # For a 2-D isotropic Gaussian, P(|x - mu| <= 3 sigma) = 1 - exp(-4.5).
    assert fraction_in_support(points, "8gaussians", 2.0) == pytest.approx(1 - math.exp(-4.5), abs=4e-3)


def test_spirals_are_two_point_symmetric_arms():
    points = two_spirals(2000, generator=generator())
    radius = points.norm(dim=1)
    assert radius.max() < 2.0
    assert not has_density("2spirals")
    with pytest.raises(ValueError, match="closed form"):
        toy_log_density("2spirals", points)
    with pytest.raises(ValueError, match="support"):
        toy_support("2spirals", points)


@pytest.mark.parametrize("name", ["checkerboard", "8gaussians"])
@pytest.mark.parametrize("alpha_bar, sigma_bar", [(1.0, 0.0), (0.99997, 0.0074), (0.73, 0.68), (0.078, 0.997)])
def test_noisy_densities_integrate_to_one(name, alpha_bar, sigma_bar):
    axis = torch.linspace(-13.0, 13.0, 521)
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    points = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)
    mass = toy_log_density(name, points, 4.0, alpha_bar, sigma_bar).double().exp().sum() * (axis[1] - axis[0]) ** 2
    assert float(mass) == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("name", ["checkerboard", "8gaussians"])
def test_noisy_densities_match_a_monte_carlo_estimate(name):
    alpha_bar, sigma_bar, scale = 0.88, 0.48, 2.0
    clean = sample_toy(name, 200_000, generator=generator(), scale=scale).double()
    queries = torch.tensor([[0.0, 0.0], [1.1, -0.4], [-2.5, 1.9], [3.0, 3.0]])
    squared = (queries.double()[:, None] - alpha_bar * clean[None]).pow(2).sum(-1)
    estimate = torch.exp(-0.5 * squared / sigma_bar**2).mean(1) / (2 * math.pi * sigma_bar**2)
    exact = toy_log_density(name, queries, scale, alpha_bar, sigma_bar).double().exp()
    torch.testing.assert_close(exact, estimate, rtol=0.03, atol=1e-4)


def test_clean_checkerboard_density_is_piecewise_uniform():
    points = torch.tensor([[0.5, 1.5], [-1.5, -0.5], [0.5, 0.5], [3.0, 0.5]]) * 4.0
    density = toy_log_density("checkerboard", points, scale=4.0).exp()
    torch.testing.assert_close(density, torch.tensor([1 / 128, 1 / 128, 0.0, 0.0]))
    # A tiny noise level changes it only near the edges, and keeps the far tails finite (log-domain erf).
    noisy = toy_log_density("checkerboard", points, 4.0, 1.0, 1e-3)
    torch.testing.assert_close(noisy[:2].exp(), torch.full((2,), 1 / 128))
    assert torch.isfinite(noisy).all() and (noisy[2:] < -1000).all()


def test_toy_data_rejects_bad_input():
    with pytest.raises(ValueError, match="name"):
        sample_toy("moons", 10)
    with pytest.raises(ValueError, match="num_samples"):
        checkerboard(0)
    with pytest.raises(ValueError, match="scale"):
        checkerboard(10, scale=-1.0)
    with pytest.raises(ValueError, match="shape"):
        toy_log_density("checkerboard", torch.zeros(3, 3))
    with pytest.raises(TypeError, match="points"):
        toy_support("checkerboard", torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="alpha_bar"):
        toy_log_density("8gaussians", torch.zeros(3, 2), alpha_bar=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# Grid densities and KL
# ---------------------------------------------------------------------------------------------------------------------
def test_density_grid_layout():
    grid = density_grid(2.0, 4)
    torch.testing.assert_close(grid.coordinates, torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    assert grid.cell_area == pytest.approx(1.0)
    torch.testing.assert_close(grid.as_image(grid.points[:, 0])[2], grid.coordinates)  # x along the columns
    torch.testing.assert_close(grid.as_image(grid.points[:, 1])[:, 1], grid.coordinates)  # y along the rows
    with pytest.raises(ValueError, match="resolution"):
        density_grid(1.0, 1)


def test_kl_of_a_density_with_itself_is_zero_and_uniform_vs_checkerboard_is_known():
    grid = density_grid(10.0, 200)
    true = toy_log_density("checkerboard", grid.points, scale=4.0)
    assert kl_divergence_on_grid(true, true) == pytest.approx(0.0, abs=1e-12)
    # The black squares cover 8 * 16 of the 400 square units of the grid: KL(checkerboard || uniform) = log(400/128).
    assert kl_divergence_on_grid(true, torch.zeros_like(true)) == pytest.approx(math.log(400 / 128), rel=1e-9)
    # Shifting a log-density by a constant changes nothing (the grid normalises).
    assert kl_divergence_on_grid(true, true + 123.0) == pytest.approx(0.0, abs=1e-12)
    # No model mass on the support: infinite.
    assert kl_divergence_on_grid(true, torch.where(torch.isfinite(true), -math.inf, 0.0)) == math.inf


def test_kl_between_gaussians_matches_the_closed_form():
    grid = density_grid(8.0, 400)
    squared = grid.points.double().pow(2).sum(1)
    first, second = 1.0, 1.5  # standard deviations of two centred isotropic Gaussians
    kl = kl_divergence_on_grid(-0.5 * squared / first**2, -0.5 * squared / second**2)
    expected = 2 * (math.log(second / first) + first**2 / (2 * second**2) - 0.5)
    assert kl == pytest.approx(expected, rel=1e-3)


def test_grid_log_probabilities_normalise_and_reject_nan():
    log_probs = grid_log_probabilities(torch.tensor([0.0, math.log(3.0), -math.inf]))
    torch.testing.assert_close(log_probs.exp(), torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        grid_log_probabilities(torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="same grid"):
        kl_divergence_on_grid(torch.zeros(3), torch.zeros(4))


def test_energy_log_density_is_f_hat_over_s_squared_at_the_scaled_input():
    torch.manual_seed(0)
    model = EnergyMLP(data_dim=2, hidden_dim=16, num_layers=2, embedding_dim=16)
    with torch.no_grad():
        for layer in model.layers:
            layer.residual_scale.fill_(0.5)
    model.eval()
    scheduler = CDRLScheduler(langevin_step_size_rule="toy", langevin_step_size_scale=2e-3, clip_sample=False)
    points = torch.randn(37, 2) * 3
    for level in (0, 2, 5):
        scale = 1.0 if level == 5 else scheduler.alpha[level].item()  # the last pair is the marginal (SPEC §3)
        with torch.no_grad():
            neg_energy = model(points * scale, scheduler.logsnr[level].item()).neg_energy
        expected = neg_energy / scheduler.langevin_step_size[level] ** 2
        torch.testing.assert_close(energy_log_density(model, scheduler, points, level), expected)
        torch.testing.assert_close(energy_log_density(model, scheduler, points, level, batch_size=5), expected)
    assert model.training is False and all(param.requires_grad for param in model.parameters())
    with pytest.raises(ValueError, match="noise_level"):
        energy_log_density(model, scheduler, points, 6)


# ---------------------------------------------------------------------------------------------------------------------
# Sample distances
# ---------------------------------------------------------------------------------------------------------------------
def test_mmd_closed_form_identity_and_sensitivity():
    # One point per set: MMD^2 = k(x, x) + k(y, y) - 2 k(x, y) = 2 - 2 exp(-d^2 / (2 h^2)).
    first, second = torch.tensor([[0.0, 0.0], [0.0, 0.0]]), torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    assert mmd_rbf(first, second, bandwidths=[5.0]) == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-9)
    data = checkerboard(1500, generator=generator(1), scale=4.0)
    held_out = checkerboard(1500, generator=generator(2), scale=4.0)
    assert mmd_rbf(data, data) == pytest.approx(0.0, abs=1e-12)
    noise = torch.randn(1500, 2, generator=generator(3)) * 4.0
    assert mmd_rbf(data, noise) > 20 * mmd_rbf(data, held_out)
    with pytest.raises(ValueError, match="bandwidths"):
        mmd_rbf(data, noise, bandwidths=[0.0])


def test_sliced_wasserstein_identity_and_translation():
    data = torch.randn(2000, 2, generator=generator(1))
    assert sliced_wasserstein_distance(data, data, generator=generator(2)) == pytest.approx(0.0, abs=1e-12)
    # Translating by v moves every 1-D projection by theta . v: SW_2 = sqrt(E (theta . v)^2) = |v| / sqrt(2) in 2-D.
    shift = torch.tensor([3.0, -4.0])
    distance = sliced_wasserstein_distance(data, data + shift, num_projections=1000, generator=generator(2))
    assert distance == pytest.approx(5.0 / math.sqrt(2), rel=0.03)
    # Different set sizes are fine.
    assert sliced_wasserstein_distance(data, data[:500] + shift, generator=generator(2)) > 3.0
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein_distance(data, torch.zeros(10, 3))
