import math

import pytest
import torch

from cdrl_diffusers.training import DivergenceError, TrainingHealthMonitor

NUM_LEVELS = 6


def healthy_metrics(step: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-level statistics of a healthy run: small noisy gaps, a slowly falling initializer loss, one absent level."""
    gaps = 0.01 * torch.randn(NUM_LEVELS, generator=generator, dtype=torch.float64)
    losses = (1.0 + 1.0 / (1 + step / 100)) * (1 + 0.1 * torch.rand(NUM_LEVELS, generator=generator))
    gaps[step % NUM_LEVELS] = math.nan
    return {"neg_energy_gap": gaps.float(), "initializer_loss": losses.float()}


def run(monitor: TrainingHealthMonitor, steps: range, explode_gap_from: int | None = None) -> None:
    generator = torch.Generator().manual_seed(0)
    for step in steps:
        metrics = healthy_metrics(step, generator)
        if explode_gap_from is not None and step >= explode_gap_from:
            # The level-0 gap of a diverging run: it doubles every 25 steps while the losses stay finite.
            metrics["neg_energy_gap"][0] = 0.02 * 2 ** ((step - explode_gap_from) / 25)
        monitor.update(step, metrics, {"ebm": 0.5, "initializer": 1.0})


def test_healthy_run_passes_and_summary_lists_every_statistic():
    monitor = TrainingHealthMonitor(NUM_LEVELS)
    run(monitor, range(1, 3001))
    summary = monitor.summary()
    assert set(summary) == (
        {f"neg_energy_gap/level_{t}" for t in range(NUM_LEVELS)}
        | {f"initializer_loss/level_{t}" for t in range(NUM_LEVELS)}
        | {"grad_norm/ebm", "grad_norm/initializer"}
    )
    assert all(math.isfinite(value) for value in summary.values())
    assert summary["grad_norm/ebm"] == pytest.approx(0.5)


def test_exploding_level0_gap_trips_early_with_a_clear_message():
    monitor = TrainingHealthMonitor(NUM_LEVELS)
    with pytest.raises(DivergenceError) as error:
        run(monitor, range(1, 3001), explode_gap_from=1000)
    message = str(error.value)
    assert "level 0" in message and "f_hat gap" in message
    step = int(message.split()[1].rstrip(":"))
    # Well before the gap reaches the absolute limit (10, at step ~1225): the growth test fires first.
    assert 1000 < step < 1200
    value = float(message.split(" is ")[1].split(",")[0])
    assert 0.5 < value < 10


def test_absolute_gap_limit_and_non_finite_values_stop_at_once():
    monitor = TrainingHealthMonitor(NUM_LEVELS, max_neg_energy_gap=1.0)
    metrics = {"neg_energy_gap": torch.full((NUM_LEVELS,), 0.01), "initializer_loss": torch.ones(NUM_LEVELS)}
    monitor.update(1, metrics, {"ebm": 1.0})
    metrics["neg_energy_gap"][3] = 2.0
    with pytest.raises(DivergenceError, match=r"Step 2: .*level 3 is 2"):
        TrainingHealthMonitor(NUM_LEVELS, max_neg_energy_gap=1.0).update(2, metrics, {"ebm": 1.0})
    metrics["neg_energy_gap"][3] = 0.01
    with pytest.raises(DivergenceError, match=r"Step 3: the gradient norm at network 'ebm' is inf"):
        monitor.update(3, metrics, {"ebm": math.inf})


def test_rising_initializer_loss_trips():
    monitor = TrainingHealthMonitor(NUM_LEVELS, warmup_updates=10)
    metrics = {"neg_energy_gap": torch.zeros(NUM_LEVELS), "initializer_loss": torch.ones(NUM_LEVELS)}
    for step in range(1, 600):
        monitor.update(step, metrics, {})
    metrics["initializer_loss"][2] = 100.0
    with pytest.raises(DivergenceError, match=r"initializer loss .* level 2"):
        for step in range(600, 700):
            monitor.update(step, metrics, {})


def test_forget_restarts_a_statistic_whose_objective_changed():
    monitor = TrainingHealthMonitor(NUM_LEVELS, warmup_updates=10)
    metrics = {"neg_energy_gap": torch.zeros(NUM_LEVELS), "initializer_loss": torch.ones(NUM_LEVELS)}
    for step in range(1, 600):
        monitor.update(step, metrics, {})
    monitor.forget("initializer_loss")  # e.g. a new regression target, with losses 100 times larger
    assert "initializer_loss/level_0" not in monitor.summary() and "neg_energy_gap/level_0" in monitor.summary()
    metrics["initializer_loss"] = torch.full((NUM_LEVELS,), 100.0)
    for step in range(600, 700):
        monitor.update(step, metrics, {})
    assert monitor.summary()["initializer_loss/level_2"] == pytest.approx(100.0)
    metrics["initializer_loss"][2] = 1e4  # and growth from the new level still trips
    with pytest.raises(DivergenceError, match=r"initializer loss .* level 2"):
        for step in range(700, 800):
            monitor.update(step, metrics, {})
    with pytest.raises(ValueError, match="statistic"):
        monitor.forget("loss")


def test_state_dict_round_trip_resumes_exactly():
    first = TrainingHealthMonitor(NUM_LEVELS, gap_growth=8.0)
    run(first, range(1, 800))
    second = TrainingHealthMonitor(NUM_LEVELS)
    second.load_state_dict(first.state_dict())
    assert second.thresholds["gap_growth"] == 8.0
    assert second.summary() == first.summary()
    for monitor in (first, second):
        run(monitor, range(800, 900))
    assert second.state_dict() == first.state_dict()
    with pytest.raises(ValueError, match="levels"):
        TrainingHealthMonitor(3).load_state_dict(first.state_dict())


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_levels"):
        TrainingHealthMonitor(0)
    with pytest.raises(TypeError, match="Unknown thresholds"):
        TrainingHealthMonitor(NUM_LEVELS, max_gap=1.0)
    with pytest.raises(ValueError, match="gap_growth"):
        TrainingHealthMonitor(NUM_LEVELS, gap_growth=-1.0)
    monitor = TrainingHealthMonitor(NUM_LEVELS)
    with pytest.raises(ValueError, match="initializer_loss"):
        monitor.update(1, {"neg_energy_gap": torch.zeros(NUM_LEVELS)}, {})
    with pytest.raises(ValueError, match="shape"):
        monitor.update(1, {"neg_energy_gap": torch.zeros(3), "initializer_loss": torch.zeros(3)}, {})
