"""The naive baselines the performance benchmarks compare against (not part of the library).

``naive_sample`` is Algorithm 2 and ``naive_training_step`` is Algorithm 1 as a careful researcher would first write
them from the paper: the parameters are left requiring gradients (``torch.autograd.grad`` is taken with respect to
the chain state only), the conditional and unconditional energies of guidance are two separate forward passes,
everything is eager float32, the spectral-norm weights and the conditioning are recomputed at every forward pass,
and the EBM's residual blocks are the textbook ones (``textbook_blocks``: the residual scale multiplies the
activations). They read the schedule constants from the ``CDRLScheduler`` and consume the generator in the library's
order, so with the same seed they must reproduce the library's samples and losses up to floating-point rounding: the
benchmarks and tests/test_performance.py check that the optimised paths never silently change results.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from cdrl_diffusers import CDRLScheduler
from cdrl_diffusers.models.energy_model import EnergyResBlock


@contextmanager
def textbook_blocks() -> Iterator[None]:
    """``EnergyResBlock`` as first written (Table 5a): conv, + embedding, conv, x scale on the activations, + shortcut.

    The library applies the residual scale to the second convolution's weights instead (the same function).
    """
    library_forward = EnergyResBlock.forward

    def forward(self: EnergyResBlock, hidden: torch.Tensor, embedding_bias: torch.Tensor) -> torch.Tensor:
        residual = self.conv1(self.act(hidden)) + embedding_bias[:, :, None, None]
        residual = self.conv2(self.act(residual)) * self.residual_scale[None, :, None, None]
        return self.shortcut(hidden) + residual

    EnergyResBlock.forward = forward
    try:
        yield
    finally:
        EnergyResBlock.forward = library_forward


def _guided(model: nn.Module, sample: torch.Tensor, logsnr: float, class_labels, guidance_scale: float, field: str):
    """(1 + w) model(x; c) - w model(x) for a conditional model (Eq. 11-12), model(x) otherwise: two passes."""
    if class_labels is None:
        return getattr(model(sample, logsnr), field)
    conditional = getattr(model(sample, logsnr, class_labels=class_labels), field)
    if guidance_scale == 0:
        return conditional
    unconditional = getattr(model(sample, logsnr), field)
    return (1 + guidance_scale) * conditional - guidance_scale * unconditional


def _neg_energy_grad(energy_model: nn.Module, y: torch.Tensor, logsnr: float, class_labels, guidance_scale: float):
    y = y.detach().requires_grad_(True)
    neg_energy = _guided(energy_model, y, logsnr, class_labels, guidance_scale, "neg_energy")
    (grad,) = torch.autograd.grad(neg_energy.sum(), y)
    return grad


def naive_sample(
    energy_model: nn.Module,
    initializer: nn.Module,
    scheduler: CDRLScheduler,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 0.0,
    num_langevin_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Algorithm 2 and the Tweedie step (Eq. 5, 6, 18), written out; returns x_0 in [-1, 1]."""
    with textbook_blocks():
        return _naive_sample(
            energy_model, initializer, scheduler, latents, class_labels, guidance_scale, num_langevin_steps, generator
        )


def _naive_sample(
    energy_model: nn.Module,
    initializer: nn.Module,
    scheduler: CDRLScheduler,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None,
    guidance_scale: float,
    num_langevin_steps: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    energy_model.eval()
    initializer.eval()
    num_levels = scheduler.config.num_noise_levels
    trained_steps = scheduler.config.num_langevin_steps
    steps = trained_steps if num_langevin_steps is None else num_langevin_steps
    ratio = trained_steps / steps
    conditional_initializer = initializer.config.num_class_embeds is not None
    x = latents.float()
    for t in reversed(range(num_levels)):
        marginal = t == num_levels - 1
        scale = 1.0 if marginal else scheduler.alpha[t].item()
        # Proposal (Eq. 6): a guided mean for a conditional initializer, the unconditional mean otherwise.
        with torch.no_grad():
            init_labels = class_labels if conditional_initializer else None
            mean = _guided(initializer, x, scheduler.logsnr[t + 1].item(), init_labels, guidance_scale, "sample")
        noise = randn_tensor(mean.shape, generator=generator, device=x.device, dtype=torch.float32)
        y = mean + scheduler.initializer_std[t].item() * noise
        # K' Langevin steps (Eq. 5 with the sampling adjustment of Sec. 4.2).
        step_size_squared = ratio * scheduler.langevin_step_size[t].item() ** 2
        sigma_squared = scheduler.sigma[t].item() ** 2
        for _ in range(steps):
            grad = _neg_energy_grad(energy_model, y, scheduler.logsnr[t].item(), class_labels, guidance_scale)
            noise = randn_tensor(y.shape, generator=generator, device=y.device, dtype=torch.float32)
            recovery = 0.0 if marginal else step_size_squared / (2 * sigma_squared) * (y - x)
            y = (y + ratio / 2 * grad - recovery + step_size_squared**0.5 * noise).detach()
        x = y / scale
    # Tweedie (Eq. 18): score of f_theta(input_scale_0 x; 0) = f_hat / s_0^2, coefficient 2.
    scale = scheduler.alpha[0].item() if num_levels > 1 else 1.0
    grad = _neg_energy_grad(energy_model, scale * x, scheduler.logsnr[0].item(), class_labels, guidance_scale)
    score = scale * grad / scheduler.langevin_step_size[0].item() ** 2
    coefficient = scheduler.config.tweedie_coefficient
    x = (x + coefficient * scheduler.sigma_bar[0].item() ** 2 * score) / scheduler.alpha_bar[0].item()
    return x.clamp(-1, 1) if scheduler.config.clip_sample else x


def naive_training_step(
    energy_model: nn.Module,
    initializer: nn.Module,
    scheduler: CDRLScheduler,
    clean: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 for unconditional models, written out; returns (EBM loss, initializer loss) to back-propagate."""
    with textbook_blocks():
        return _naive_training_step(energy_model, initializer, scheduler, clean, generator)


def _naive_training_step(
    energy_model: nn.Module,
    initializer: nn.Module,
    scheduler: CDRLScheduler,
    clean: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_levels, device = clean.shape[0], scheduler.config.num_noise_levels, clean.device
    view = (batch,) + (1,) * (clean.ndim - 1)
    t = torch.randint(0, num_levels, (batch,), generator=generator, device=generator.device if generator else "cpu")
    noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=torch.float32)
    schedule = {
        name: getattr(scheduler, name).to(device)
        for name in ("alpha", "alpha_bar", "sigma_bar", "sigma", "logsnr", "initializer_std", "langevin_step_size")
    }
    t = t.to(device)
    scale = torch.where(t == num_levels - 1, 1.0, schedule["alpha"][t]).view(view)
    positive = scale * (schedule["alpha_bar"][t].view(view) * clean + schedule["sigma_bar"][t].view(view) * noise)
    noisier = schedule["alpha_bar"][t + 1].view(view) * clean + schedule["sigma_bar"][t + 1].view(view) * noise

    mean = initializer(noisier, schedule["logsnr"][t + 1]).sample
    proposal = mean + schedule["initializer_std"][t].view(view) * randn_tensor(
        clean.shape, generator=generator, device=device, dtype=torch.float32
    )
    energy_training = energy_model.training
    energy_model.eval()
    step_size_squared = (schedule["langevin_step_size"][t] ** 2).view(view)
    recovery_precision = torch.where(t == num_levels - 1, 0.0, 1 / schedule["sigma"][t] ** 2).view(view)
    y = proposal.detach()
    for _ in range(scheduler.config.num_langevin_steps):
        grad = _neg_energy_grad(energy_model, y, schedule["logsnr"][t], None, 0.0)
        step_noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=torch.float32)
        y = (y + grad / 2 - step_size_squared / 2 * recovery_precision * (y - noisier)).detach()
        y = y + step_size_squared.sqrt() * step_noise
    energy_model.train(energy_training)

    neg_energy = energy_model(torch.cat([positive, y]), schedule["logsnr"][t].repeat(2)).neg_energy
    neg_energy_positive, neg_energy_negative = neg_energy.chunk(2)
    weight = schedule["sigma"][0] / schedule["sigma"][t]
    ebm_loss = (weight * (neg_energy_negative - neg_energy_positive)).mean()
    initializer_loss = (y - proposal).pow(2).flatten(1).sum(dim=1).mean()
    return ebm_loss, initializer_loss
