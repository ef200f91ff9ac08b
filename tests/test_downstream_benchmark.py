"""benchmarks/downstream.py: its detector reads real shapes exactly, and its training follows the script's defaults."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

from conftest import tiny_pipeline

from cdrl_diffusers import create_model_card
from cdrl_diffusers.data import load_shapes_dataset

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
_spec = importlib.util.spec_from_file_location("downstream", BENCHMARKS / "downstream.py")
downstream = sys.modules["downstream"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(downstream)


def test_detector_reads_every_rendered_shape_and_rejects_noise():
    rows = load_shapes_dataset(num_samples=64, resolution=downstream.RESOLUTION, seed=3)
    assert downstream.detector_check(rows) == 1.0
    blank = downstream.as_array([rows[0]["image"]]) * 0.0
    noise = downstream.np.random.default_rng(0).random((4, downstream.RESOLUTION, downstream.RESOLUTION, 3))
    assert downstream.detect_batch(blank) == [(None, None)]
    assert all(found == (None, None) for found in downstream.detect_batch(noise))


def test_training_passes_on_only_the_flags_given(tmp_path):
    command = downstream.training_command(downstream.parse_args([]), tmp_path)
    assert not any(
        flag.startswith(("--max_train_steps", "--num_langevin_steps", "--mixed_precision", "--cpu_threads"))
        for flag in command
    )
    assert (
        command[-2:] == [f"--output_dir={tmp_path}", "--conditional_initializer"] and "--attribute_columns" in command
    )
    paper = downstream.training_command(downstream.parse_args(["--no-conditional_initializer"]), tmp_path)
    assert paper == [*command[:-1], "--no-conditional_initializer"]
    given = downstream.training_command(
        downstream.parse_args(["--max_train_steps", "7", "--num_langevin_steps", "2"]), tmp_path
    )
    assert given[-3:-1] == ["--max_train_steps=7", "--num_langevin_steps=2"]


def test_training_summary_reads_the_trained_models_card(tmp_path):
    details = {"Optimisation steps": 1792, "Langevin steps K": 4, "Training time": "12.9 min on 1 x cpu", "Seed": 0}
    create_model_card(tiny_pipeline(), folder=tmp_path, training_details=details).save(tmp_path / "README.md")
    summary = downstream.training_summary(tmp_path)
    assert summary == "Optimisation steps: 1792; Langevin steps K: 4; Training time: 12.9 min on 1 x cpu"


def test_composed_initializer_methods_only_for_a_conditional_initializer():
    unconditional = SimpleNamespace(initializer=SimpleNamespace(config=SimpleNamespace(num_class_embeds=None)))
    conditional = SimpleNamespace(initializer=SimpleNamespace(config=SimpleNamespace(num_class_embeds=6)))
    assert downstream.composition_methods(unconditional) == ["eq14", "poe"]
    assert downstream.composition_methods(conditional) == ["eq14", "poe", "eq14_ci", "poe_ci"]
