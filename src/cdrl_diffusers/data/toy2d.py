"""2-D toy distributions (Fig. 1): seeded samplers, and exact densities at any noise level where one exists.

All three live in the box [-2, 2]^2 before ``scale``; ``scale`` multiplies the points (the official CDRL toy uses the
checkerboard scaled by 4, i.e. data in [-8, 8]^2). The noisy densities are those of
x_k = alpha_bar_k * x + sigma_bar_k * eps with x from the dataset (Sec. 3.1), so ``alpha_bar=1, sigma_bar=0`` is the
clean distribution.
"""

from __future__ import annotations

import math

import torch

from ..validation import check_number

TOY_DATASETS = ("checkerboard", "8gaussians", "2spirals")

# Lower-left corners (x, y) of the eight black unit squares of the 4x4 board on [-2, 2]^2: floor(x) + floor(y) odd.
CHECKERBOARD_CORNERS = ((-2, -1), (-2, 1), (-1, -2), (-1, 0), (0, -1), (0, 1), (1, -2), (1, 0))
EIGHT_GAUSSIANS_RADIUS = 1.5
EIGHT_GAUSSIANS_STD = 0.15
SPIRAL_TURNS = 1.5
SPIRAL_NOISE = 0.05
# Every dataset lies (up to far Gaussian tails) in [-TOY_BOUND, TOY_BOUND]^2 before ``scale``.
TOY_BOUND = 2.0


def _check_request(num_samples: int, scale: float) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}.")
    if not check_number(scale, "scale") > 0:
        raise ValueError(f"`scale` must be positive, got {scale!r}.")


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def checkerboard(num_samples: int, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
    """Uniform points on the 8 black squares of a 4x4 checkerboard on [-2, 2]^2, times ``scale``; shape (N, 2)."""
    _check_request(num_samples, scale)
    device = _device(generator)
    corners = torch.tensor(CHECKERBOARD_CORNERS, dtype=torch.float32, device=device)
    index = torch.randint(0, len(CHECKERBOARD_CORNERS), (num_samples,), generator=generator, device=device)
    offsets = torch.rand(num_samples, 2, generator=generator, device=device)
    return (corners[index] + offsets) * scale


def _eight_gaussians_centres(device: torch.device) -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float32, device=device) * (math.pi / 4)
    return EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)


def eight_gaussians(num_samples: int, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
    """An equal mixture of 8 isotropic Gaussians (std 0.15) on a circle of radius 1.5, times ``scale``; (N, 2)."""
    _check_request(num_samples, scale)
    device = _device(generator)
    index = torch.randint(0, 8, (num_samples,), generator=generator, device=device)
    noise = torch.randn(num_samples, 2, generator=generator, device=device)
    return (_eight_gaussians_centres(device)[index] + EIGHT_GAUSSIANS_STD * noise) * scale


def two_spirals(num_samples: int, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
    """Two interleaved Archimedean spirals (1.5 turns, radius up to 1.8) with Gaussian jitter, times ``scale``."""
    _check_request(num_samples, scale)
    device = _device(generator)
    max_angle = 2 * math.pi * SPIRAL_TURNS
    # sqrt makes the points roughly uniform along the curve (its length grows with the angle).
    angle = torch.rand(num_samples, generator=generator, device=device).sqrt() * max_angle
    radius = 1.8 * angle / max_angle
    points = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    sign = torch.randint(0, 2, (num_samples, 1), generator=generator, device=device) * 2 - 1
    noise = torch.randn(num_samples, 2, generator=generator, device=device)
    return (sign * points + SPIRAL_NOISE * noise) * scale


TOY_SAMPLERS = {"checkerboard": checkerboard, "8gaussians": eight_gaussians, "2spirals": two_spirals}


def _check_name(name: str) -> None:
    if name not in TOY_DATASETS:
        raise ValueError(f"`name` must be one of {TOY_DATASETS}, got {name!r}.")


def sample_toy(
    name: str, num_samples: int, generator: torch.Generator | None = None, scale: float = 1.0
) -> torch.Tensor:
    """``num_samples`` points of the toy dataset ``name`` (one of ``TOY_DATASETS``), shape (N, 2)."""
    _check_name(name)
    return TOY_SAMPLERS[name](num_samples, generator=generator, scale=scale)


def has_density(name: str) -> bool:
    """Whether ``toy_log_density`` knows the density of ``name`` (the spirals have no closed form)."""
    _check_name(name)
    return name != "2spirals"


def _check_points(points: torch.Tensor) -> None:
    if not isinstance(points, torch.Tensor) or not points.is_floating_point():
        raise TypeError("`points` must be a floating-point torch.Tensor.")
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"`points` must have shape (N, 2), got {tuple(points.shape)}.")


def toy_log_density(
    name: str, points: torch.Tensor, scale: float = 1.0, alpha_bar: float = 1.0, sigma_bar: float = 0.0
) -> torch.Tensor:
    r"""log p(x_k) at ``points`` for x_k = alpha_bar * x + sigma_bar * eps, x from the scaled dataset; shape (N,).

    The checkerboard is a mixture of 8 uniform squares Q = [a, b]^2 (side ``scale``); each noisy square has the
    separable density prod_d [Phi((x_d - alpha_bar a_d) / sigma_bar) - Phi((x_d - alpha_bar b_d) / sigma_bar)]
    / (alpha_bar^2 |Q|), and at ``sigma_bar=0`` the density is 1 / (8 |Q| alpha_bar^2) on the black squares and 0
    (log: -inf) elsewhere. The 8 Gaussians stay a Gaussian mixture with means alpha_bar mu_i and variance
    alpha_bar^2 s^2 + sigma_bar^2.
    """
    _check_name(name)
    _check_points(points)
    if not has_density(name):
        raise ValueError(f"The density of {name!r} has no closed form; use a sample-based distance instead.")
    if not alpha_bar > 0 or sigma_bar < 0:
        raise ValueError(f"Need `alpha_bar` > 0 and `sigma_bar` >= 0, got {alpha_bar} and {sigma_bar}.")
    points = points.double()
    if name == "8gaussians":
        means = alpha_bar * scale * _eight_gaussians_centres(points.device).double()
        variance = (alpha_bar * scale * EIGHT_GAUSSIANS_STD) ** 2 + sigma_bar**2
        squared = (points[:, None, :] - means[None]).pow(2).sum(-1)
        log_components = -0.5 * squared / variance - math.log(2 * math.pi * variance)
        return (torch.logsumexp(log_components, dim=1) - math.log(8)).float()
    corners = torch.tensor(CHECKERBOARD_CORNERS, dtype=torch.float64, device=points.device) * scale * alpha_bar
    side = scale * alpha_bar
    log_norm = -math.log(8 * side**2)
    if sigma_bar == 0:
        inside = ((points[:, None, :] >= corners[None]) & (points[:, None, :] < corners[None] + side)).all(-1)
        return torch.where(inside.any(1), log_norm, -math.inf).float()
    # Per square and axis, P(a <= (x - sigma_bar eps) < b) in the log domain (log_ndtr keeps far tails finite).
    upper = (points[:, None, :] - corners[None]) / sigma_bar
    lower = (points[:, None, :] - corners[None] - side) / sigma_bar
    log_mass = _log_ndtr_difference(upper, lower).sum(-1)
    return (torch.logsumexp(log_mass, dim=1) + log_norm).float()


def _log_ndtr_difference(upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """log(Phi(upper) - Phi(lower)) for upper > lower, accurate in both tails (Phi(u) - Phi(l) = Phi(-l) - Phi(-u))."""
    flip = (upper + lower) > 0
    high = torch.where(flip, -lower, upper)
    low = torch.where(flip, -upper, lower)
    log_high, log_low = torch.special.log_ndtr(high), torch.special.log_ndtr(low)
    return log_high + torch.log1p(-torch.exp(log_low - log_high))


def toy_support(name: str, points: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Boolean mask (N,): on a black square (checkerboard) or within 3 std of a centre (8 Gaussians)."""
    _check_name(name)
    _check_points(points)
    if name == "2spirals":
        raise ValueError("The spirals have no support test; use a sample-based distance instead.")
    points = points / scale
    if name == "8gaussians":
        distance = torch.cdist(points.float(), _eight_gaussians_centres(points.device))
        return (distance <= 3 * EIGHT_GAUSSIANS_STD).any(1)
    cells = torch.floor(points)
    inside = (cells >= -2).all(1) & (cells <= 1).all(1)
    return inside & ((cells.sum(1).long() % 2) == 1)
