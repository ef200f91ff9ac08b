"""Algorithm 2: initializer proposals refined by Langevin dynamics, level by level, then one Tweedie step.

The pipelines build a ``CDRLSampler`` for one batch and run it; the training step (Algorithm 1) calls
``langevin_refine`` for its negative samples. Both work for any energy model / initializer pair, images or vectors.
Everything here trusts its callers: the pipelines check the user's arguments once, in ``check_inputs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.utils import parametrize

from .guidance import StackedTerms, embed_terms, weighted_model_output
from .schedulers.scheduling_cdrl import CDRLScheduler, Timestep

Generator = torch.Generator | list[torch.Generator] | None
# y_t -> y_t after the proposal and after every Langevin step (inpainting keeps the known pixels).
Projection = Callable[[torch.Tensor, int], torch.Tensor]
# (y, lambda_t) -> grad_y f_hat(y; lambda_t) in float32; ``energy_gradient`` or a CUDA graph of it.
EnergyGradient = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients and spectral-norm weights computed once; all restored afterwards.

    Langevin dynamics needs grad_y f_hat alone: parameters accumulate no gradients and no graph is built for them.
    The normalised weights do not change while the models are frozen, so ``parametrize.cached`` evaluates each
    spectral norm once per context instead of once per forward pass.
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


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s weights (float32 for plain modules); diffusers walks the parameters to find it."""
    return getattr(model, "dtype", torch.float32)


def model_input(sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The chain state stays float32; a model cast to another dtype (``pipe.to(dtype)``) gets its own dtype.

    Under ``torch.autocast`` the input stays float32: autocast picks the dtype of each operation.
    """
    return sample if torch.is_autocast_enabled(sample.device.type) or dtype == sample.dtype else sample.to(dtype)


def energy_gradient(
    energy_model: nn.Module,
    sample: torch.Tensor,
    logsnr: torch.Tensor,
    terms: StackedTerms,
    condition: object = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """grad_y of the guided f_hat(y; lambda_t) (Eq. 11 and 14), in float32, with a graph for y alone.

    ``condition`` is ``embed_terms(energy_model, logsnr, terms, batch)`` and ``dtype`` ``model_dtype(energy_model)``,
    both computed once per level.
    """
    dtype = model_dtype(energy_model) if dtype is None else dtype
    with torch.enable_grad():
        sample = sample.detach().requires_grad_(True)
        neg_energy = weighted_model_output(energy_model, model_input(sample, dtype), logsnr, terms, condition)
        (grad,) = torch.autograd.grad(neg_energy.float().sum(), sample)
    return grad.float()


def level_gradient(energy_model: nn.Module, logsnr: torch.Tensor, terms: StackedTerms, batch: int) -> EnergyGradient:
    """``energy_gradient`` for one level, with the (log-SNR, class) conditioning embedded once for its K steps."""
    condition = embed_terms(energy_model, logsnr, terms, batch)
    return partial(energy_gradient, energy_model, terms=terms, condition=condition, dtype=model_dtype(energy_model))


def langevin_refine(
    energy_model: nn.Module,
    scheduler: CDRLScheduler,
    sample: torch.Tensor,
    noisier: torch.Tensor,
    timestep: Timestep,
    terms: StackedTerms,
    num_langevin_steps: int | None = None,
    generator: Generator = None,
    project: Projection | None = None,
    gradient: EnergyGradient | None = None,
    return_injected_noise: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """K' Langevin steps (Eq. 5) on the conditional EBM of pair t, starting from ``sample`` = y_t.

    Run inside ``frozen(energy_model)``. ``timestep`` is an int or one pair index per example (the training step
    mixes levels in a batch). ``num_langevin_steps=None`` uses the trained K; other values apply the sampling
    adjustment of Sec. 4.2, and 0 returns ``sample`` unchanged. ``gradient`` replaces ``energy_gradient`` (e.g. a
    CUDA graph of it, see ``acceleration``). ``project`` (inpainting) is applied after every step.
    ``return_injected_noise=True`` also returns the sum of the noise terms s_t eps_k the chain added (the training
    step's control variate of the initializer's target).
    """
    steps = scheduler.config.num_langevin_steps if num_langevin_steps is None else num_langevin_steps
    injected = torch.zeros_like(sample, dtype=torch.float32) if return_injected_noise else None
    if steps == 0:
        return (sample, injected) if return_injected_noise else sample
    logsnr = scheduler.energy_logsnr(timestep, device=sample.device)
    if gradient is None:
        gradient = level_gradient(energy_model, logsnr, terms, sample.shape[0])
    coefficients = scheduler.langevin_coefficients(timestep, sample, num_langevin_steps)
    sample = sample.float()
    for _ in range(steps):
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        sample = coefficients.step(sample, gradient(sample, logsnr), noisier, noise)
        if project is not None:
            sample = project(sample, timestep)
        if return_injected_noise:
            injected += coefficients.noise_scale * noise
    return (sample, injected) if return_injected_noise else sample


@dataclass
class LevelSample:
    """The outcome of one level of Algorithm 2, in data space (x, not y).

    Args:
        timestep: the pair index t.
        sample: x_t = y_t / input_scale_t after Langevin refinement.
    """

    timestep: int
    sample: torch.Tensor


@dataclass
class CDRLSampler:
    """Algorithm 2 for one batch: an energy model, an initializer and the guidance terms of each (Sec. 3.5-3.6).

    Args:
        energy_model: the EBM f_hat.
        initializer: the initializer g.
        scheduler: the ``CDRLScheduler`` the models were trained with.
        energy_terms: the (guided or composed) terms of f_hat, ``ConditionWeights.stack``.
        initializer_terms: the terms of the initializer's mean.
        num_langevin_steps: K' per level; ``None`` is the trained K, 0 keeps the initializer's proposals.
        use_initializer: ``False`` starts each level's Langevin chain at x_{t+1} (the "Langevin alone" ablation).
        generator: makes the run reproducible.
        project: applied to y_t after the proposal and after every Langevin step (inpainting).
        gradient: replaces ``energy_gradient`` at every level (a CUDA graph of it, ``acceleration``).
    """

    energy_model: nn.Module
    initializer: nn.Module
    scheduler: CDRLScheduler
    energy_terms: StackedTerms
    initializer_terms: StackedTerms
    num_langevin_steps: int | None = None
    use_initializer: bool = True
    generator: Generator = None
    project: Projection | None = None
    gradient: EnergyGradient | None = None

    def propose(self, noisier: torch.Tensor, timestep: int) -> torch.Tensor:
        """y_hat_t = g(x_{t+1}) + sigma_tilde_t eps with the guided mean (Eq. 6 and 12), in chain space."""
        if not self.use_initializer:
            return noisier
        logsnr = self.scheduler.initializer_logsnr(timestep, device=noisier.device)
        model = self.initializer
        mean = weighted_model_output(
            model, model_input(noisier, model_dtype(model)), logsnr, self.initializer_terms
        ).float()
        noise = randn_tensor(mean.shape, generator=self.generator, device=mean.device, dtype=torch.float32)
        return self.scheduler.initializer_proposal(mean, timestep, noise)

    def level(self, noisier: torch.Tensor, timestep: int) -> LevelSample:
        """One level of Algorithm 2: propose y_t from x_{t+1}, refine it by Langevin (Eq. 5), return x_t."""
        proposal = self.propose(noisier, timestep)
        if self.project is not None:
            proposal = self.project(proposal, timestep)
        refined = langevin_refine(
            self.energy_model,
            self.scheduler,
            proposal,
            noisier,
            timestep,
            self.energy_terms,
            self.num_langevin_steps,
            self.generator,
            self.project,
            self.gradient,
        )
        return LevelSample(timestep=timestep, sample=self.scheduler.from_chain_space(refined, timestep))

    def denoise(self, sample: torch.Tensor) -> torch.Tensor:
        """The final Tweedie step on x_0 with the guided level-0 energy (Eq. 18)."""
        chain = self.scheduler.to_chain_space(sample, 0)
        logsnr = self.scheduler.energy_logsnr(0, device=sample.device)
        gradient = self.gradient or level_gradient(self.energy_model, logsnr, self.energy_terms, sample.shape[0])
        return self.scheduler.tweedie_denoise(sample, gradient(chain, logsnr))

    def run(
        self, latents: torch.Tensor, callback: Callable[[int, LevelSample], torch.Tensor | None] | None = None
    ) -> torch.Tensor:
        """All levels from x_T = ``latents`` (float32) down to x_0, then the Tweedie step (Algorithm 2, Eq. 18).

        ``callback(index, level_sample)`` runs after each level; a tensor it returns replaces x_t. The models stay
        frozen for the whole call, so the spectral-norm weights are computed once per call.
        """
        sample = latents
        with frozen(self.energy_model, self.initializer):
            for index, timestep in enumerate(self.scheduler.timesteps.tolist()):
                level = self.level(sample, timestep)
                sample = level.sample
                if callback is not None:
                    replaced = callback(index, level)
                    sample = sample if replaced is None else replaced
            return self.denoise(sample)
