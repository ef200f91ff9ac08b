"""Offline evaluation: densities on a grid, sample distances, feature-based metrics and OOD scores."""
