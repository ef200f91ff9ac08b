"""The cooperative training step (Algorithm 1) against a hand computation, and the optimisation helpers."""

import math

import pytest
import torch
from conftest import TINY_SIZE, QuadraticEnergy, ShiftInitializer, tiny_energy_model, tiny_initializer

from cdrl_diffusers import (
    CDRLScheduler,
    EnergyMLP,
    InitializerMLP,
    cdrl_training_step,
    create_ema_model,
    decay_multiplier,
    drop_labels,
    warmup_multiplier,
)


def test_losses_match_a_hand_computation():
    """Every random draw replayed in float64 with the SPEC formulas, for a model with a known gradient."""
    energy, initializer = QuadraticEnergy(data_dim=3, curvature=4.0), ShiftInitializer(data_dim=3)
    scheduler = CDRLScheduler(num_langevin_steps=4)
    clean = torch.rand(5, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = cdrl_training_step(energy, initializer, scheduler, clean, generator=torch.Generator().manual_seed(0))

    replay = torch.Generator().manual_seed(0)
    t = torch.randint(0, 6, (5,), generator=replay)
    eps = torch.randn(5, 3, generator=replay).double()
    eps_proposal = torch.randn(5, 3, generator=replay).double()
    x0 = clean.double()
    b = math.atan(math.exp(-9.8 / 2))
    a = math.atan(math.exp(5.1 / 2)) - b
    lam = [-2 * math.log(math.tan(a * k / 6 + b)) for k in range(7)]
    alpha_bar = torch.tensor([math.sqrt(1 / (1 + math.exp(-v))) for v in lam], dtype=torch.float64)
    sigma_bar = torch.sqrt(1 - alpha_bar**2)
    alpha = alpha_bar[1:] / alpha_bar[:-1]
    sigma = torch.sqrt(1 - alpha**2)
    scale = torch.where(torch.arange(6) == 5, torch.ones(6, dtype=torch.float64), alpha)
    s2 = 4e-4 * sigma_bar[:-1] / sigma_bar[0] * sigma**2
    col = lambda v: v[t].unsqueeze(1)  # noqa: E731

    x_next = col(alpha_bar[1:]) * x0 + col(sigma_bar[1:]) * eps
    positive = col(scale) * (col(alpha_bar[:-1]) * x0 + col(sigma_bar[:-1]) * eps)
    shift = initializer.shifts[-1].detach().double()
    proposal = x_next + shift + col(scale * sigma_bar[:-1] / sigma_bar[1:] * sigma) * eps_proposal
    mean = energy.means[-1].detach().double()
    y = proposal.clone()
    for _ in range(4):
        grad_f_hat = -4.0 * (y - mean)
        recovery = torch.where(col(torch.arange(6)) == 5, 0.0, (y - x_next) / col(sigma**2))
        noise = torch.randn(5, 3, generator=replay).double()
        y = y + col(s2) / 2 * (grad_f_hat / col(s2) - recovery) + col(s2).sqrt() * noise
    f_hat = lambda v: -2.0 * (v - mean).pow(2).sum(1)  # noqa: E731
    weight = sigma[0] / sigma[t]
    expected_ebm = (weight * (f_hat(y) - f_hat(positive))).mean()
    expected_initializer = (y - proposal).pow(2).sum(1).mean()

    assert torch.equal(out.timesteps, t)
    assert out.ebm_loss.item() == pytest.approx(expected_ebm.item(), rel=1e-4, abs=1e-5)
    assert out.initializer_loss.item() == pytest.approx(expected_initializer.item(), rel=1e-4, abs=1e-6)
    assert out.level_counts.tolist() == torch.bincount(t, minlength=6).tolist()
    for level in range(6):
        metric = out.level_metrics["neg_energy_gap"][level]
        if (t == level).any():
            expected_gap = (f_hat(positive) - f_hat(y))[t == level].mean()
            assert metric.item() == pytest.approx(expected_gap.item(), rel=1e-4, abs=1e-5)
        else:
            assert math.isnan(metric)


def test_gradients_flow_only_where_they_should():
    energy, initializer = tiny_energy_model().train(), tiny_initializer().train()
    out = cdrl_training_step(energy, initializer, CDRLScheduler(num_langevin_steps=2), torch.rand(4, 3, 8, 8) * 2 - 1)
    # Langevin accumulated nothing: no parameter has a gradient before backward.
    assert all(p.grad is None for p in list(energy.parameters()) + list(initializer.parameters()))
    assert energy.training and initializer.training  # modes restored after the eval-mode Langevin
    assert all(p.requires_grad for p in energy.parameters())
    out.ebm_loss.backward()
    assert all(p.grad is None for p in initializer.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in energy.parameters())
    energy.zero_grad()
    out.initializer_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in energy.parameters())
    assert initializer.unet.conv_out.weight.grad.abs().sum() > 0


def test_same_generator_same_losses():
    energy, initializer = tiny_energy_model(), tiny_initializer()
    batch = torch.rand(4, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
    runs = [
        cdrl_training_step(
            energy, initializer, CDRLScheduler(num_langevin_steps=2), batch, generator=torch.Generator().manual_seed(3)
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0].ebm_loss, runs[1].ebm_loss)
    assert torch.equal(runs[0].initializer_loss, runs[1].initializer_loss)


def test_level_probabilities_set_how_often_each_pair_is_drawn():
    """Pairs follow the normalised weights, a pair of weight 0 is never drawn, and ``None`` is the uniform draw."""
    energy, initializer = QuadraticEnergy(data_dim=2, curvature=1.0), ShiftInitializer(data_dim=2)
    scheduler = CDRLScheduler(num_langevin_steps=1)
    clean = torch.zeros(6000, 2)
    weights = [3.0, 1.0, 1.0, 0.0, 1.0, 2.0]
    out = cdrl_training_step(
        energy, initializer, scheduler, clean, generator=torch.Generator().manual_seed(0), level_probabilities=weights
    )
    frequencies = out.level_counts.double() / 6000
    expected = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    # Binomial standard deviations are below 0.0055 for 6,000 draws: 4 of them.
    torch.testing.assert_close(frequencies, expected, atol=0.022, rtol=0)
    assert out.level_counts[3] == 0
    assert torch.isnan(out.level_metrics["ebm_loss"][3])

    uniform = cdrl_training_step(
        energy, initializer, scheduler, clean[:8], generator=torch.Generator().manual_seed(1)
    ).timesteps
    assert torch.equal(uniform, torch.randint(0, 6, (8,), generator=torch.Generator().manual_seed(1)))


def test_conditional_training_uses_labels_and_dropout():
    energy, initializer = tiny_energy_model(num_class_embeds=3), tiny_initializer(num_class_embeds=3)
    scheduler = CDRLScheduler(num_langevin_steps=2)
    batch, labels = torch.rand(4, 3, TINY_SIZE, TINY_SIZE) * 2 - 1, torch.tensor([0, 1, 2, 0])
    labelled = cdrl_training_step(energy, initializer, scheduler, batch, labels, torch.Generator().manual_seed(0), 0.0)
    all_dropped = cdrl_training_step(
        energy, initializer, scheduler, batch, labels, torch.Generator().manual_seed(0), 1.0
    )
    # Dropping every label trains the null class: the unconditional step after the same dropout draw.
    generator = torch.Generator().manual_seed(0)
    torch.rand(4, generator=generator)
    unconditional = cdrl_training_step(energy, initializer, scheduler, batch, None, generator)
    torch.testing.assert_close(all_dropped.ebm_loss, unconditional.ebm_loss)
    torch.testing.assert_close(all_dropped.initializer_loss, unconditional.initializer_loss)
    no_dropout_draw = cdrl_training_step(energy, initializer, scheduler, batch, None, torch.Generator().manual_seed(0))
    assert not torch.allclose(labelled.ebm_loss, no_dropout_draw.ebm_loss)


def test_conditional_ebm_with_unconditional_initializer():
    """Compositional training (Sec. 4.5): attribute classes go to the EBM only."""
    out = cdrl_training_step(
        tiny_energy_model(num_class_embeds=4),
        tiny_initializer(),
        CDRLScheduler(num_langevin_steps=2),
        torch.rand(3, 3, TINY_SIZE, TINY_SIZE) * 2 - 1,
        torch.tensor([0, 3, 1]),
    )
    assert torch.isfinite(out.ebm_loss) and torch.isfinite(out.initializer_loss)


def test_bad_training_inputs():
    energy, initializer, scheduler = tiny_energy_model(num_class_embeds=3), tiny_initializer(), CDRLScheduler()
    batch = torch.rand(2, 3, TINY_SIZE, TINY_SIZE)
    with pytest.raises(ValueError, match="class_labels"):
        cdrl_training_step(energy, initializer, scheduler, batch, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        cdrl_training_step(tiny_energy_model(), initializer, scheduler, batch, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="clean_samples"):
        cdrl_training_step(energy, initializer, scheduler, batch.long())
    with pytest.raises(ValueError, match="non-empty"):
        cdrl_training_step(energy, initializer, scheduler, batch[:0])


def tiny_vector_problem():
    torch.manual_seed(0)
    energy = EnergyMLP(data_dim=2, hidden_dim=32, num_layers=2, embedding_dim=16)
    with torch.no_grad():
        for layer in energy.layers:
            layer.residual_scale.fill_(0.5)
    initializer = InitializerMLP(data_dim=2, hidden_dim=32, num_layers=2)
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(5)) * 0.1 + 0.5
    return energy, initializer, CDRLScheduler(num_langevin_steps=3), data


def test_a_few_ebm_steps_lower_the_recovery_likelihood_loss():
    energy, initializer, scheduler, data = tiny_vector_problem()
    optimizer = torch.optim.Adam(energy.parameters(), 3e-3)
    losses = []
    for _ in range(6):
        out = cdrl_training_step(energy, initializer, scheduler, data, generator=torch.Generator().manual_seed(0))
        losses.append(out.ebm_loss.item())
        optimizer.zero_grad()
        out.ebm_loss.backward()
        optimizer.step()
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert losses[-1] < 0 < losses[0]  # the EBM now prefers the data to its own samples


def test_a_few_initializer_steps_move_proposals_towards_refined_samples():
    energy, initializer, scheduler, data = tiny_vector_problem()

    def held_out_loss():  # averaged over fixed seeds: the Langevin noise in y_tilde - y_hat is irreducible
        with torch.no_grad():
            return sum(
                cdrl_training_step(
                    energy, initializer, scheduler, data, generator=torch.Generator().manual_seed(100 + k)
                ).initializer_loss.item()
                for k in range(8)
            )

    before = held_out_loss()
    optimizer = torch.optim.Adam(initializer.parameters(), 1e-2)
    for seed in range(30):
        out = cdrl_training_step(energy, initializer, scheduler, data, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        out.initializer_loss.backward()
        optimizer.step()
    assert held_out_loss() < 0.95 * before


def test_warmup_is_eq_15():
    assert warmup_multiplier(0) == 0.0
    assert warmup_multiplier(5_000) == 0.5
    assert warmup_multiplier(20_000) == 1.0
    assert warmup_multiplier(0, head_start=500) == 0.05
    assert warmup_multiplier(9_500, head_start=500) == 1.0
    assert warmup_multiplier(7, warmup_steps=0) == 1.0


def test_decay_multiplier_formulas_and_errors():
    assert [decay_multiplier(progress, "constant") for progress in (0, 1, 2)] == [1.0, 1.0, 1.0]
    assert [decay_multiplier(progress, "linear") for progress in (-1, 0, 0.25, 1, 2)] == [1.0, 1.0, 0.75, 0.0, 0.0]
    cosine = [decay_multiplier(step / 8, "cosine") for step in range(9)]
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * step / 8)) for step in range(9)], abs=1e-15)
    assert cosine[4] == pytest.approx(0.5) and all(a > b for a, b in zip(cosine, cosine[1:]))
    assert decay_multiplier(1.0, "cosine", final_fraction=0.1) == pytest.approx(0.1)
    assert decay_multiplier(0.5, "linear", final_fraction=0.2) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="`decay` must be one of"):
        decay_multiplier(0.5, "exponential")
    with pytest.raises(ValueError, match="`final_fraction` must be in"):
        decay_multiplier(0.5, "cosine", final_fraction=1.5)


def test_ema_decay_warmup():
    model = InitializerMLP(data_dim=2, hidden_dim=8, num_layers=1)
    ema = create_ema_model(model)
    # diffusers counts updates from 1 and copies the weights at the first one; from the second update on, the n-th
    # (0-based) update uses min(0.9999, (1 + n) / (10 + n)).
    assert ema.get_decay(1) == 0.0
    for n in (1, 10, 100, 10_000, 1_000_000):
        assert ema.get_decay(n + 1) == pytest.approx(min(0.9999, (1 + n) / (10 + n)))
    assert ema.model_cls is InitializerMLP


def test_drop_labels():
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = drop_labels(labels, null_label=7, probability=0.1, generator=torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 7}
    assert (dropped == 7).float().mean().item() == pytest.approx(0.1, abs=0.01)
    assert torch.equal(drop_labels(labels, 7, 0.0), labels)
    with pytest.raises(ValueError, match="probability"):
        drop_labels(labels, 7, 1.5)
