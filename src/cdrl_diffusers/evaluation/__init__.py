"""Offline evaluation: densities on a grid, sample distances, feature-based metrics and OOD scores."""

from .ood import OOD_SHIFTS, ood_auroc, shift_images  # noqa: F401
