"""The initializer's regression target of the training step: the refined sample (Eq. 8) or the data (App. G.2)."""

from __future__ import annotations

import pytest
import torch
from conftest import QuadraticEnergy, ShiftInitializer

from cdrl_diffusers import CDRLScheduler, cdrl_training_step


def step(initializer_target: str, langevin_noise_control: bool = False, **frozen):
    energy, initializer = QuadraticEnergy(data_dim=3, curvature=4.0), ShiftInitializer(data_dim=3)
    scheduler = CDRLScheduler(num_langevin_steps=2)
    clean = torch.rand(6, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    output = cdrl_training_step(
        energy,
        initializer,
        scheduler,
        clean,
        generator=generator,
        initializer_target=initializer_target,
        langevin_noise_control=langevin_noise_control,
        **frozen,
    )
    return output, initializer, scheduler, clean


def replay_chains(scheduler, initializer, clean, start_shifts=None):
    """The step's draws replayed by hand: y_t^+, the proposal (its first rows moved by ``start_shifts``), and K = 2
    Langevin steps of Eq. 5 on f_hat = -2 ||y - m||^2. Returns (positive, proposal, refined, injected noise)."""
    replay = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, scheduler.num_noise_levels, (6,), generator=replay)
    positive, noisier = scheduler.training_pair(clean, timesteps, torch.randn(6, 3, generator=replay))
    mean = initializer(noisier, scheduler.initializer_logsnr(timesteps)).sample.detach()
    proposal = scheduler.initializer_proposal(mean, timesteps, torch.randn(6, 3, generator=replay))
    start = proposal.clone()
    if start_shifts is not None:
        start[: len(start_shifts)] += start_shifts
    step_size_squared = (scheduler.langevin_step_size[timesteps] ** 2)[:, None]
    recovery = (step_size_squared * scheduler.recovery_precision[timesteps][:, None] / 2).float()
    y, noise_sum = start, torch.zeros_like(start)
    for _ in range(2):
        noise = step_size_squared.sqrt() * torch.randn(6, 3, generator=replay)
        grad = -4.0 * (y - torch.tensor([0.0, 0.1, 0.2]))  # the mean of the null class: arange(3) / 10
        y = y + 0.5 * grad - recovery * (y - noisier) + noise
        noise_sum = noise_sum + noise
    return timesteps, positive, proposal, y, noise_sum


def test_data_target_regresses_the_initializer_on_the_noisy_data():
    data, initializer, scheduler, clean = step("data")
    refined, _, _, _ = step("refined")
    assert torch.equal(data.ebm_loss, refined.ebm_loss)  # same draws, same EBM loss
    assert data.initializer_loss != refined.initializer_loss

    # y_t^+ and the proposal y_hat_t from the same draws (Eq. 9 and Eq. 6): the loss is their squared distance.
    replay = torch.Generator().manual_seed(0)
    timesteps = torch.randint(0, scheduler.num_noise_levels, (6,), generator=replay)
    positive, noisier = scheduler.training_pair(clean, timesteps, torch.randn(6, 3, generator=replay))
    mean = initializer(noisier, scheduler.initializer_logsnr(timesteps)).sample
    proposal = scheduler.initializer_proposal(mean, timesteps, torch.randn(6, 3, generator=replay))
    expected = (positive - proposal).pow(2).sum(1).mean()
    assert data.initializer_loss.item() == pytest.approx(expected.item(), rel=1e-5)

    data.initializer_loss.backward()
    assert initializer.shifts.grad is not None and initializer.shifts.grad.abs().sum() > 0


def test_langevin_noise_control_removes_the_chains_noise_from_the_refined_target():
    controlled, initializer, scheduler, clean = step("refined", langevin_noise_control=True)
    plain, _, _, _ = step("refined")
    assert torch.equal(controlled.ebm_loss, plain.ebm_loss)  # the negatives keep their noise

    _, _, proposal, y, noise_sum = replay_chains(scheduler, initializer, clean)
    displacement = y - proposal
    assert plain.initializer_loss.item() == pytest.approx(displacement.pow(2).sum(1).mean().item(), rel=1e-4)
    expected = (displacement - noise_sum).pow(2).sum(1).mean()
    assert controlled.initializer_loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_unknown_initializer_target_is_refused():
    with pytest.raises(ValueError, match="initializer_target"):
        step("noise")


def test_frozen_initializer_starts_the_first_share_of_the_chains():
    frozen = ShiftInitializer(data_dim=3)
    with torch.no_grad():
        frozen.shifts += 0.5  # proposes 0.5 further in every coordinate
    output, initializer, scheduler, clean = step("data", frozen_initializer=frozen, frozen_initializer_share=0.5)
    plain, _, _, _ = step("data")
    assert torch.equal(output.initializer_loss, plain.initializer_loss)  # the live initializer's proposals

    # The first 3 of the 6 chains start 0.5 further; the EBM loss on the refined samples, written out.
    timesteps, positive, _, refined, _ = replay_chains(scheduler, initializer, clean, torch.full((3, 3), 0.5))

    def neg_energy(y):
        return -2.0 * (y - torch.tensor([0.0, 0.1, 0.2])).pow(2).sum(1)

    # Eq. 7 for the live chains; logistic terms w_t softplus(f_hat(y_tilde) - f_hat(y^+)) for the frozen ones.
    difference = neg_energy(refined) - neg_energy(positive)
    difference[:3] = torch.log1p(torch.exp(difference[:3]))
    expected = (scheduler.loss_weight[timesteps] * difference).mean()
    assert output.ebm_loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert output.ebm_loss != plain.ebm_loss

    output.ebm_loss.backward()
    output.initializer_loss.backward()
    assert frozen.shifts.grad is None  # frozen: no gradient reaches it


def test_frozen_initializer_with_share_zero_changes_nothing():
    frozen = ShiftInitializer(data_dim=3)
    with torch.no_grad():
        frozen.shifts += 0.5
    output, _, _, _ = step("data", frozen_initializer=frozen, frozen_initializer_share=0.0)
    plain, _, _, _ = step("data")
    assert torch.equal(output.ebm_loss, plain.ebm_loss)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"initializer_target": "refined"}, ValueError, "initializer_target='data'"),
        ({"initializer_target": "data", "frozen_initializer_share": 1.5}, ValueError, "frozen_initializer_share"),
    ],
)
def test_frozen_initializer_bad_arguments(kwargs, error, match):
    kwargs.setdefault("frozen_initializer_share", 0.5)
    with pytest.raises(error, match=match):
        step(kwargs.pop("initializer_target"), frozen_initializer=ShiftInitializer(data_dim=3), **kwargs)
