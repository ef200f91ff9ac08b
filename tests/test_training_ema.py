"""cdrl_diffusers.training.ema: EMA copies whose spectral normalisation matches the averaged weights."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_energy_model, tiny_initializer
from torch.nn.utils import parametrize

from cdrl_diffusers import CDRLPipeline, CDRLScheduler, EnergyMLP
from cdrl_diffusers.training import create_ema_model, ema_copy, ema_pipeline, refresh_spectral_norm


def normalised_spectral_norms(model: torch.nn.Module) -> list[float]:
    """The largest singular value of each spectrally normalised weight as used (1 when u, v fit the weight)."""
    model.eval()
    with torch.no_grad():
        return [
            torch.linalg.matrix_norm(module.weight.flatten(1), ord=2).item()
            for module in model.modules()
            if parametrize.is_parametrized(module, "weight")
        ]


def trained_with_ema(model: torch.nn.Module):
    """``model`` after some "training" that moved its weights far from where its EMA (taken at the start) is."""
    ema = create_ema_model(model, decay=0.9)
    refresh_spectral_norm(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0).add_(torch.randn_like(parameter))
    refresh_spectral_norm(model)  # the training model's u, v follow its own weights
    return ema


@pytest.mark.parametrize("make_model", [tiny_energy_model, lambda: EnergyMLP(data_dim=2, hidden_dim=16, num_layers=2)])
def test_ema_copy_holds_the_average_and_refreshes_spectral_norm(make_model):
    torch.manual_seed(0)
    model = make_model()
    ema = trained_with_ema(model)
    before = {key: value.clone() for key, value in model.state_dict().items()}

    copy = ema_copy(model, ema)
    assert not copy.training and copy is not model
    assert all(torch.equal(p, q) for p, q in zip(copy.parameters(), ema.shadow_params))
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())  # untouched
    norms = normalised_spectral_norms(copy)
    assert len(norms) > 0 and norms == pytest.approx([1.0] * len(norms), rel=0.02)

    stale = type(model).from_config(model.config)  # the EMA weights with the training model's u, v
    stale.load_state_dict(model.state_dict())
    ema.copy_to(stale.parameters())
    assert max(abs(norm - 1.0) for norm in normalised_spectral_norms(stale)) > 0.5


def test_refresh_spectral_norm_keeps_the_training_mode_and_models_without_it():
    model = tiny_energy_model().train()
    refresh_spectral_norm(model, iterations=2)
    assert model.training
    initializer = tiny_initializer()
    state = {key: value.clone() for key, value in initializer.state_dict().items()}
    refresh_spectral_norm(initializer)
    assert all(torch.equal(value, initializer.state_dict()[key]) for key, value in state.items())


def test_ema_pipeline_samples_with_the_averaged_networks():
    energy_model, initializer = tiny_energy_model(), tiny_initializer()
    emas = [create_ema_model(energy_model), create_ema_model(initializer)]
    pipeline = ema_pipeline(energy_model, initializer, *emas, CDRLScheduler(num_noise_levels=2, num_langevin_steps=1))
    assert isinstance(pipeline, CDRLPipeline)
    assert pipeline.energy_model is not energy_model and not pipeline.energy_model.training
    images = pipeline(batch_size=2, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and torch.isfinite(images).all()
