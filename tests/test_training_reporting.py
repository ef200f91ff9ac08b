"""cdrl_diffusers.training.reporting: tracker checks, per-level diagnostics, sample grids, exports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_pipeline
from huggingface_hub import ModelCard

from cdrl_diffusers import CDRLPipeline
from cdrl_diffusers.training import (
    LEVEL_METRICS,
    CDRLTrainingOutput,
    StepMetrics,
    check_tracker_available,
    data_grid,
    export_pipeline,
    reporting,
    sample_grid,
)


def test_a_missing_tracker_is_reported_before_training(monkeypatch):
    monkeypatch.setitem(reporting.TRACKERS, "tensorboard", (lambda: False, "tensorboard"))
    with pytest.raises(ImportError, match="`--logger tensorboard` needs tensorboard: `pip install tensorboard`"):
        check_tracker_available("tensorboard")
    monkeypatch.setitem(reporting.TRACKERS, "tensorboard", (lambda: True, "tensorboard"))
    check_tracker_available("tensorboard")
    with pytest.raises(ValueError, match="--logger"):
        check_tracker_available("mlflow")


def output(values: list[float], timesteps: list[int]) -> CDRLTrainingOutput:
    """A training-step output whose every per-level metric is ``values`` (NaN for absent levels)."""
    counts = torch.bincount(torch.tensor(timesteps), minlength=len(values))
    metrics = {name: torch.tensor(values) for name in LEVEL_METRICS}
    return CDRLTrainingOutput(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(timesteps), metrics, counts)


def test_step_metrics_average_micro_batches_per_level():
    metrics = StepMetrics(num_levels=3)
    metrics.add(output([1.0, math.nan, 3.0], [0, 2, 2]))  # level 0 once, level 2 twice
    metrics.add(output([4.0, math.nan, math.nan], [0]))
    logs, levels = metrics.reduce(Accelerator(cpu=True))
    assert levels["neg_energy_gap"][0].item() == pytest.approx(2.5) and levels["neg_energy_gap"][2].item() == 3.0
    assert math.isnan(levels["initializer_loss"][1].item())  # absent from the update
    assert logs["train/ebm_loss"] == pytest.approx((1 + 3 + 3 + 4) / 4)
    assert logs["level_0/proposal_distance"] == pytest.approx(2.5) and "level_1/ebm_loss" not in logs
    assert metrics.counts.sum() == 0  # started over


def test_sample_grid_shows_proposals_next_to_refined_samples():
    pipeline = tiny_pipeline(num_class_embeds=2, num_noise_levels=2)
    grid = sample_grid(pipeline, num_images=4, seed=0)
    assert grid.size == (2 * 2 * 64 + 32, 2 * 64)  # 2 columns (one per class), 2 rows, upscaled 8 -> 64, a gap
    left, right = grid.crop((0, 0, 128, 128)), grid.crop((160, 0, 288, 128))
    assert left.tobytes() != right.tobytes()  # Langevin refinement changes the proposals
    assert sample_grid(pipeline, num_images=4, seed=0).tobytes() == grid.tobytes()  # seeded


def test_export_pipeline_writes_the_grid_and_a_model_card(tmp_path):
    pipeline = tiny_pipeline(num_noise_levels=2)
    grid = sample_grid(pipeline, num_images=2)
    export_pipeline(pipeline, str(tmp_path / "out"), grid, {"Optimisation steps": 7}, dataset_name="cdrl-shapes")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "![samples](samples.png)" in card.text and "Optimisation steps | 7" in card.text
    assert str(tmp_path / "out") in card.text  # the usage snippet loads the folder
    assert CDRLPipeline.from_pretrained(tmp_path / "out").scheduler.config.num_noise_levels == 2


def test_data_grid_puts_each_class_in_its_column_like_the_samples():
    pipeline = tiny_pipeline(num_class_embeds=2, num_noise_levels=2)
    channels, size = pipeline.sample_shape[0], pipeline.sample_shape[-1]
    labels = torch.tensor([1, 0, 1, 0, 1])
    images = torch.where(labels == 1, 1.0, -1.0).view(-1, 1, 1, 1).expand(-1, channels, size, size)
    grid = data_grid(pipeline, images, labels, num_images=4)
    assert grid.size == (2 * 64, 2 * 64)  # the layout of one panel of sample_grid: a class per column, upscaled
    pixels = torch.from_numpy(np.asarray(grid.convert("L")).copy())
    assert (pixels[:, :64] == 0).all() and (pixels[:, 64:] == 255).all()  # class 0 black, class 1 white
    unconditional = data_grid(tiny_pipeline(num_noise_levels=2), images, None, num_images=3)
    assert unconditional.size == (3 * 64, 64)  # in order, up to 8 per row


def test_the_model_card_shows_the_samples_beside_the_training_data(tmp_path):
    pipeline = tiny_pipeline(num_noise_levels=2)
    images = torch.rand(4, *pipeline.sample_shape) * 2 - 1
    real = data_grid(pipeline, images, None, num_images=2)
    export_pipeline(pipeline, str(tmp_path / "out"), sample_grid(pipeline, num_images=2), real_grid=real)
    assert (tmp_path / "out" / "data.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "| ![samples](samples.png) | ![training data](data.png) |" in card
