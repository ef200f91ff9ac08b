"""The ``cdrl-diffusers`` command line: help, sample, inpaint, compose, score, and clear errors (issue 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_SIZE, tiny_pipeline

from cdrl_diffusers import CDRLPipeline
from cdrl_diffusers.cli import COMMANDS, main

CLASS_NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "model"
    pipe = tiny_pipeline(num_class_embeds=3, class_names=CLASS_NAMES, num_noise_levels=2, num_langevin_steps=2)
    pipe.save_pretrained(folder)
    return str(folder)


def write_images(folder, count: int, seed: int, smooth: bool) -> list:
    """Random RGB PNGs; ``smooth`` ones are near-constant images, the others uniform noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        if smooth:
            pixels = np.full((TINY_SIZE, TINY_SIZE, 3), rng.integers(100, 156, size=3), dtype=np.uint8)
        else:
            pixels = rng.integers(0, 256, size=(TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
        path = folder / f"image_{index}.png"
        PIL.Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def pixels(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


def test_console_script_is_registered_and_help_reads_well():
    (script,) = [entry for entry in entry_points(group="console_scripts") if entry.name == "cdrl-diffusers"]
    assert script.value == "cdrl_diffusers.cli:main"
    result = subprocess.run(
        [sys.executable, "-m", "cdrl_diffusers", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: cdrl-diffusers")
    for command in COMMANDS:
        assert command in result.stdout
    assert "examples:" in result.stdout


@pytest.mark.parametrize("command", [command for command in COMMANDS if command != "convert"])
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: cdrl-diffusers {command}")
    assert "MODEL" in out and "--device" in out and "--revision" in out


def test_sample_writes_images_that_do_not_depend_on_the_batch_size(model_dir, tmp_path, capsys):
    grid = tmp_path / "out" / "samples.png"
    common = [model_dir, "--num-images", "3", "--class-label", "circle", "--class-label", "2", "--seed", "5"]
    assert main(["sample", *common, "--batch-size", "2", "--output", str(grid), "--save-individual"]) == 0
    files = sorted(grid.parent.glob("samples_*.png"))
    assert len(files) == 3 and all(pixels(f).shape == (TINY_SIZE, TINY_SIZE, 3) for f in files)
    assert pixels(grid).shape == (TINY_SIZE, 3 * TINY_SIZE, 3)
    assert "Wrote a grid of 3 image(s)" in capsys.readouterr().out
    # Image i always uses seed + i, so one batch of 3 gives the same images as batches of 2 and 1.
    single = tmp_path / "single.png"
    assert main(["sample", *common, "--batch-size", "3", "--output", str(single), "--save-individual"]) == 0
    for index, file in enumerate(files):
        np.testing.assert_array_equal(pixels(tmp_path / f"single_{index:04d}.png"), pixels(file))
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))


def test_inpaint_keeps_the_known_pixels(model_dir, tmp_path):
    (image,) = write_images(tmp_path / "in", 1, seed=0, smooth=False)
    mask = np.zeros((TINY_SIZE, TINY_SIZE), dtype=np.uint8)
    mask[:, TINY_SIZE // 2 :] = 255  # white = generate
    PIL.Image.fromarray(mask).save(tmp_path / "mask.png")
    output = tmp_path / "filled.png"
    args = ["inpaint", model_dir, "--image", str(image), "--mask", str(tmp_path / "mask.png"), "--num-samples", "2"]
    assert main([*args, "--output", str(output), "--save-individual"]) == 0
    original = pixels(image)
    samples = [pixels(tmp_path / f"filled_{index:04d}.png") for index in range(2)]
    for sample in samples:
        np.testing.assert_array_equal(sample[:, : TINY_SIZE // 2], original[:, : TINY_SIZE // 2])
        assert not np.array_equal(sample[:, TINY_SIZE // 2 :], original[:, TINY_SIZE // 2 :])
    assert not np.array_equal(samples[0], samples[1])
    # The grid shows the original first, then the inpaintings.
    np.testing.assert_array_equal(pixels(output)[:, :TINY_SIZE], original)
    assert pixels(output).shape == (TINY_SIZE, 3 * TINY_SIZE, 3)


def test_compose_writes_images(model_dir, tmp_path):
    output = tmp_path / "composed.png"
    args = ["compose", model_dir, "--concept", "circle", "--concept", "1", "--concept-weight", "2", "--concept-weight"]
    assert main([*args, "-0.5", "--num-images", "2", "--output", str(output), "--save-individual"]) == 0
    assert pixels(output).shape == (TINY_SIZE, 2 * TINY_SIZE, 3)
    assert len(list(tmp_path.glob("composed_*.png"))) == 2


def test_score_matches_the_pipeline_and_reports_an_auroc(model_dir, tmp_path, capsys):
    inside = write_images(tmp_path / "in", 3, seed=1, smooth=True)
    outside = write_images(tmp_path / "out", 2, seed=2, smooth=False)
    report_file = tmp_path / "scores.json"
    args = ["score", model_dir, str(tmp_path / "in"), "--out-of-distribution", str(tmp_path / "out")]
    assert main([*args, "--batch-size", "2", "--output", str(report_file)]) == 0
    printed = capsys.readouterr().out
    assert "3 image(s): mean log-density" in printed and "AUROC" in printed
    report = json.loads(report_file.read_text())
    pipe = CDRLPipeline.from_pretrained(model_dir)
    expected = pipe.log_density([PIL.Image.open(path) for path in inside + outside])
    scores = [report["scores"][str(path)] for path in inside]
    scores += [report["out_of_distribution_scores"][str(path)] for path in outside]
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), expected.double(), rtol=1e-5, atol=1e-5)
    wins = sum(float(a > b) + 0.5 * float(a == b) for a in scores[:3] for b in scores[3:])
    assert report["auroc"] == pytest.approx(wins / 6)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: COMMAND"),
        (["sample", "MODEL", "--num-images", "0", "--output", "x.png"], "--num-images: expected a positive integer"),
        (["sample", "MODEL", "--output", "x.png", "--guidance-scale", "-1"], "expected a finite number >= 0"),
        (["sample", "MODEL"], "the following arguments are required: --output"),
        (["compose", "MODEL", "--output", "x.png"], "the following arguments are required: --concept"),
        (["score", "MODEL"], "the following arguments are required: images"),
        (["paint", "MODEL"], "invalid choice: 'paint'"),
        (["sample", "MODEL", "--device", "toaster", "--output", "x.png"], "--device: 'toaster' is not a device"),
        (["sample", "MODEL", "--num-langevin-steps", "-1", "--output", "x.png"], "expected an integer >= 0"),
        (["score", "MODEL", "x.png", "--noise-level", "1.5"], "--noise-level: expected an integer >= 0"),
    ],
)
def test_bad_arguments_exit_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "{model}", "--class-label", "hexagon", "--output", "{tmp}/x.png"], "unknown class name 'hexagon'"),
        (
            ["sample", "{model}", "--class-label", "7", "--output", "{tmp}/x.png"],
            "out of range: expected an integer in [0, 2]",
        ),
        (["sample", "./no/such/model", "--output", "{tmp}/x.png"], "No such local folder"),
        (["score", "{model}", "{tmp}/missing"], "No such image file or folder"),
        (
            ["inpaint", "{model}", "--image", "{tmp}/big.png", "--mask", "{tmp}/big.png", "--output", "{tmp}/x.png"],
            "the model expects 8x8; use --resize",
        ),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(argv, message, model_dir, tmp_path, capsys):
    PIL.Image.new("RGB", (2 * TINY_SIZE, 2 * TINY_SIZE)).save(tmp_path / "big.png")
    argv = [arg.format(model=model_dir, tmp=tmp_path) for arg in argv]
    assert main(argv) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert last_line.startswith(f"cdrl-diffusers {argv[0]}: error:")
    assert message.lower() in last_line.lower()
