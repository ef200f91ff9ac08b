"""Catch a diverging CDRL run early: per-level statistics of Algorithm 1 watched while training runs.

A CDRL run can diverge with finite losses for thousands of steps: one level's EBM starts scoring data ever higher
than its own Langevin samples (its f_hat gap grows), its chains fall behind, the initializer's regression target
moves away (its loss rises), and only much later do the energies overflow. ``TrainingHealthMonitor`` follows the
per-level diagnostics of ``cdrl_training_step`` with a fast and a slow moving average each and raises a
``DivergenceError`` when a statistic leaves its healthy range, long before the losses become NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..validation import check_positive_int

THRESHOLDS = {
    # Largest healthy |f_hat gap| of any level (fast average), in the network's output units.
    "max_neg_energy_gap": 10.0,
    # Growth tests: a statistic's fast average may grow to this multiple of its baseline, the smallest slow average
    # seen since the warm-up (but at least the floor, where one is given).
    "gap_growth": 10.0,
    "gap_floor": 0.05,
    "initializer_loss_growth": 4.0,
    "grad_norm_growth": 50.0,
    "grad_norm_floor": 1.0,
    # Averaging windows, in updates, and the number of updates before the growth tests start.
    "fast_window": 20,
    "slow_window": 500,
    "warmup_updates": 200,
}

STATISTICS = {"gap": "|f_hat gap|", "initializer_loss": "initializer loss", "grad_norm": "gradient norm"}


class DivergenceError(FloatingPointError):
    """Training diverged: the message names the step, the level (or network), the statistic and its value."""


class TrainingHealthMonitor:
    """Per-level health of a CDRL run (Algorithm 1), fed once per training step.

    It watches, for every level t, the f_hat gap f_hat(y_t^+) - f_hat(y_tilde_t) (the EBM's margin between data and
    its own samples) and the initializer loss (Eq. 8), and the gradient norms of both networks:

    - a non-finite statistic, or a fast-averaged |f_hat gap| above ``max_neg_energy_gap``, stops at once;
    - after ``warmup_updates`` updates, each statistic's fast average (window ``fast_window``) is compared with its
      baseline, the smallest slow average (window ``slow_window``) seen since: a |f_hat gap| above ``gap_growth``
      times its baseline (at least ``gap_floor``), an initializer loss above ``initializer_loss_growth`` times its
      baseline, or a gradient norm above ``grad_norm_growth`` times its baseline (at least ``grad_norm_floor``)
      stops too.

    Args:
        num_levels: T, the number of EBM levels (pairs).
        **thresholds: overrides of ``THRESHOLDS`` (e.g. ``max_neg_energy_gap=1.0``).
    """

    def __init__(self, num_levels: int, **thresholds: float):
        check_positive_int(num_levels, "num_levels")
        unknown = sorted(set(thresholds) - set(THRESHOLDS))
        if unknown:
            raise TypeError(f"Unknown thresholds {unknown}; the thresholds are {sorted(THRESHOLDS)}.")
        for name, value in thresholds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        self.num_levels = num_levels
        self.thresholds = {**THRESHOLDS, **thresholds}
        self.num_updates = 0
        self.last_step: int | None = None
        # Per statistic: fast and slow moving averages (NaN until first seen), per level or per network.
        self._fast: dict[str, list[float]] = {}
        self._slow: dict[str, list[float]] = {}
        # Per statistic: the smallest slow average seen after the warm-up (the healthy baseline).
        self._baseline: dict[str, list[float]] = {}

    def update(self, step: int, level_metrics: Mapping[str, torch.Tensor], grad_norms: Mapping[str, float]) -> None:
        """Feed one step's ``CDRLTrainingOutput.level_metrics`` and gradient norms; raise ``DivergenceError`` if sick.

        Args:
            step: the training step (for the message).
            level_metrics: per-level tensors of shape (num_levels,) with ``neg_energy_gap`` and ``initializer_loss``;
                NaN marks a level absent from the batch and is skipped.
            grad_norms: gradient norms by network name (e.g. ``{"ebm": ..., "initializer": ...}``), before clipping.
        """
        for name in ("neg_energy_gap", "initializer_loss"):
            if name not in level_metrics:
                raise ValueError(f"`level_metrics` must contain {name!r}, got {sorted(level_metrics)}.")
            if tuple(level_metrics[name].shape) != (self.num_levels,):
                raise ValueError(
                    f"`level_metrics[{name!r}]` must have shape ({self.num_levels},), "
                    f"got {tuple(level_metrics[name].shape)}."
                )
        limits = self.thresholds
        self.num_updates += 1
        self.last_step = step

        gaps = level_metrics["neg_energy_gap"].detach().double().abs().cpu().tolist()
        losses = level_metrics["initializer_loss"].detach().double().cpu().tolist()
        for level in range(self.num_levels):
            where = f"level {level}"
            if not math.isnan(gaps[level]):
                fast = self._watch(step, where, "neg_energy_gap", level, self.num_levels, gaps[level], "gap")
                if fast > limits["max_neg_energy_gap"]:
                    self._fail(step, where, "|f_hat gap| (fast average)", fast, limits["max_neg_energy_gap"])
            if not math.isnan(losses[level]):
                self._watch(step, where, "initializer_loss", level, self.num_levels, losses[level], "initializer_loss")
        for name, norm in grad_norms.items():
            self._watch(step, f"network {name!r}", f"grad_norm/{name}", 0, 1, float(norm), "grad_norm")

    def _watch(self, step: int, where: str, key: str, index: int, size: int, value: float, test: str) -> float:
        """Average ``value`` into statistic ``key`` and run its growth test; returns the fast average."""
        statistic = STATISTICS[test]
        if not math.isfinite(value):
            raise DivergenceError(f"Step {step}: the {statistic} at {where} is {value}.")
        fast = self._fast.setdefault(key, [math.nan] * size)
        slow = self._slow.setdefault(key, [math.nan] * size)
        for averages, window in ((fast, self.thresholds["fast_window"]), (slow, self.thresholds["slow_window"])):
            decay = 1.0 - 1.0 / max(window, 1.0)
            previous = averages[index]
            averages[index] = value if math.isnan(previous) else decay * previous + (1.0 - decay) * value
        if self.num_updates > self.thresholds["warmup_updates"]:
            baseline = self._baseline.setdefault(key, [math.inf] * size)
            limit = self.thresholds[f"{test}_growth"] * max(baseline[index], self.thresholds.get(f"{test}_floor", 0.0))
            if fast[index] > limit:
                self._fail(step, where, f"{statistic} (fast average)", fast[index], limit)
            baseline[index] = min(baseline[index], slow[index])
        return fast[index]

    def forget(self, statistic: str) -> None:
        """Drop the averages and baselines of ``statistic`` (``"neg_energy_gap"``, ``"initializer_loss"`` or
        ``"grad_norm"``), e.g. when the training objective behind it changes; they restart from the next update."""
        if statistic not in ("neg_energy_gap", "initializer_loss", "grad_norm"):
            raise ValueError(
                f"`statistic` must be 'neg_energy_gap', 'initializer_loss' or 'grad_norm', got {statistic!r}."
            )
        for store in (self._fast, self._slow, self._baseline):
            for key in [key for key in store if key == statistic or key.startswith(f"{statistic}/")]:
                del store[key]

    @staticmethod
    def _fail(step: int, where: str, statistic: str, value: float, limit: float) -> None:
        raise DivergenceError(
            f"Step {step}: the {statistic} at {where} is {value:.4g}, above its healthy limit {limit:.4g}; "
            "training is diverging. Lower the learning rates or lengthen the warm-up, and resume from an earlier "
            "checkpoint."
        )

    def summary(self) -> dict[str, float]:
        """The fast averages as scalars to log: ``neg_energy_gap/level_t``, ``initializer_loss/level_t``, ..."""
        scalars: dict[str, float] = {}
        for key, values in self._fast.items():
            if key.startswith("grad_norm/"):
                scalars[key] = values[0]
            else:
                scalars.update({f"{key}/level_{level}": value for level, value in enumerate(values)})
        return scalars

    def state_dict(self) -> dict:
        """Everything needed to resume monitoring exactly (plain Python values)."""
        return {
            "num_levels": self.num_levels,
            "thresholds": dict(self.thresholds),
            "num_updates": self.num_updates,
            "last_step": self.last_step,
            "fast": {key: list(values) for key, values in self._fast.items()},
            "slow": {key: list(values) for key, values in self._slow.items()},
            "baseline": {key: list(values) for key, values in self._baseline.items()},
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a ``state_dict``; the number of levels must match."""
        if state.get("num_levels") != self.num_levels:
            raise ValueError(
                f"`state` is for {state.get('num_levels')} levels, but this monitor watches {self.num_levels}."
            )
        self.thresholds = {**THRESHOLDS, **state["thresholds"]}
        self.num_updates = int(state["num_updates"])
        self.last_step = state["last_step"]
        self._fast = {key: list(values) for key, values in state["fast"].items()}
        self._slow = {key: list(values) for key, values in state["slow"].items()}
        self._baseline = {key: list(values) for key, values in state["baseline"].items()}
