"""The CDRL noise schedule and every per-level formula of the method.

Index conventions (Sec. 3.1): noise *levels* k = 0..T, with level 0 slightly noisy data and level T close to pure
noise; *pairs* (EBM and initializer index) t = 0..T-1. Pair t refines the chain variable y_t = input_scale_t * x_t
given x_{t+1}. All schedule math of the library lives here; models and pipelines only call these methods. The
constructor checks the configuration; the methods trust their callers (the pipelines and the training step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..validation import check_number, check_positive_int

Timestep = int | torch.Tensor


@dataclass(frozen=True)
class LangevinCoefficients:
    """Per-pair constants of one Langevin step (Eq. 5), broadcastable against the chain state."""

    gradient_scale: torch.Tensor
    recovery_scale: torch.Tensor
    noise_scale: torch.Tensor

    def step(
        self, sample: torch.Tensor, neg_energy_grad: torch.Tensor, noisier: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """One Langevin step (Eq. 5): y + gradient_scale grad f_hat - recovery_scale (y - x_{t+1}) + noise_scale eps.

        The only implementation of the update: sampling (Algorithm 2) and training (Algorithm 1) both call it, with
        the constants of ``CDRLScheduler.langevin_coefficients``.
        """
        return (
            sample
            + self.gradient_scale * neg_energy_grad
            - self.recovery_scale * (sample - noisier)
            + self.noise_scale * noise
        )


SCHEDULES = ("cosine", "drl")
STEP_SIZE_RULES = ("image", "toy")


def cosine_logsnr_schedule(num_noise_levels: int, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    """Log-SNR of levels 0..T of the cosine schedule (App. A.3, Eq. 19-20), in float64.

    lambda_k = -2 log(tan(a k / T + b)) with b = arctan(exp(-lambda_max / 2)) and
    a = arctan(exp(-lambda_min / 2)) - b, so lambda_0 = lambda_max and lambda_T = lambda_min.
    """
    b = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - b
    k = torch.arange(num_noise_levels + 1, dtype=torch.float64)
    return -2.0 * torch.log(torch.tan(a * k / num_noise_levels + b))


def drl_logsnr_schedule(num_noise_levels: int) -> torch.Tensor:
    """Log-SNR of the original DRL levels (App. G.3), in float64.

    DDPM linear betas 1e-4..0.02 over 1000 steps; the levels sit at the cumulative indices
    round(linspace(0, 500, T)) followed by 999, which is [0, 100, 200, 300, 400, 500, 999] for T = 6.
    """
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    signal_variance = torch.cumprod(1.0 - betas, dim=0)
    indices = torch.cat(
        [torch.linspace(0, 500, num_noise_levels, dtype=torch.float64).round().long(), torch.tensor([999])]
    )
    variance = signal_variance[indices]
    return torch.log(variance / (1.0 - variance))


class CDRLScheduler(SchedulerMixin, ConfigMixin):
    r"""Noise levels, Langevin dynamics, initializer proposals and the final denoising step of CDRL.

    Tensors (float32, on CPU; every method moves them to its input's device):

    - ``logsnr``, ``alpha_bar``, ``sigma_bar`` (length T+1): lambda_k, alpha_bar_k = sqrt(sigmoid(lambda_k)),
      sigma_bar_k = sqrt(sigmoid(-lambda_k)) (variance preserving).
    - ``alpha``, ``sigma`` (length T): alpha_{t+1} = alpha_bar_{t+1} / alpha_bar_t and
      sigma_{t+1} = sqrt(1 - alpha_{t+1}^2).
    - ``input_scale`` (length T): alpha_{t+1}, except 1 for the last pair, which models the marginal of x_{T-1}
      (it has no noisier level to recover from).
    - ``langevin_step_size`` (length T): s_t, with s_t^2 = c (sigma_bar_t / sigma_bar_0) sigma_{t+1}^2 for the image
      rule (App. A.2, Eq. 16, c = 4e-4) or s_t^2 = (c / sigma_bar_0) sigma_{t+1}^2 for the official 2-D toy rule.
    - ``initializer_std`` (length T): sigma_tilde_t = input_scale_t (sigma_bar_t / sigma_bar_{t+1}) sigma_{t+1}
      (Eq. 6).
    - ``loss_weight`` (length T): w_t = sigma_1 / sigma_{t+1}, the EBM loss weight per pair.
    - ``recovery_precision`` (length T): 1 / sigma_{t+1}^2, the precision of the quadratic recovery term of Eq. 3,
      and 0 for the marginal last pair.
    - ``timesteps``: the pair indices in sampling order, T-1 down to 0.

    Args:
        num_noise_levels: T, the number of EBM/initializer pairs (the paper uses 6).
        logsnr_max: lambda_0, the log-SNR of the cleanest level (9.8).
        logsnr_min: lambda_T, the log-SNR of the noisiest level (-5.1).
        num_langevin_steps: K, the Langevin steps per level the models are trained with (15).
        schedule: ``"cosine"`` (the paper's, Eq. 19-20) or ``"drl"`` (the original DRL levels, for ablations).
        langevin_step_size_rule: ``"image"`` (s_t^2 = c sigma_bar_t / sigma_bar_0 sigma_{t+1}^2) or ``"toy"``
            (s_t^2 = c / sigma_bar_0 sigma_{t+1}^2, used by the official 2-D example with c = 2e-3).
        langevin_step_size_scale: c in the step-size rule, or one c per pair (a sequence of length T): e.g. a coarser
            level-0 step, whose 1 / s_0^2 multiplies every error of f_hat in the cleanest density.
        tweedie_coefficient: the multiplier of the score in the final Tweedie step (the paper's 2.0, App. A.2).
        clip_sample: clamp the final samples to [-1, 1], the range of image data.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        num_noise_levels: int = 6,
        logsnr_max: float = 9.8,
        logsnr_min: float = -5.1,
        num_langevin_steps: int = 15,
        schedule: str = "cosine",
        langevin_step_size_rule: str = "image",
        langevin_step_size_scale: float | list[float] = 4e-4,
        tweedie_coefficient: float = 2.0,
        clip_sample: bool = True,
    ):
        check_positive_int(num_noise_levels, "num_noise_levels")
        logsnr_max, logsnr_min = check_number(logsnr_max, "logsnr_max"), check_number(logsnr_min, "logsnr_min")
        if not logsnr_max > logsnr_min:
            raise ValueError(f"`logsnr_max` ({logsnr_max}) must be larger than `logsnr_min` ({logsnr_min}).")
        check_positive_int(num_langevin_steps, "num_langevin_steps")
        if schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES}, got {schedule!r}.")
        if langevin_step_size_rule not in STEP_SIZE_RULES:
            raise ValueError(
                f"`langevin_step_size_rule` must be one of {STEP_SIZE_RULES}, got {langevin_step_size_rule!r}."
            )
        check_number(tweedie_coefficient, "tweedie_coefficient")
        if not isinstance(clip_sample, bool):
            raise TypeError(f"`clip_sample` must be True or False, got {clip_sample!r}.")
        scales = langevin_step_size_scale
        if isinstance(scales, (list, tuple)):
            if len(scales) != num_noise_levels:
                raise ValueError(
                    f"`langevin_step_size_scale` must be one number or {num_noise_levels} (one per pair), "
                    f"got {len(scales)}."
                )
        else:
            scales = [scales]
        for scale in scales:
            if not check_number(scale, "langevin_step_size_scale") > 0:
                raise ValueError(f"`langevin_step_size_scale` must be positive, got {langevin_step_size_scale}.")

        if schedule == "cosine":
            logsnr = cosine_logsnr_schedule(num_noise_levels, logsnr_max, logsnr_min)
        else:
            logsnr = drl_logsnr_schedule(num_noise_levels)
        alpha_bar = torch.sigmoid(logsnr).sqrt()
        sigma_bar = torch.sigmoid(-logsnr).sqrt()
        alpha = alpha_bar[1:] / alpha_bar[:-1]
        sigma = (1.0 - alpha**2).sqrt()
        input_scale = alpha.clone()
        input_scale[-1] = 1.0

        step_size_squared = torch.tensor(scales, dtype=sigma.dtype) / sigma_bar[0] * sigma**2
        if langevin_step_size_rule == "image":
            step_size_squared = step_size_squared * sigma_bar[:-1]

        self.logsnr = logsnr.float()
        self.alpha_bar = alpha_bar.float()
        self.sigma_bar = sigma_bar.float()
        self.alpha = alpha.float()
        self.sigma = sigma.float()
        self.input_scale = input_scale.float()
        self.langevin_step_size = step_size_squared.sqrt().float()
        self.initializer_std = (input_scale * sigma_bar[:-1] / sigma_bar[1:] * sigma).float()
        self.loss_weight = (sigma[0] / sigma).float()
        recovery_precision = 1.0 / sigma**2
        recovery_precision[-1] = 0.0
        self.recovery_precision = recovery_precision.float()
        self.timesteps = torch.arange(num_noise_levels - 1, -1, -1)

    @property
    def num_noise_levels(self) -> int:
        return self.config.num_noise_levels

    # ----------------------------------------------------------------------------------------------------------------
    # Indexing helpers
    # ----------------------------------------------------------------------------------------------------------------
    @staticmethod
    def _gather(values: torch.Tensor, index: Timestep, like: torch.Tensor) -> torch.Tensor:
        """``values[index]`` on ``like``'s device, shaped to broadcast against ``like`` (batch first)."""
        values = values.to(like.device)
        if isinstance(index, int) or index.ndim == 0:
            return values[int(index)]
        return values[index.to(like.device)].view(-1, *([1] * (like.ndim - 1)))

    def energy_logsnr(self, timestep: Timestep, device: torch.device | str | None = None) -> torch.Tensor:
        """lambda_t, the log-SNR the EBM of pair t is conditioned on (the cleaner level of the pair)."""
        return self._index(self.logsnr[:-1], timestep, device)

    def initializer_logsnr(self, timestep: Timestep, device: torch.device | str | None = None) -> torch.Tensor:
        """lambda_{t+1}, the log-SNR of the initializer's input x_{t+1}."""
        return self._index(self.logsnr[1:], timestep, device)

    @staticmethod
    def _index(values: torch.Tensor, index: Timestep, device: torch.device | str | None) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            device = index.device if device is None else device
            return values.to(device)[index.to(device)]
        return values[index].to(device)

    def langevin_scale(self, num_langevin_steps: int | None = None) -> float:
        """r = K / K', the step-size multiplier of the sampling adjustment (Sec. 4.2): s'^2 = r s_t^2."""
        if num_langevin_steps is None:
            return 1.0
        return self.config.num_langevin_steps / num_langevin_steps

    # ----------------------------------------------------------------------------------------------------------------
    # Forward process
    # ----------------------------------------------------------------------------------------------------------------
    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, level: Timestep) -> torch.Tensor:
        """x_k = alpha_bar_k x_0 + sigma_bar_k eps, the marginal at noise level k in 0..T (Sec. 3.1)."""
        return self._gather(self.alpha_bar, level, clean) * clean + self._gather(self.sigma_bar, level, clean) * noise

    def training_pair(
        self, clean: torch.Tensor, timestep: Timestep, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The positive y_t and the conditioning x_{t+1} built from one shared noise (Eq. 9, Algorithm 1).

        x_{t+1} = alpha_bar_{t+1} x_0 + sigma_bar_{t+1} eps and
        y_t = input_scale_t (alpha_bar_t x_0 + sigma_bar_t eps).
        Both are interpolations between the same x_0 and eps, which reduces the variance of the EBM gradient; this
        is intentionally not the Markov forward joint.
        """
        shape_like = clean
        alpha_bar_t = self._gather(self.alpha_bar[:-1], timestep, shape_like)
        sigma_bar_t = self._gather(self.sigma_bar[:-1], timestep, shape_like)
        alpha_bar_next = self._gather(self.alpha_bar[1:], timestep, shape_like)
        sigma_bar_next = self._gather(self.sigma_bar[1:], timestep, shape_like)
        input_scale = self._gather(self.input_scale, timestep, shape_like)
        positive = input_scale * (alpha_bar_t * clean + sigma_bar_t * noise)
        noisier = alpha_bar_next * clean + sigma_bar_next * noise
        return positive, noisier

    def to_chain_space(self, sample: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """y_t = input_scale_t x_t (Sec. 3.1; input_scale is 1 for the marginal last pair)."""
        return self._gather(self.input_scale, timestep, sample) * sample

    def from_chain_space(self, sample: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """x_t = y_t / input_scale_t (Algorithm 2)."""
        return sample / self._gather(self.input_scale, timestep, sample)

    # ----------------------------------------------------------------------------------------------------------------
    # Initializer, Langevin and the final denoising step
    # ----------------------------------------------------------------------------------------------------------------
    def initializer_proposal(self, mean: torch.Tensor, timestep: Timestep, noise: torch.Tensor) -> torch.Tensor:
        """y_hat_t = g_phi(x_{t+1}) + sigma_tilde_t eps, a draw from the initializer's Gaussian (Eq. 6)."""
        return mean + self._gather(self.initializer_std, timestep, mean) * noise

    def langevin_coefficients(
        self, timestep: Timestep, like: torch.Tensor, num_langevin_steps: int | None = None
    ) -> LangevinCoefficients:
        """The constants of Eq. 5 for pair t, computed once per level and shaped to broadcast against ``like``.

        With r = K / K' (sampling adjustment, Sec. 4.2) and s'^2 = r s_t^2, a step reads
        ``y + (r / 2) grad f_hat(y) - s'^2 / (2 sigma_{t+1}^2) (y - x_{t+1}) + s' eps``; the quadratic recovery term
        is dropped for the marginal last pair. At K' = K this is exactly Eq. 5 with f = f_hat / s_t^2.
        """
        ratio = self.langevin_scale(num_langevin_steps)
        step_size_squared = ratio * self._gather(self.langevin_step_size, timestep, like) ** 2
        recovery_precision = self._gather(self.recovery_precision, timestep, like)
        return LangevinCoefficients(
            gradient_scale=torch.full_like(step_size_squared, 0.5 * ratio),
            recovery_scale=0.5 * step_size_squared * recovery_precision,
            noise_scale=step_size_squared.sqrt(),
        )

    def tweedie_denoise(self, sample: torch.Tensor, neg_energy_grad: torch.Tensor) -> torch.Tensor:
        r"""The final denoising step on level-0 samples (Eq. 18 with the paper's coefficient 2.0), clamped to [-1, 1].

        The level-0 log-density of x is f_theta(input_scale_0 x; 0) = f_hat(input_scale_0 x; lambda_0) / s_0^2, so its
        score is input_scale_0 grad_y f_hat / s_0^2 and x_hat = (x + sigma_bar_0^2 c score) / alpha_bar_0, clamped to
        [-1, 1] when ``clip_sample`` is set.

        Args:
            sample: x_0, the output of the last Langevin stage (data space, slightly noisy).
            neg_energy_grad: grad_y f_hat(y; lambda_0) evaluated at y = input_scale_0 x.
        """
        score = self.input_scale[0].item() * neg_energy_grad / self.langevin_step_size[0].item() ** 2
        denoised = (sample + self.config.tweedie_coefficient * self.sigma_bar[0].item() ** 2 * score) / self.alpha_bar[
            0
        ].item()
        return denoised.clamp(-1.0, 1.0) if self.config.clip_sample else denoised

    def log_density(self, neg_energy: torch.Tensor, timestep: Timestep) -> torch.Tensor:
        """f_theta(y; t) = f_hat(y; lambda_t) / s_t^2, the unnormalised log-density of pair t (App. A.2)."""
        return neg_energy / self._gather(self.langevin_step_size, timestep, neg_energy) ** 2

    def __len__(self) -> int:
        return self.num_noise_levels
