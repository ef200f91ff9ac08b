"""Densities on a 2-D grid and sample distances: measuring what a CDRL model learns on the toy problems (Fig. 1).

On two dimensions the partition function of exp(f_theta) can be computed numerically: the grid below turns the
unnormalised log-density of an EBM into a distribution over grid cells, which can be compared with the true density
(KL) while the generated samples are compared with held-out data (support fraction, MMD, sliced Wasserstein).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..data.toy2d import toy_support
from ..sampling import frozen
from ..schedulers.scheduling_cdrl import CDRLScheduler
from ..validation import check_finite


@dataclass(frozen=True)
class DensityGrid:
    """Cell centres of a ``resolution`` x ``resolution`` grid of equal cells covering [-bound, bound]^2.

    Args:
        bound: half-width of the square.
        resolution: cells per axis.
        coordinates: the cell centres along one axis, shape (resolution,).
        points: all cell centres, shape (resolution^2, 2), row-major with y along the rows: point
            ``i * resolution + j`` is (coordinates[j], coordinates[i]), so ``values.view(resolution, resolution)`` is
            an image for ``imshow(origin="lower")``.
    """

    bound: float
    resolution: int
    coordinates: torch.Tensor
    points: torch.Tensor

    @property
    def cell_area(self) -> float:
        return (2 * self.bound / self.resolution) ** 2

    def as_image(self, values: torch.Tensor) -> torch.Tensor:
        """Per-point values (resolution^2,) as a (resolution, resolution) image, y along the rows."""
        return values.reshape(self.resolution, self.resolution)


def density_grid(bound: float, resolution: int = 200) -> DensityGrid:
    """A cell-centred grid on [-bound, bound]^2 (``DensityGrid``)."""
    if not bound > 0:
        raise ValueError(f"`bound` must be positive, got {bound!r}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"`resolution` must be an integer >= 2, got {resolution!r}.")
    width = 2 * bound / resolution
    coordinates = -bound + width * (torch.arange(resolution, dtype=torch.float64) + 0.5)
    grid_y, grid_x = torch.meshgrid(coordinates, coordinates, indexing="ij")
    points = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1).float()
    return DensityGrid(bound=float(bound), resolution=resolution, coordinates=coordinates.float(), points=points)


def energy_log_density(
    energy_model: nn.Module,
    scheduler: CDRLScheduler,
    points: torch.Tensor,
    noise_level: int = 0,
    class_labels: torch.Tensor | None = None,
    batch_size: int = 8192,
) -> torch.Tensor:
    r"""Unnormalised log-density f_theta(input_scale_t x; t) = f_hat / s_t^2 of vectors x at level t, shape (N,).

    The convention of ``CDRLPipeline.log_density`` (Sec. 4.4, App. A.2) for vector data: the EBM of pair t scores
    the chain variable y_t = input_scale_t x_t, and ``CDRLScheduler.log_density`` divides by s_t^2. As a function of
    x it is the log-density of the marginal of x_t up to a constant (the scaling's Jacobian is constant).

    Args:
        energy_model: an EBM for vectors (``EnergyMLP``).
        scheduler: the ``CDRLScheduler`` it was trained with.
        points: data-space vectors x_t, shape (N, D).
        noise_level: the pair t, 0..T-1; 0 is the (slightly noisy) data level.
        class_labels: optional labels (N,) of a conditional model; ``None`` is the unconditional density.
        batch_size: points per forward pass.
    """
    if not isinstance(points, torch.Tensor) or not points.is_floating_point() or points.ndim != 2:
        raise TypeError("`points` must be a floating-point tensor of shape (N, D).")
    check_finite(points, "points")
    if isinstance(noise_level, bool) or not isinstance(noise_level, int):
        raise TypeError(f"`noise_level` must be an int, got {type(noise_level).__name__}.")
    if not 0 <= noise_level < scheduler.num_noise_levels:
        raise ValueError(f"`noise_level` must lie in [0, {scheduler.num_noise_levels - 1}], got {noise_level}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    device = next(energy_model.parameters()).device
    logsnr = scheduler.energy_logsnr(noise_level, device=device)
    scores = []
    with frozen(energy_model), torch.no_grad():
        for start in range(0, points.shape[0], batch_size):
            chunk = scheduler.to_chain_space(points[start : start + batch_size].to(device).float(), noise_level)
            labels = None if class_labels is None else class_labels[start : start + batch_size].to(device)
            neg_energy = energy_model(chunk, logsnr, class_labels=labels).neg_energy.float()
            scores.append(scheduler.log_density(neg_energy, noise_level))
    return torch.cat(scores).cpu()


def grid_log_probabilities(log_density: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the cells of an equal-cell grid from (unnormalised) log-densities at their centres.

    The density is normalised numerically: p_i = exp(l_i) / sum_j exp(l_j) (the cell area cancels). Cells with
    log-density -inf get probability 0; mass outside the grid is not counted.
    """
    log_density = log_density.double().flatten()
    if torch.isnan(log_density).any() or not torch.isfinite(log_density).any():
        raise ValueError("`log_density` must have no NaN and at least one finite value.")
    return torch.log_softmax(log_density, dim=0)


def kl_divergence_on_grid(true_log_density: torch.Tensor, model_log_density: torch.Tensor) -> float:
    r"""KL(true || model) in nats between two densities, each normalised over the same grid cells.

    sum_i p_i (log p_i - log q_i) over the cells with p_i > 0; it is infinite where the model puts no mass on a cell
    the true density covers.
    """
    if true_log_density.shape != model_log_density.shape:
        raise ValueError(
            f"Both log-densities must cover the same grid, got shapes {tuple(true_log_density.shape)} and "
            f"{tuple(model_log_density.shape)}."
        )
    log_p = grid_log_probabilities(true_log_density)
    log_q = grid_log_probabilities(model_log_density)
    support = log_p > -math.inf
    return float((log_p[support].exp() * (log_p[support] - log_q[support])).sum())


def fraction_in_support(samples: torch.Tensor, name: str, scale: float = 1.0) -> float:
    """Fraction of ``samples`` (N, 2) in the support of the toy dataset ``name`` (``toy_support``)."""
    return float(toy_support(name, samples.detach().cpu().float(), scale).float().mean())


def _check_sample_sets(first: torch.Tensor, second: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, value in (("first", first), ("second", second)):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.ndim != 2:
            raise TypeError(f"`{name}` must be a floating-point tensor of shape (N, D).")
        if value.shape[0] < 2:
            raise ValueError(f"`{name}` must hold at least 2 samples, got {value.shape[0]}.")
    if first.shape[1] != second.shape[1]:
        raise ValueError(f"Both sample sets must have the same dimension, got {first.shape[1]} and {second.shape[1]}.")
    return first.detach().cpu().double(), second.detach().cpu().double()


def sliced_wasserstein_distance(
    first: torch.Tensor,
    second: torch.Tensor,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    r"""Sliced 2-Wasserstein distance: sqrt(E_theta W_2^2(theta^T first, theta^T second)) over random directions.

    Each 1-D W_2 compares the two projected sets' quantiles at the same ``min(N, M)`` probability levels, so the sets
    may differ in size.
    """
    first, second = _check_sample_sets(first, second)
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"`num_projections` must be a positive integer, got {num_projections!r}.")
    directions = torch.randn(first.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    count = min(first.shape[0], second.shape[0])
    levels = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    quantiles = [torch.quantile(values @ directions, levels, dim=0) for values in (first, second)]
    return float((quantiles[0] - quantiles[1]).pow(2).mean().sqrt())


def mmd_rbf(
    first: torch.Tensor,
    second: torch.Tensor,
    bandwidths: Sequence[float] | None = None,
    max_samples: int | None = 2000,
    chunk_size: int = 1024,
) -> float:
    r"""Squared maximum mean discrepancy (biased V-statistic) with a sum of Gaussian kernels exp(-|x-y|^2 / (2 h^2)).

    MMD^2 = mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y); it is 0 for identical sets. Without ``bandwidths``, h runs
    over (0.25, 0.5, 1, 2, 4) times the median distance between the pooled points (of at most 2,000 of them).
    Only the first ``max_samples`` points of each set enter (``None``: all; the cost grows with the product of the
    set sizes); kernel sums are accumulated in chunks.
    """
    first, second = _check_sample_sets(first, second)
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
            raise ValueError(f"`max_samples` must be an integer >= 2 or None, got {max_samples!r}.")
        first, second = first[:max_samples], second[:max_samples]
    if bandwidths is None:
        pooled = torch.cat([first[:1000], second[:1000]])
        median = torch.pdist(pooled).median().clamp_min(1e-12)
        bandwidths = [factor * float(median) for factor in (0.25, 0.5, 1.0, 2.0, 4.0)]
    if len(bandwidths) == 0 or not all(h > 0 for h in bandwidths):
        raise ValueError(f"`bandwidths` must be positive, got {list(bandwidths)}.")
    scales = [-0.5 / h**2 for h in bandwidths]

    def mean_kernel(left: torch.Tensor, right: torch.Tensor) -> float:
        total = 0.0
        for start in range(0, left.shape[0], chunk_size):
            squared = torch.cdist(left[start : start + chunk_size], right).pow(2)
            total += sum(float(torch.exp(squared * scale).sum()) for scale in scales)
        return total / (left.shape[0] * right.shape[0])

    return mean_kernel(first, first) + mean_kernel(second, second) - 2 * mean_kernel(first, second)
