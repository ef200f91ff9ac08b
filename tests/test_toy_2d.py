"""examples/toy_2d.py: a short CPU run of the 2-D density experiment (Fig. 1) must clearly beat the untrained model."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cdrl_diffusers import CDRLScheduler, EnergyMLP, InitializerMLP

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toy_2d.py"


def load_example():
    spec = importlib.util.spec_from_file_location("toy_2d", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module while the file executes
    spec.loader.exec_module(module)
    return module


toy_2d = load_example()

# A reduced configuration: narrower networks, fewer Langevin steps, a coarser evaluation than the defaults, and the
# checkerboard at half the size (scale 2), whose squares 400 steps learn more clearly.
CI_CONFIG = toy_2d.ToyConfig(
    data_scale=2.0,
    lr_decay="constant",
    num_train_steps=400,
    batch_size=256,
    warmup_steps=100,
    ebm_learning_rate=3e-4,
    initializer_learning_rate=3e-4,
    ema_decay=0.99,
    energy_hidden_dim=64,
    energy_num_layers=2,
    energy_embedding_dim=64,
    initializer_hidden_dim=64,
    initializer_num_layers=2,
    num_langevin_steps=8,
    sampling_langevin_steps=16,
    log_every=100,
    num_eval_samples=2000,
    grid_resolution=100,
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The example's ``main`` on the CI configuration: trains, saves, plots and writes the metrics."""
    output_dir = tmp_path_factory.mktemp("toy_2d")
    torch.manual_seed(0)
    args = [f"--{name}={value}" for name, value in vars(CI_CONFIG).items()]
    result = toy_2d.main([*args, f"--output_dir={output_dir}", "--no_progress"])
    return output_dir, result


def test_short_training_clearly_beats_the_untrained_model(trained_run):
    _, result = trained_run
    untrained = toy_2d.evaluate_toy(toy_2d.build_models(CI_CONFIG), CI_CONFIG).metrics
    trained = result["metrics"]
    assert trained["kl_true_model"] < 0.5 * untrained["kl_true_model"]
    assert trained["in_support_fraction"] > untrained["in_support_fraction"] + 0.25
    assert trained["in_support_fraction_trained_k"] > untrained["in_support_fraction_trained_k"] + 0.2
    assert trained["mmd"] < 0.5 * untrained["mmd"]
    assert trained["sliced_wasserstein"] < 0.5 * untrained["sliced_wasserstein"]
    assert len(trained["kl_per_level"]) == CI_CONFIG.num_noise_levels
    assert trained["in_support_fraction_data"] == 1.0


def test_the_run_saves_models_figure_and_metrics(trained_run):
    output_dir, result = trained_run
    energy_model = EnergyMLP.from_pretrained(output_dir / "energy_model")
    initializer = InitializerMLP.from_pretrained(output_dir / "initializer")
    scheduler = CDRLScheduler.from_pretrained(output_dir / "scheduler")
    assert scheduler.config.langevin_step_size_rule == "toy" and scheduler.config.clip_sample is False
    # Pair 0 has its own step-size constant; the others share the authors' c.
    assert list(scheduler.config.langevin_step_size_scale) == [CI_CONFIG.level0_langevin_step_size_scale] + [
        CI_CONFIG.langevin_step_size_scale
    ] * (CI_CONFIG.num_noise_levels - 1)
    assert energy_model.config.hidden_dim == CI_CONFIG.energy_hidden_dim
    assert initializer.config.num_layers == CI_CONFIG.initializer_num_layers
    evaluation = toy_2d.evaluate_toy(toy_2d.ToyModels(energy_model, initializer, scheduler), CI_CONFIG)
    assert evaluation.metrics["kl_true_model"] == pytest.approx(result["metrics"]["kl_true_model"], rel=1e-4)
    # The figure's true-density row: each level's exact density, normalised on the grid.
    assert len(evaluation.true_densities) == CI_CONFIG.num_noise_levels
    assert all(density.sum().item() == pytest.approx(1.0, abs=1e-4) for density in evaluation.true_densities)

    assert (output_dir / "toy_2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((output_dir / "metrics.json").read_text())
    assert saved["metrics"]["kl_true_model"] == result["metrics"]["kl_true_model"]
    assert saved["config"]["num_train_steps"] == CI_CONFIG.num_train_steps
    log = saved["training_log"]
    assert log["steps"] == [100, 200, 300, 400]
    assert all(len(gaps) == CI_CONFIG.num_noise_levels for gaps in log["neg_energy_gap"])
    assert all(math.isfinite(value) for value in log["ebm_loss"] + log["initializer_loss"])


def test_divergence_is_reported_not_silent(monkeypatch, capsys):
    config = replace(CI_CONFIG, num_train_steps=3, log_every=1)
    calls = {"count": 0}

    def poisoned(name, num_samples, generator=None, scale=1.0):
        calls["count"] += 1
        fill = 3e38 if calls["count"] == 3 else 0.5  # finite data whose energies overflow
        return torch.full((num_samples, 2), fill)

    monkeypatch.setattr(toy_2d, "sample_toy", poisoned)
    with pytest.raises(toy_2d.DivergenceError, match="Step 3: non-finite loss"):
        toy_2d.train_toy(config, progress=False)
    assert "f_hat gap per level" in capsys.readouterr().out


def test_exploding_but_finite_energies_stop_training():
    config = replace(CI_CONFIG, num_train_steps=3, log_every=1, max_neg_energy_gap=1e-12)
    with pytest.raises(toy_2d.DivergenceError, match=r"Step 1: the \|f_hat gap\| \(fast average\) at level \d"):
        toy_2d.train_toy(config, progress=False, log=False)


def test_time_budget_ends_training_early():
    config = replace(CI_CONFIG, num_train_steps=10**6, max_train_minutes=0.01, lr_decay="cosine")
    _, history = toy_2d.train_toy(config, progress=False, log=False)
    assert 0 < history.num_steps < 10**6
    assert history.seconds < 0.01 * 60 + 5


def test_seeds_mode_reports_mean_and_spread(tmp_path):
    tiny = replace(CI_CONFIG, num_train_steps=2, num_eval_samples=64, grid_resolution=16, log_every=1)
    args = [f"--{name}={value}" for name, value in vars(tiny).items()]
    result = toy_2d.main([*args, f"--output_dir={tmp_path}", "--no_progress", "--seeds", "3", "4"])
    assert result["seeds"] == [3, 4] and set(result["runs"]) == {3, 4}
    assert [run["config"]["seed"] for run in result["runs"].values()] == [3, 4]
    kls = [run["metrics"]["kl_true_model"] for run in result["runs"].values()]
    summary = result["summary"]["kl_true_model"]
    assert summary["mean"] == pytest.approx(sum(kls) / 2)
    assert summary["std"] == pytest.approx(abs(kls[0] - kls[1]) / math.sqrt(2))
    assert (summary["min"], summary["max"]) == (min(kls), max(kls))
    assert len([name for name in result["summary"] if name.startswith("kl_level_")]) == tiny.num_noise_levels
    assert (tmp_path / "seed_4" / "energy_model").is_dir() and (tmp_path / "seed_3" / "toy_2d.png").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["summary"]["kl_true_model"] == summary


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="dataset"):
        toy_2d.ToyConfig(dataset="moons")
    with pytest.raises(ValueError, match="mixed_precision"):
        toy_2d.ToyConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="lr_decay"):
        toy_2d.ToyConfig(lr_decay="exponential")
    with pytest.raises(ValueError, match="final_lr_fraction"):
        toy_2d.ToyConfig(final_lr_fraction=1.5)
    with pytest.raises(ValueError, match="max_train_minutes"):
        toy_2d.ToyConfig(max_train_minutes=0)
    with pytest.raises(ValueError, match="level0_sampling_weight"):
        toy_2d.ToyConfig(level0_sampling_weight=0.0)
    config, _ = toy_2d.parse_args(["--num_train_steps", "123", "--seed", "3", "--lr_decay", "cosine"])
    assert (config.num_train_steps, config.seed, config.lr_decay) == (123, 3, "cosine")
    assert config.batch_size == toy_2d.ToyConfig().batch_size  # everything else keeps its default
