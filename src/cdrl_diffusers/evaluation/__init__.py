"""Offline evaluation: densities on a grid, sample distances, feature-based metrics and OOD scores."""

from .ood import ood_auroc  # noqa: F401
