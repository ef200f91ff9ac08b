"""Algorithm 2: initializer proposals refined by Langevin dynamics, level by level, then one Tweedie step.

This module holds the only Langevin loop of the library; pipelines, the training step, examples and benchmarks
all call it. It works for any energy model/initializer pair (images or vectors) that follows the SPEC §9 contract.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.utils import parametrize

from .guidance import ConditionWeights, StackedTerms, null_label_of, weighted_model_output
from .schedulers.scheduling_cdrl import CDRLScheduler, Timestep

Projection = Callable[[torch.Tensor, int], torch.Tensor]


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients and spectral-norm weights computed once, restored afterwards.

    Langevin dynamics needs grad_y f_hat only (SPEC §4): parameters never accumulate gradients and no graph is built
    for them; the normalised weights do not change during sampling, so ``parametrize.cached`` evaluates each
    parametrisation once per call instead of once per forward pass.
    """
    modes = [(module, module.training) for model in models for module in model.modules()]
    flags = [(param, param.requires_grad) for model in models for param in model.parameters()]
    for model in models:
        model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        with parametrize.cached():
            yield
    finally:
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)
        for module, training in modes:
            module.training = training


def _model_input(model: nn.Module, sample: torch.Tensor) -> torch.Tensor:
    """The chain state stays float32; a half-precision model (without autocast) gets its own dtype."""
    dtype = getattr(model, "dtype", torch.float32)
    return sample if torch.is_autocast_enabled() or dtype == sample.dtype else sample.to(dtype)


def neg_energy_and_grad(
    energy_model: nn.Module, sample: torch.Tensor, logsnr: torch.Tensor, terms: StackedTerms
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (guided) f_hat(y) of shape (batch,) and grad_y f_hat(y) in float32, with a graph for y alone."""
    with torch.enable_grad():
        sample = sample.detach().requires_grad_(True)
        neg_energy = weighted_model_output(energy_model, _model_input(energy_model, sample), logsnr, terms).float()
        (grad,) = torch.autograd.grad(neg_energy.sum(), sample)
    return neg_energy.detach(), grad.float()


def langevin_refine(
    energy_model: nn.Module,
    scheduler: CDRLScheduler,
    sample: torch.Tensor,
    noisier: torch.Tensor,
    timestep: Timestep,
    terms: StackedTerms,
    num_langevin_steps: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    project: Projection | None = None,
) -> torch.Tensor:
    """K' Langevin steps on the conditional EBM of pair t, starting from ``sample`` (Eq. 5).

    The caller runs this inside ``frozen(energy_model)``. ``timestep`` is an int or one pair index per example (the
    training step mixes levels in a batch). ``project`` (inpainting) is applied after every step. With
    ``num_langevin_steps=None`` the trained K is used; other values apply the sampling adjustment (Sec. 4.2).
    """
    steps = scheduler.config.num_langevin_steps if num_langevin_steps is None else num_langevin_steps
    if steps == 0:
        return sample
    coefficients = scheduler.langevin_coefficients(timestep, sample, num_langevin_steps)
    logsnr = scheduler.energy_logsnr(timestep, device=sample.device)
    sample = sample.float()
    for _ in range(steps):
        _, grad = neg_energy_and_grad(energy_model, sample, logsnr, terms)
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        sample = coefficients.step(sample, grad, noisier, noise)
        if project is not None:
            sample = project(sample, timestep)
    return sample


@dataclass
class LevelSample:
    """The outcome of one level of Algorithm 2, in data space (x, not y).

    Args:
        timestep: the pair index t.
        proposal: the initializer's proposal y_hat_t / input_scale_t.
        sample: x_t = y_t / input_scale_t after Langevin refinement.
    """

    timestep: int
    proposal: torch.Tensor
    sample: torch.Tensor


class CDRLSampler:
    """Algorithm 2 for one energy model and initializer, with guidance/composition weights (SPEC §7-8).

    Args:
        energy_model: the EBM f_hat.
        initializer: the initializer g.
        scheduler: the ``CDRLScheduler`` the models were trained with.
        energy_weights: which conditions enter f_hat, with which weights.
        initializer_weights: which conditions enter g (for an unconditional initializer: the unconditional term).
        num_langevin_steps: K' per level; ``None`` is the trained K, 0 keeps the initializer's proposals.
        generator: makes the run reproducible.
        project: optional map applied to y_t after the proposal and after every Langevin step (inpainting).
        use_initializer: ``False`` starts every level's Langevin chain at x_{t+1} instead of the initializer's
            proposal (the "Langevin alone" ablation of App. F).
    """

    def __init__(
        self,
        energy_model: nn.Module,
        initializer: nn.Module,
        scheduler: CDRLScheduler,
        energy_weights: ConditionWeights,
        initializer_weights: ConditionWeights,
        batch_size: int,
        device: torch.device,
        num_langevin_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        project: Projection | None = None,
        use_initializer: bool = True,
    ):
        if num_langevin_steps is not None and (
            isinstance(num_langevin_steps, bool) or not isinstance(num_langevin_steps, int) or num_langevin_steps < 0
        ):
            raise ValueError(f"`num_langevin_steps` must be a non-negative integer, got {num_langevin_steps!r}.")
        if num_langevin_steps == 0 and not use_initializer:
            raise ValueError("With `use_initializer=False`, `num_langevin_steps` must be at least 1.")
        self.energy_model = energy_model
        self.initializer = initializer
        self.scheduler = scheduler
        self.energy_terms = energy_weights.stack(null_label_of(energy_model), batch_size, device)
        self.initializer_terms = initializer_weights.stack(null_label_of(initializer), batch_size, device)
        self.num_langevin_steps = num_langevin_steps
        self.generator = generator
        self.project = project
        self.use_initializer = use_initializer

    def propose(self, noisier: torch.Tensor, timestep: int) -> torch.Tensor:
        """y_hat_t = g(x_{t+1}) + sigma_tilde_t eps with the guided mean (Eq. 6 and 12), in chain space."""
        if not self.use_initializer:
            return noisier.float()
        logsnr = self.scheduler.initializer_logsnr(timestep, device=noisier.device)
        mean = weighted_model_output(
            self.initializer, _model_input(self.initializer, noisier), logsnr, self.initializer_terms
        ).float()
        noise = randn_tensor(mean.shape, generator=self.generator, device=mean.device, dtype=torch.float32)
        return self.scheduler.initializer_proposal(mean, timestep, noise)

    def level(self, noisier: torch.Tensor, timestep: int) -> LevelSample:
        """One level of Algorithm 2: propose y_t from x_{t+1}, refine it by Langevin, return x_t."""
        with frozen(self.energy_model, self.initializer):
            proposal = self.propose(noisier, timestep)
            if self.project is not None:
                proposal = self.project(proposal, timestep)
            refined = langevin_refine(
                self.energy_model,
                self.scheduler,
                proposal,
                noisier.float(),
                timestep,
                self.energy_terms,
                self.num_langevin_steps,
                self.generator,
                self.project,
            )
        return LevelSample(
            timestep=timestep,
            proposal=self.scheduler.from_chain_space(proposal, timestep),
            sample=self.scheduler.from_chain_space(refined, timestep),
        )

    def denoise(self, sample: torch.Tensor) -> torch.Tensor:
        """The final Tweedie step on x_0 with the guided level-0 energy (Eq. 18)."""
        with frozen(self.energy_model):
            logsnr = self.scheduler.energy_logsnr(0, device=sample.device)
            _, grad = neg_energy_and_grad(
                self.energy_model, self.scheduler.to_chain_space(sample, 0), logsnr, self.energy_terms
            )
        return self.scheduler.tweedie_denoise(sample, grad)

    def run(
        self,
        latents: torch.Tensor,
        callback: Callable[[int, LevelSample], torch.Tensor | None] | None = None,
        denoise: bool = True,
    ) -> torch.Tensor:
        """All levels from x_T = ``latents`` down to x_0, then the Tweedie step (Algorithm 2, Eq. 18).

        ``callback(index, level_sample)`` runs after each level; a tensor it returns replaces x_t.
        """
        sample = latents
        for index, timestep in enumerate(self.scheduler.timesteps.tolist()):
            level = self.level(sample, timestep)
            sample = level.sample
            if callback is not None:
                replaced = callback(index, level)
                if replaced is not None:
                    sample = replaced
        return self.denoise(sample) if denoise else sample
