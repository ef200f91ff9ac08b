"""Algorithm 2 (sampling.py) on models with known gradients: every step is checked against Eq. 5, 6 and 18."""

import torch
from conftest import QuadraticEnergy, ShiftInitializer

from cdrl_diffusers import CDRLScheduler, ConditionWeights
from cdrl_diffusers.sampling import CDRLSampler, frozen, langevin_refine

CURVATURE = 2.0


def models(num_class_embeds=None):
    energy = QuadraticEnergy(data_dim=4, curvature=CURVATURE, num_class_embeds=num_class_embeds)
    return energy, ShiftInitializer(data_dim=4, num_class_embeds=num_class_embeds)


def terms(batch=3):
    return ConditionWeights.unconditional().stack(None, batch, torch.device("cpu"))


def by_hand(scheduler, energy, y, noisier, timestep, noises, num_langevin_steps=None):
    """Eq. 5 written out: y + (r/2) grad f_hat - (r s^2 / 2 sigma^2) (y - x_{t+1}) + sqrt(r) s eps, f_hat quadratic."""
    ratio = scheduler.langevin_scale(num_langevin_steps)
    step_size_squared = ratio * scheduler.langevin_step_size[timestep] ** 2
    for noise in noises:
        grad = -CURVATURE * (y - energy.means[-1].detach())
        recovery = step_size_squared * scheduler.recovery_precision[timestep] / 2 * (y - noisier)
        y = y + ratio / 2 * grad - recovery + step_size_squared.sqrt() * noise
    return y


def chain_inputs(num_steps):
    """A scheduler, an EBM, a start y and x_{t+1}, and the first ``num_steps`` Langevin noises of seed 0."""
    scheduler = CDRLScheduler(num_noise_levels=3, num_langevin_steps=4)
    energy, _ = models()
    y, noisier = torch.randn(3, 4), torch.randn(3, 4)
    generator = torch.Generator().manual_seed(0)
    return scheduler, energy, y, noisier, [torch.randn(3, 4, generator=generator) for _ in range(num_steps)]


def test_langevin_refine_is_k_steps_of_equation_5():
    scheduler, energy, y, noisier, noises = chain_inputs(2)
    with frozen(energy):
        got = langevin_refine(energy, scheduler, y, noisier, 1, terms(), 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, by_hand(scheduler, energy, y, noisier, 1, noises, 2))
    assert langevin_refine(energy, scheduler, y, noisier, 1, terms(), 0) is y  # K' = 0: the proposal itself


def test_langevin_refine_returns_the_noise_it_injected():
    scheduler, energy, y, noisier, noises = chain_inputs(3)
    with frozen(energy):
        got, injected = langevin_refine(
            energy,
            scheduler,
            y,
            noisier,
            2,
            terms(),
            num_langevin_steps=3,
            generator=torch.Generator().manual_seed(0),
            return_injected_noise=True,
        )
    torch.testing.assert_close(got, by_hand(scheduler, energy, y, noisier, 2, noises, 3))
    step_size = (scheduler.langevin_scale(3) * scheduler.langevin_step_size[2] ** 2).sqrt()
    torch.testing.assert_close(injected, step_size * sum(noises))
    with frozen(energy):
        _, none_injected = langevin_refine(energy, scheduler, y, noisier, 2, terms(), 0, return_injected_noise=True)
    assert torch.equal(none_injected, torch.zeros_like(y))


def test_projection_runs_after_every_step():
    scheduler = CDRLScheduler(num_noise_levels=3, num_langevin_steps=3)
    energy, _ = models()
    seen = []

    def project(sample, timestep):
        seen.append(timestep)
        return sample.clamp(-0.1, 0.1)

    with frozen(energy):
        out = langevin_refine(energy, scheduler, torch.randn(3, 4), torch.randn(3, 4), 2, terms(), project=project)
    assert seen == [2, 2, 2] and out.abs().max() <= 0.1


def test_one_level_proposes_by_equation_6_then_refines():
    scheduler = CDRLScheduler(num_noise_levels=3, num_langevin_steps=2)
    energy, initializer = models()
    noisier = torch.randn(3, 4)
    sampler = CDRLSampler(energy, initializer, scheduler, terms(), terms(), generator=torch.Generator().manual_seed(1))
    with frozen(energy, initializer):
        level = sampler.level(noisier, 1)
    generator = torch.Generator().manual_seed(1)
    proposal = (
        noisier
        + initializer.shifts[-1].detach()
        + scheduler.initializer_std[1] * torch.randn(3, 4, generator=generator)
    )
    noises = [torch.randn(3, 4, generator=generator) for _ in range(2)]
    expected = by_hand(scheduler, energy, proposal, noisier, 1, noises) / scheduler.input_scale[1]
    torch.testing.assert_close(level.sample, expected)
    assert level.timestep == 1


def test_langevin_alone_starts_at_the_noisier_sample():
    scheduler = CDRLScheduler(num_noise_levels=3, num_langevin_steps=2)
    energy, initializer = models()
    noisier = torch.randn(3, 4)
    sampler = CDRLSampler(energy, initializer, scheduler, terms(), terms(), use_initializer=False)
    assert torch.equal(sampler.propose(noisier, 0), noisier)


def test_run_ends_with_the_tweedie_step_of_equation_18():
    scheduler = CDRLScheduler(num_noise_levels=2, num_langevin_steps=1, clip_sample=False)
    energy, initializer = models()
    sampler = CDRLSampler(energy, initializer, scheduler, terms(), terms(), num_langevin_steps=0)
    levels = []
    out = sampler.run(torch.randn(3, 4), callback=lambda index, level: levels.append(level.sample) or None)
    x0 = levels[-1]
    grad = -CURVATURE * (scheduler.input_scale[0] * x0 - energy.means[-1].detach())
    score = scheduler.input_scale[0] * grad / scheduler.langevin_step_size[0] ** 2
    expected = (x0 + 2.0 * scheduler.sigma_bar[0] ** 2 * score) / scheduler.alpha_bar[0]
    torch.testing.assert_close(out, expected)
    assert len(levels) == 2
