"""The schedule and per-level formulas against SPEC.md, recomputed independently in float64."""

import math

import numpy as np
import pytest
import torch

from cdrl_diffusers import CDRLScheduler

# SPEC §2, §4, §5, §6 reference values for T = 6.
REFERENCE = {
    "logsnr": [9.8, 2.688820, 1.196880, 0.141071, -0.876073, -2.172388, -5.1],
    "alpha_bar": [0.999972, 0.967659, 0.876339, 0.731580, 0.542210, 0.319777, 0.077845],
    "sigma_bar": [0.0074464, 0.252262, 0.481696, 0.681756, 0.840243, 0.947493, 0.996965],
    "sigma": [0.252159, 0.424074, 0.550532, 0.671340, 0.807574, 0.969917],
    "initializer_std": [0.0072030, 0.201127, 0.324725, 0.403713, 0.422368, 0.921787],
    "loss_weight": [1, 0.594612, 0.458029, 0.375606, 0.312243, 0.259980],
}
REFERENCE_STEP_SIZE_SQUARED = [2.54337e-5, 2.43697e-3, 7.84246e-3, 1.65055e-2, 2.94364e-2, 4.78807e-2]


def independent_schedule(num_levels=6, logsnr_max=9.8, logsnr_min=-5.1, c=4e-4, rule="image"):
    """Straight from the SPEC formulas, with numpy in float64."""
    b = np.arctan(np.exp(-logsnr_max / 2))
    a = np.arctan(np.exp(-logsnr_min / 2)) - b
    logsnr = np.array([-2 * np.log(np.tan(a * k / num_levels + b)) for k in range(num_levels + 1)])
    alpha_bar = np.sqrt(1 / (1 + np.exp(-logsnr)))
    sigma_bar = np.sqrt(1 / (1 + np.exp(logsnr)))
    alpha = alpha_bar[1:] / alpha_bar[:-1]
    sigma = np.sqrt(1 - alpha**2)
    input_scale = np.where(np.arange(num_levels) == num_levels - 1, 1.0, alpha)
    if rule == "image":
        step_size_squared = c * sigma_bar[:-1] / sigma_bar[0] * sigma**2
    else:
        step_size_squared = c / sigma_bar[0] * sigma**2
    return {
        "logsnr": logsnr,
        "alpha_bar": alpha_bar,
        "sigma_bar": sigma_bar,
        "alpha": alpha,
        "sigma": sigma,
        "input_scale": input_scale,
        "langevin_step_size": np.sqrt(step_size_squared),
        "initializer_std": input_scale * sigma_bar[:-1] / sigma_bar[1:] * sigma,
        "loss_weight": sigma[0] / sigma,
    }


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_schedule_matches_spec_reference_values(scheduler, name):
    np.testing.assert_allclose(getattr(scheduler, name).numpy(), REFERENCE[name], atol=1e-5)


def test_step_sizes_match_spec_reference_values(scheduler):
    np.testing.assert_allclose((scheduler.langevin_step_size**2).numpy(), REFERENCE_STEP_SIZE_SQUARED, rtol=1e-4)
    # The paper rounds the constant c / sigma_bar_0 to 0.054 (Eq. 16).
    assert math.isclose(4e-4 / scheduler.sigma_bar[0].item(), 0.0537, rel_tol=1e-3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"num_noise_levels": 4},
        {"num_noise_levels": 10, "logsnr_max": 8.0, "logsnr_min": -6.0},
        {"langevin_step_size_rule": "toy", "langevin_step_size_scale": 2e-3},
    ],
)
def test_schedule_matches_independent_computation(kwargs):
    scheduler = CDRLScheduler(**kwargs)
    expected = independent_schedule(
        num_levels=kwargs.get("num_noise_levels", 6),
        logsnr_max=kwargs.get("logsnr_max", 9.8),
        logsnr_min=kwargs.get("logsnr_min", -5.1),
        c=kwargs.get("langevin_step_size_scale", 4e-4),
        rule=kwargs.get("langevin_step_size_rule", "image"),
    )
    for name, values in expected.items():
        np.testing.assert_allclose(getattr(scheduler, name).numpy(), values, atol=1e-5, rtol=1e-5, err_msg=name)
    assert scheduler.timesteps.tolist() == list(range(scheduler.num_noise_levels - 1, -1, -1))


def test_toy_step_size_rule_has_no_sigma_bar_factor():
    scheduler = CDRLScheduler(langevin_step_size_rule="toy", langevin_step_size_scale=2e-3)
    ratio = scheduler.langevin_step_size**2 / scheduler.sigma**2
    np.testing.assert_allclose(ratio.numpy(), 2e-3 / scheduler.sigma_bar[0].item(), rtol=1e-5)
    assert math.isclose(ratio[0].item(), 0.27, rel_tol=0.02)


def test_one_step_size_constant_per_pair(tmp_path):
    """A list of c gives pair t the step of the scalar rule with c_t; it survives save/load."""
    scales = [6e-3, 2e-3, 2e-3, 2e-3, 2e-3, 2e-3]
    scheduler = CDRLScheduler(langevin_step_size_rule="toy", langevin_step_size_scale=scales)
    for t, c in enumerate(scales):
        single = CDRLScheduler(langevin_step_size_rule="toy", langevin_step_size_scale=c)
        assert math.isclose(scheduler.langevin_step_size[t].item(), single.langevin_step_size[t].item(), rel_tol=1e-6)
    ratio = scheduler.langevin_step_size[0].item() ** 2 / scheduler.sigma[0].item() ** 2
    assert math.isclose(ratio, 0.81, rel_tol=0.02)
    scheduler.save_pretrained(tmp_path)
    loaded = CDRLScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.langevin_step_size, scheduler.langevin_step_size)


def test_drl_schedule_levels():
    scheduler = CDRLScheduler(schedule="drl")
    betas = np.linspace(1e-4, 0.02, 1000)
    cumulative = np.cumprod(1 - betas)[[0, 100, 200, 300, 400, 500, 999]]
    np.testing.assert_allclose(scheduler.alpha_bar.numpy(), np.sqrt(cumulative), atol=1e-6)
    np.testing.assert_allclose(scheduler.logsnr.numpy(), np.log(cumulative / (1 - cumulative)), rtol=1e-5)


def test_config_round_trip(tmp_path):
    scheduler = CDRLScheduler(num_noise_levels=5, num_langevin_steps=8, langevin_step_size_rule="toy")
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = CDRLScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }
    for name in ("logsnr", "langevin_step_size", "initializer_std", "loss_weight"):
        assert torch.equal(getattr(loaded, name), getattr(scheduler, name))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_noise_levels": 0}, "num_noise_levels"),
        ({"logsnr_max": -6.0}, "logsnr_max"),
        ({"num_langevin_steps": 0}, "num_langevin_steps"),
        ({"schedule": "linear"}, "schedule"),
        ({"langevin_step_size_rule": "big"}, "langevin_step_size_rule"),
        ({"langevin_step_size_scale": -1.0}, "langevin_step_size_scale"),
        ({"langevin_step_size_scale": [2e-3] * 5}, "one per pair"),
        ({"langevin_step_size_scale": [2e-3] * 5 + [0.0]}, "langevin_step_size_scale"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CDRLScheduler(**kwargs)


def test_training_pair_shares_one_noise(scheduler):
    """Eq. 9: x_{t+1} and y_t are both interpolations of the same x_0 and eps."""
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(6, 3, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=generator)
    timesteps = torch.arange(6)
    positive, noisier = scheduler.training_pair(clean, timesteps, noise)
    ref = independent_schedule()
    for i, t in enumerate(timesteps.tolist()):
        expected_noisier = ref["alpha_bar"][t + 1] * clean[i] + ref["sigma_bar"][t + 1] * noise[i]
        expected_positive = ref["input_scale"][t] * (ref["alpha_bar"][t] * clean[i] + ref["sigma_bar"][t] * noise[i])
        torch.testing.assert_close(noisier[i], expected_noisier.float(), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(positive[i], expected_positive.float(), atol=1e-6, rtol=1e-5)
    # An int timestep applies to the whole batch.
    positive_2, noisier_2 = scheduler.training_pair(clean, 2, noise)
    torch.testing.assert_close(positive_2[2], positive[2])
    torch.testing.assert_close(noisier_2[2], noisier[2])


def test_add_noise_and_chain_space(scheduler):
    clean, noise = torch.ones(2, 3), torch.full((2, 3), 2.0)
    level = 6
    expected = scheduler.alpha_bar[level] * clean + scheduler.sigma_bar[level] * noise
    torch.testing.assert_close(scheduler.add_noise(clean, noise, level), expected)
    y = scheduler.to_chain_space(clean, 1)
    torch.testing.assert_close(y, clean * scheduler.alpha[1])
    torch.testing.assert_close(scheduler.from_chain_space(y, 1), clean)
    # The marginal last pair has input scale 1 (SPEC §3).
    torch.testing.assert_close(scheduler.to_chain_space(clean, 5), clean)


def test_initializer_proposal(scheduler):
    mean, noise = torch.zeros(3, 2), torch.ones(3, 2)
    proposal = scheduler.initializer_proposal(mean, torch.tensor([0, 3, 5]), noise)
    torch.testing.assert_close(
        proposal[:, 0], torch.tensor(REFERENCE["initializer_std"])[[0, 3, 5]], atol=1e-5, rtol=0
    )


def langevin_step(scheduler, sample, grad, noisier, timestep, noise, num_langevin_steps=None):
    """One step of Eq. 5 as the sampler and the training step take it: the level's constants, then the update."""
    return scheduler.langevin_coefficients(timestep, sample, num_langevin_steps).step(sample, grad, noisier, noise)


@pytest.mark.parametrize("num_langevin_steps", [None, 15, 5, 30])
@pytest.mark.parametrize("timestep", [0, 3])
def test_langevin_step_is_equation_5(scheduler, timestep, num_langevin_steps):
    """y + (s'^2 / 2) (grad f - (y - x) / sigma^2) + s' eps with f = f_hat / s^2 and s'^2 = (K / K') s^2."""
    generator = torch.Generator().manual_seed(timestep)
    y, x_next, grad_f_hat, noise = (torch.randn(4, 5, generator=generator, dtype=torch.float64) for _ in range(4))
    ref = independent_schedule()
    s2 = ref["langevin_step_size"][timestep] ** 2 * 15 / (num_langevin_steps or 15)
    sigma2 = ref["sigma"][timestep] ** 2
    grad_f = grad_f_hat / ref["langevin_step_size"][timestep] ** 2
    expected = y + s2 / 2 * (grad_f - (y - x_next) / sigma2) + math.sqrt(s2) * noise
    got = langevin_step(
        scheduler, y.float(), grad_f_hat.float(), x_next.float(), timestep, noise.float(), num_langevin_steps
    )
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


def test_marginal_last_pair_has_no_recovery_term(scheduler):
    y, grad = torch.zeros(2, 3), torch.zeros(2, 3)
    far_away = torch.full((2, 3), 100.0)
    got = langevin_step(scheduler, y, grad, far_away, 5, torch.zeros(2, 3))
    assert torch.equal(got, y)  # the distant x_{t+1} does not pull the marginal chain
    pulled = langevin_step(scheduler, y, grad, far_away, 4, torch.zeros(2, 3))
    assert (pulled > 0).all()
    assert scheduler.recovery_precision[-1] == 0


def test_langevin_step_per_example_timesteps(scheduler):
    generator = torch.Generator().manual_seed(0)
    y, x_next, grad, noise = (torch.randn(6, 2, 3, generator=generator) for _ in range(4))
    timesteps = torch.tensor([5, 0, 1, 2, 3, 4])
    batched = langevin_step(scheduler, y, grad, x_next, timesteps, noise, 7)
    for i, t in enumerate(timesteps.tolist()):
        single = langevin_step(scheduler, y[i : i + 1], grad[i : i + 1], x_next[i : i + 1], t, noise[i : i + 1], 7)
        torch.testing.assert_close(batched[i : i + 1], single)


def test_tweedie_step_is_equation_18(scheduler):
    x0 = torch.tensor([[0.5, -0.2, 0.9]])
    grad_f_hat = torch.tensor([[1e-6, -2e-6, 3e-6]])
    ref = independent_schedule()
    score = ref["input_scale"][0] * grad_f_hat.double() / ref["langevin_step_size"][0] ** 2
    expected = ((x0.double() + 2.0 * ref["sigma_bar"][0] ** 2 * score) / ref["alpha_bar"][0]).clamp(-1, 1)
    torch.testing.assert_close(scheduler.tweedie_denoise(x0, grad_f_hat).double(), expected, atol=1e-6, rtol=1e-5)
    unclipped = CDRLScheduler(clip_sample=False).tweedie_denoise(torch.tensor([[3.0]]), torch.zeros(1, 1))
    assert unclipped.item() > 2.9


def test_log_density_divides_by_step_size_squared(scheduler):
    neg_energy = torch.tensor([1.0, 2.0])
    expected = neg_energy / torch.tensor(REFERENCE_STEP_SIZE_SQUARED[2])
    torch.testing.assert_close(scheduler.log_density(neg_energy, 2), expected, rtol=1e-4, atol=0)


def test_sampling_adjustment_ratio(scheduler):
    assert scheduler.langevin_scale(None) == 1.0
    assert scheduler.langevin_scale(5) == 3.0
    assert scheduler.langevin_scale(30) == 0.5
