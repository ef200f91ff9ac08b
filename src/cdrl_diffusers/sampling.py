"""Algorithm 2: initializer proposals refined by Langevin dynamics, level by level, then one Tweedie step.

This module holds the only Langevin loop of the library; pipelines, the training step, examples and benchmarks
all call it. It works for any energy model/initializer pair (images or vectors) that follows the SPEC §9 contract.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.utils import parametrize

from .guidance import ConditionWeights, StackedTerms, null_label_of, weighted_model_output
from .models.embeddings import ConditionEmbedding
from .schedulers.scheduling_cdrl import CDRLScheduler, Timestep
from .validation import as_device, check_finite, check_float_tensor, check_generator, check_positive_int

Projection = Callable[[torch.Tensor, int], torch.Tensor]
# (sample, logsnr) -> (f_hat of shape (batch,), grad_y f_hat in float32)
EnergyGradient = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_context(precision: str | None, device: torch.device | str) -> AbstractContextManager:
    """Autocast for the network evaluations of sampling and training; the chain state stays float32.

    ``None`` keeps the caller's setting (e.g. Accelerate's ``--mixed_precision``); ``"fp32"`` disables autocast;
    ``"bf16"`` and ``"fp16"`` run convolutions and matrix products in that dtype. The Langevin state, the quadratic
    recovery term, the noise and the Tweedie step are computed in float32 in every mode: the networks' outputs and
    gradients are cast to float32 before they enter Eq. 5 and Eq. 18.
    """
    if precision is None:
        return nullcontext()
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {tuple(PRECISIONS)} or None, got {precision!r}.")
    device_type = torch.device(device).type
    if precision == "fp32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=PRECISIONS[precision], cache_enabled=False)


@contextmanager
def frozen(*models: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients, spectral-norm weights and conditioning computed once; restored afterwards.

    Langevin dynamics needs grad_y f_hat only (SPEC §4): parameters never accumulate gradients and no graph is built
    for them; the normalised weights do not change during sampling, so ``parametrize.cached`` evaluates each
    parametrisation once per context instead of once per forward pass, and the log-SNR/class embeddings of the
    models (``ConditionEmbedding.cached``) are computed once per level instead of once per Langevin step.
    """
    modes = [(module, module.training) for model in models for module in model.modules()]
    flags = [(param, param.requires_grad) for model in models for param in model.parameters()]
    for model in models:
        model.eval()
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        with parametrize.cached(), ExitStack() as caches:
            for module, _ in modes:
                if isinstance(module, ConditionEmbedding):
                    caches.enter_context(module.cached())
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


class CUDAGraphEnergyGradient:
    """``neg_energy_and_grad`` replayed from one CUDA graph: the forward and input-gradient pass of the EBM.

    Captured at the first call (after two warm-up passes on a side stream) and replayed at every later Langevin
    step and level of the sampling call, which removes the per-kernel launch cost of the ~100-layer network. The
    chain state and log-SNR are copied into static buffers; the noise and the Langevin update stay outside the
    graph, so random streams are those of the eager path. Use it inside one ``frozen`` context (the graph reads the
    cached spectral-norm weights) and consume each returned gradient before the next call: it is a static buffer.

    Args:
        energy_model: the EBM f_hat on a CUDA device.
        terms: the guidance terms of the sampling call.
        sample_shape: the shape of the chain state (batch, ...).
        device: the CUDA device.
    """

    def __init__(self, energy_model: nn.Module, terms: StackedTerms, sample_shape: torch.Size, device: torch.device):
        if torch.device(device).type != "cuda":
            raise ValueError(f"CUDA-graph capture needs a CUDA device, got {device}.")
        self.energy_model = energy_model
        self.terms = terms
        self.static_sample = torch.zeros(sample_shape, device=device)
        self.static_logsnr = torch.zeros(sample_shape[0], device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None

    def _evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        return neg_energy_and_grad(self.energy_model, self.static_sample, self.static_logsnr, self.terms)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._evaluate()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._evaluate()

    def __call__(self, sample: torch.Tensor, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.static_sample.copy_(sample)
        self.static_logsnr.copy_(torch.as_tensor(logsnr, device=sample.device).expand(sample.shape[0]))
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs


_COMPILED_COPIES: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def _copy_weights(source: nn.Module, target: nn.Module, assign: bool) -> None:
    """Parameters and buffers of ``target`` from the same-named, possibly parametrised, tensors of ``source``."""
    sources = dict(source.named_modules())
    with torch.no_grad():
        for name, module in target.named_modules():
            for key, value in list(module._parameters.items()) + list(module._buffers.items()):
                if value is None:
                    continue
                current = getattr(sources[name], key)
                if not assign:
                    value.copy_(current)
                elif key in module._parameters:
                    module._parameters[key] = nn.Parameter(current.detach().clone(), requires_grad=False)
                else:
                    module._buffers[key] = current.detach().clone()


def compiled_for_sampling(model: nn.Module) -> nn.Module:
    """A ``torch.compile``d inference copy of ``model`` with its spectral-norm weights folded in.

    Spectral normalisation is a parametrisation, which ``torch.compile`` would retrace at every change of the
    parametrisation cache; the copy is the same architecture built with ``use_spectral_norm=False`` that holds the
    normalised weights as plain tensors. It is made and compiled once per model (the first call pays the compilation)
    and refreshed in place from the model's current weights at every call, so it follows training.
    """
    compiled = _COMPILED_COPIES.get(model)
    if compiled is not None:
        _copy_weights(model, compiled, assign=False)
        return compiled.eval()
    if any(parametrize.is_parametrized(module) for module in model.modules()):
        config = getattr(model, "config", {})
        if "use_spectral_norm" not in config:
            raise ValueError(
                f"`torch_compile` needs a model without parametrisations or with a `use_spectral_norm` config option, "
                f"got {type(model).__name__}."
            )
        compiled = type(model).from_config(config, use_spectral_norm=False)
        _copy_weights(model, compiled, assign=True)
    else:
        compiled = copy.deepcopy(model)
        for module in compiled.modules():
            if isinstance(module, ConditionEmbedding):
                module._cache = None  # a copy made inside `frozen` must not share the open cache
    compiled.requires_grad_(False).eval()
    compiled.compile(dynamic=False)
    _COMPILED_COPIES[model] = compiled
    return compiled


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
    gradient: EnergyGradient | None = None,
) -> torch.Tensor:
    """K' Langevin steps on the conditional EBM of pair t, starting from ``sample`` (Eq. 5).

    The caller runs this inside ``frozen(energy_model)``. ``timestep`` is an int or one pair index per example (the
    training step mixes levels in a batch). ``project`` (inpainting) is applied after every step. With
    ``num_langevin_steps=None`` the trained K is used; other values apply the sampling adjustment (Sec. 4.2).
    ``gradient(sample, logsnr)`` replaces ``neg_energy_and_grad`` on ``energy_model`` (a compiled copy or a CUDA
    graph of it). The per-level constants (step coefficients, log-SNR) are computed once, before the loop.
    """
    steps = scheduler.config.num_langevin_steps if num_langevin_steps is None else num_langevin_steps
    if steps == 0:
        return sample
    if gradient is None:

        def gradient(sample: torch.Tensor, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return neg_energy_and_grad(energy_model, sample, logsnr, terms)

    coefficients = scheduler.langevin_coefficients(timestep, sample, num_langevin_steps)
    logsnr = scheduler.energy_logsnr(timestep, device=sample.device)
    sample = sample.float()
    for _ in range(steps):
        _, grad = gradient(sample, logsnr)
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
        precision: autocast dtype of the network evaluations (``precision_context``): ``None`` keeps the caller's,
            ``"fp32"``, ``"bf16"`` or ``"fp16"``. The chain state, quadratic term and noise stay float32.
        torch_compile: evaluate the EBM through ``compiled_for_sampling`` (``torch.compile``; the first call compiles).
        cuda_graph: on a CUDA device, replay the EBM's forward and input-gradient pass from a CUDA graph
            (``CUDAGraphEnergyGradient``), captured once per ``run``.
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
        precision: str | None = None,
        torch_compile: bool = False,
        cuda_graph: bool = False,
    ):
        if num_langevin_steps is not None and (
            isinstance(num_langevin_steps, bool) or not isinstance(num_langevin_steps, int) or num_langevin_steps < 0
        ):
            raise ValueError(f"`num_langevin_steps` must be a non-negative integer, got {num_langevin_steps!r}.")
        if num_langevin_steps == 0 and not use_initializer:
            raise ValueError("With `use_initializer=False`, `num_langevin_steps` must be at least 1.")
        check_positive_int(batch_size, "batch_size")
        check_generator(generator)
        for name, weights in (("energy_weights", energy_weights), ("initializer_weights", initializer_weights)):
            if not isinstance(weights, ConditionWeights):
                raise TypeError(f"`{name}` must be a ConditionWeights, got {type(weights).__name__}.")
        device = as_device(device)
        precision_context(precision, device)  # validates `precision`
        if cuda_graph and torch.device(device).type != "cuda":
            raise ValueError(f"`cuda_graph=True` needs a CUDA device, got {device}.")
        self.energy_model = energy_model
        self.initializer = initializer
        self.scheduler = scheduler
        self.energy_terms = energy_weights.stack(null_label_of(energy_model), batch_size, device)
        self.initializer_terms = initializer_weights.stack(null_label_of(initializer), batch_size, device)
        self.num_langevin_steps = num_langevin_steps
        self.generator = generator
        self.project = project
        self.use_initializer = use_initializer
        self.batch_size = batch_size
        self.device = device
        self.precision = precision
        self.torch_compile = torch_compile
        self.cuda_graph = cuda_graph
        self._gradient: EnergyGradient | None = None

    @contextmanager
    def _evaluating(self, *models: nn.Module) -> Iterator[None]:
        with frozen(*models), precision_context(self.precision, self.device):
            yield

    def _energy_gradient(self, sample: torch.Tensor) -> EnergyGradient:
        """grad_y f_hat for this call: eager, compiled or CUDA-graphed (one per ``run``)."""
        if self._gradient is not None:
            return self._gradient
        energy_model = compiled_for_sampling(self.energy_model) if self.torch_compile else self.energy_model
        if self.cuda_graph:
            return CUDAGraphEnergyGradient(energy_model, self.energy_terms, sample.shape, sample.device)

        def gradient(sample: torch.Tensor, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return neg_energy_and_grad(energy_model, sample, logsnr, self.energy_terms)

        return gradient

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
        with self._evaluating(self.energy_model, self.initializer):
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
                gradient=self._energy_gradient(proposal),
            )
        return LevelSample(
            timestep=timestep,
            proposal=self.scheduler.from_chain_space(proposal, timestep),
            sample=self.scheduler.from_chain_space(refined, timestep),
        )

    def denoise(self, sample: torch.Tensor) -> torch.Tensor:
        """The final Tweedie step on x_0 with the guided level-0 energy (Eq. 18)."""
        with self._evaluating(self.energy_model):
            chain = self.scheduler.to_chain_space(sample.float(), 0)
            logsnr = self.scheduler.energy_logsnr(0, device=sample.device)
            _, grad = self._energy_gradient(chain)(chain, logsnr)
            return self.scheduler.tweedie_denoise(sample, grad)

    def run(
        self,
        latents: torch.Tensor,
        callback: Callable[[int, LevelSample], torch.Tensor | None] | None = None,
        denoise: bool = True,
    ) -> torch.Tensor:
        """All levels from x_T = ``latents`` down to x_0, then the Tweedie step (Algorithm 2, Eq. 18).

        ``callback(index, level_sample)`` runs after each level; a tensor it returns replaces x_t. The models stay
        frozen for the whole call, so spectral-norm weights are computed once per call, not once per level.
        """
        check_float_tensor(latents, "latents")
        if latents.ndim < 2 or latents.shape[0] != self.batch_size:
            raise ValueError(
                f"`latents` must hold `batch_size` = {self.batch_size} samples, got shape {tuple(latents.shape)}."
            )
        check_finite(latents, "latents")
        sample = latents
        with self._evaluating(self.energy_model, self.initializer):
            self._gradient = self._energy_gradient(latents)
            try:
                for index, timestep in enumerate(self.scheduler.timesteps.tolist()):
                    level = self.level(sample, timestep)
                    sample = level.sample
                    if callback is not None:
                        replaced = callback(index, level)
                        if replaced is not None:
                            sample = replaced
                return self.denoise(sample) if denoise else sample
            finally:
                self._gradient = None
