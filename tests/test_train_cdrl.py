"""examples/train_cdrl.py end to end: a few steps on tiny models, run as a user would (subprocesses)."""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard

from cdrl_diffusers import CDRLPipeline

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cdrl.py"
# Tiny networks at 8x8, 16 training images, 2 Langevin steps: each run takes seconds.
TINY = [
    "--resolution=8",
    "--max_train_samples=16",
    "--train_batch_size=4",
    "--num_noise_levels=3",
    "--num_langevin_steps=2",
    "--ebm_channels=8,16",
    "--ebm_embedding_dim=16",
    "--initializer_channels=8,8",
    "--initializer_norm_num_groups=4",
    "--eval_batch_size=4",
    "--save_images_steps=1000",
    "--checkpointing_steps=1000",
]


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "2",
    }


def train(tmp_path: Path, output_dir: Path, *flags: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), f"--output_dir={output_dir}", *TINY, *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=environment(tmp_path), timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"train_cdrl.py failed:\n{result.stderr[-4000:]}")
    return result


def scalars(output_dir: Path, tag: str, logging_dir: str = "logs") -> dict[int, float]:
    """Values of a logged scalar by step, read from the TensorBoard event files (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for path in sorted(glob.glob(str(output_dir / logging_dir / "**" / "events.out.tfevents.*"), recursive=True)):
        events = EventAccumulator(path, size_guidance={"scalars": 0})
        events.Reload()
        if tag in events.Tags()["scalars"]:
            values.update({event.step: event.value for event in events.Scalars(tag)})
    return values


@functools.cache
def load_script():
    """examples/train_cdrl.py as a module (its dataclasses need it registered in ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location("train_cdrl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------------------------
# The default data (procedural shapes), unconditional, with a forced NaN, checkpoints and exports
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("default")
    output_dir = tmp_path / "out"
    result = train(
        tmp_path,
        output_dir,
        "--max_train_steps=6",
        "--checkpointing_steps=2",
        "--checkpoints_total_limit=2",
        "--save_images_steps=2",
        "--save_model_steps=4",
        "--debug_nonfinite_steps=3",
        "--random_flip",
    )
    return output_dir, result


def test_default_run_exports_a_loadable_pipeline_with_a_model_card(default_run):
    output_dir, _ = default_run
    pipe = CDRLPipeline.from_pretrained(output_dir)
    assert pipe.energy_model.config.sample_size == 8 and pipe.energy_model.config.num_class_embeds is None
    assert pipe.scheduler.config.num_langevin_steps == 2 and pipe.scheduler.config.num_noise_levels == 3
    images = pipe(batch_size=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "cdrl_diffusers" and card.data.datasets is None  # embedded data: no Hub id
    assert "![samples](samples.png)" in card.text and "Optimisation steps | 6" in card.text
    assert "Skipped non-finite steps | 1" in card.text
    assert PIL.Image.open(output_dir / "samples.png").size[0] > 0


def test_default_run_writes_sample_grids_and_logs_health(default_run):
    output_dir, _ = default_run
    grids = sorted(path.name for path in (output_dir / "samples").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png", "step_0000006.png"]
    grid = PIL.Image.open(output_dir / "samples" / "step_0000002.png")
    assert grid.width > 2 * grid.height  # initializer-only panel next to the refined panel
    ebm_loss = scalars(output_dir, "train/ebm_loss")
    assert sorted(ebm_loss) == [1, 2, 4, 5, 6] and all(np.isfinite(list(ebm_loss.values())))
    for tag in ("train/initializer_loss", "train/neg_energy_gap", "grad_norm/energy_model", "grad_norm/initializer"):
        assert len(scalars(output_dir, tag)) == 5, tag
    assert scalars(output_dir, "lr/energy_model")[6] > scalars(output_dir, "lr/energy_model")[1]
    assert any(tag.startswith("level_") for tag in _all_tags(output_dir))


def _all_tags(output_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in glob.glob(str(output_dir / "logs" / "**" / "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        tags.update(events.Tags()["scalars"])
    return tags


def test_a_nonfinite_step_is_skipped_counted_and_logged(default_run):
    output_dir, result = default_run
    assert scalars(output_dir, "train/skipped_step") == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0}
    assert scalars(output_dir, "train/nonfinite_steps")[6] == 1
    assert "Step 3: non-finite loss or gradient, update skipped" in result.stderr
    pipe = CDRLPipeline.from_pretrained(output_dir)
    assert all(torch.isfinite(p).all() for p in pipe.energy_model.parameters())


def test_checkpoints_total_limit_prunes_old_checkpoints(default_run):
    output_dir, _ = default_run
    assert sorted(path.name for path in output_dir.glob("*checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    checkpoint = output_dir / "checkpoint-6"
    for name in ("energy_model", "initializer", "energy_model_ema", "initializer_ema"):
        assert (checkpoint / name / "config.json").exists(), name
    assert (checkpoint / "generator_0.pt").exists() and (checkpoint / "optimizer.bin").exists()


# --------------------------------------------------------------------------------------------------------------------
# Other data sources and conditioning
# --------------------------------------------------------------------------------------------------------------------
def test_imagefolder_class_conditional_and_offline_push_to_hub(tmp_path):
    data_dir = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, channel in (("cat", 0), ("dog", 2)):
        (data_dir / name).mkdir(parents=True)
        for index in range(8):  # non-square images of varying size: resized and randomly cropped to 8x8
            pixels = np.zeros((10 + index % 3, 12, 3), dtype=np.uint8)
            pixels[..., channel] = rng.integers(100, 255)
            PIL.Image.fromarray(pixels).save(data_dir / name / f"{index}.png")
    output_dir = tmp_path / "out"
    result = train(
        tmp_path,
        output_dir,
        f"--train_data_dir={data_dir}",
        f"--cache_dir={tmp_path / 'cache'}",
        "--label_column=label",
        "--random_flip",
        "--max_train_steps=2",
        "--push_to_hub",
        "--hub_model_id=someone/cdrl-test",
        check=False,
    )
    # No network: the upload fails with a clear message, after everything was saved locally.
    assert result.returncode != 0
    assert "Uploading to the Hub repository 'someone/cdrl-test' failed" in result.stderr
    assert f"The trained pipeline is saved in {output_dir}" in result.stderr
    pipe = CDRLPipeline.from_pretrained(output_dir)
    assert pipe.class_names == ["cat", "dog"]
    assert pipe.initializer.config.num_class_embeds == 2  # class-conditional initializer too (Sec. 3.5)
    images = pipe(batch_size=2, class_labels=["dog"], guidance_scale=1.0, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    assert "someone/cdrl-test" in (output_dir / "README.md").read_text()


def test_attribute_columns_with_bf16_mixed_precision(tmp_path):
    output_dir = tmp_path / "out"
    train(
        tmp_path, output_dir, "--attribute_columns", "shape", "color", "--mixed_precision=bf16", "--max_train_steps=2"
    )
    pipe = CDRLPipeline.from_pretrained(output_dir)
    assert pipe.class_names == [f"shape={s}" for s in ("circle", "square", "triangle")] + [
        f"color={c}" for c in ("red", "green", "blue")
    ]
    assert pipe.initializer.config.num_class_embeds is None  # unconditional initializer (Sec. 4.5)
    assert all(np.isfinite(list(scalars(output_dir, "train/ebm_loss").values())))
    assert "Mixed precision | bf16" in (output_dir / "README.md").read_text()


# --------------------------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL, and divergence handling
# --------------------------------------------------------------------------------------------------------------------
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    flags = ["--checkpointing_steps=3", "--random_flip", "--gradient_accumulation_steps=2", "--save_images_steps=3"]
    uninterrupted = tmp_path / "uninterrupted"
    train(tmp_path, uninterrupted, *flags, "--max_train_steps=6")

    interrupted = tmp_path / "interrupted"
    command = [sys.executable, str(SCRIPT), f"--output_dir={interrupted}", *TINY, *flags, "--max_train_steps=100000"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(tmp_path)
    )
    deadline = time.time() + 240
    while not (interrupted / "checkpoint-3").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before writing checkpoint-3"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    for later in interrupted.glob("checkpoint-*"):  # in case it got further before the kill: resume from step 3
        if later.name != "checkpoint-3":
            shutil.rmtree(later)
    # A crash while writing leaves only a hidden temporary folder, which `latest` ignores and the next run removes.
    partial = interrupted / ".checkpoint-9.tmp"
    partial.mkdir(exist_ok=True)
    (partial / "optimizer.bin").write_bytes(b"truncated")

    resumed_run = "--logging_dir=logs_resumed"  # its own event files: only what the resumed run computed
    train(tmp_path, interrupted, *flags, "--max_train_steps=6", "--resume_from_checkpoint=latest", resumed_run)
    assert not partial.exists()
    for tag in ("train/ebm_loss", "train/initializer_loss", "grad_norm/energy_model"):
        expected, resumed = scalars(uninterrupted, tag), scalars(interrupted, tag, "logs_resumed")
        assert sorted(resumed) == [4, 5, 6], tag
        assert [resumed[step] for step in (4, 5, 6)] == [expected[step] for step in (4, 5, 6)], tag
    for component in ("energy_model", "initializer"):  # the exported EMA weights are identical too
        expected = (uninterrupted / component / "diffusion_pytorch_model.safetensors").read_bytes()
        assert (interrupted / component / "diffusion_pytorch_model.safetensors").read_bytes() == expected


def test_repeated_divergence_rolls_back_then_gives_up(tmp_path):
    output_dir = tmp_path / "out"
    result = train(
        tmp_path,
        output_dir,
        "--checkpointing_steps=2",
        "--max_train_steps=8",
        "--debug_nonfinite_steps=3,4",
        "--max_consecutive_nonfinite=2",
        "--max_rollbacks=1",
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.count(f"Rolling back to {output_dir / 'checkpoint-2'} with fresh noise (1/1)") == 1
    assert "TrainingDiverged: Training diverged: 2 non-finite steps in a row up to step 4" in result.stderr
    assert "1 roll-back(s) to the last checkpoint did not help" in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# Held-out evaluation: --eval_steps, --validation_split, --keep_best_metric
# --------------------------------------------------------------------------------------------------------------------
def test_eval_steps_logs_held_out_metrics_and_keeps_the_best_pipeline_across_a_resume(tmp_path):
    output_dir = tmp_path / "out"
    flags = ["--label_column=shape", "--eval_steps=2", "--validation_split=32", "--eval_num_samples=24"]
    flags += ["--keep_best_metric=frechet_distance", "--checkpointing_steps=2"]
    first = train(tmp_path, output_dir, *flags, "--max_train_steps=4")
    assert "Held out 32 images for evaluation every 2 steps" in first.stderr
    assert "penultimate features of a 'shape' classifier trained on 16 training images" in first.stderr
    frechet = scalars(output_dir, "eval/frechet_distance")
    assert sorted(frechet) == [2, 4] and all(value > 0 for value in frechet.values())
    assert sorted(scalars(output_dir, "eval/kid")) == [2, 4]
    assert all(0 <= value <= 1 for value in scalars(output_dir, "eval/accuracy").values())

    # The checkpoint of step 4 holds the best value so far; the resumed run keeps it and evaluates step 6.
    resumed = train(
        tmp_path, output_dir, *flags, "--max_train_steps=6", "--resume_from_checkpoint=latest", "--logging_dir=logs2"
    )
    restored = re.search(r"Best frechet_distance so far: (\S+) at step (\d+)", resumed.stderr)
    assert restored is not None, resumed.stderr[-2000:]
    first_best = min(frechet, key=frechet.get)
    assert int(restored.group(2)) == first_best and float(restored.group(1)) == pytest.approx(frechet[first_best])
    frechet.update(scalars(output_dir, "eval/frechet_distance", "logs2"))
    assert sorted(frechet) == [2, 4, 6]
    best_step = min(frechet, key=frechet.get)

    card = (output_dir / "best" / "README.md").read_text()
    assert f"Optimisation steps | {best_step} |" in card and f"at step {best_step} |" in card
    recorded = re.search(r"Best frechet_distance \| (\S+) at step", card)
    assert float(recorded.group(1)) == pytest.approx(frechet[best_step], rel=1e-5)
    assert "Held-out evaluation (step 6)" in (output_dir / "README.md").read_text()
    assert not (output_dir / ".best.tmp").exists()
    pipe = CDRLPipeline.from_pretrained(output_dir / "best")
    assert pipe.class_names == ["circle", "square", "triangle"]
    images = pipe(batch_size=2, class_labels=["square"], guidance_scale=1.0, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()


def test_validation_split_is_held_out_of_the_training_data():
    script = load_script()
    from cdrl_diffusers.data import load_shapes_dataset

    def rows(dataset):
        return Counter(
            np.asarray(row["image"]).tobytes() + bytes([row["shape"], row["color"], row["size"]]) for row in dataset
        )

    train_rows, validation_rows, name = script.load_training_dataset(
        script.parse_args(["--resolution=8", "--eval_steps=10"])  # the default split: 10 % of the default data
    )
    full = load_shapes_dataset(resolution=8, seed=0)
    assert name == "cdrl-shapes" and len(validation_rows) == round(0.1 * len(full))
    assert rows(train_rows) + rows(validation_rows) == rows(full)  # a partition of the rows

    subset, same_validation, _ = script.load_training_dataset(
        script.parse_args(["--resolution=8", "--validation_split=410", "--max_train_samples=64"])
    )
    assert len(subset) == 64 and rows(subset) <= rows(train_rows)  # subsets come from the training part only
    assert rows(same_validation) == rows(validation_rows)


# --------------------------------------------------------------------------------------------------------------------
# Data parallel on CPU: torchrun, gloo
# --------------------------------------------------------------------------------------------------------------------
WRAPPER = """
import hashlib, os, sys, torch
sys.path.insert(0, {examples!r})
import train_cdrl

seen = []
def recording_step(energy_model, initializer, scheduler, clean_samples, **kwargs):
    seen.append([hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in clean_samples])
    return step(energy_model, initializer, scheduler, clean_samples, **kwargs)

step, train_cdrl.cdrl_training_step = train_cdrl.cdrl_training_step, recording_step
pipeline = train_cdrl.main(train_cdrl.parse_args(sys.argv[1:]))
weights = {{**{{"energy." + k: v for k, v in pipeline.energy_model.state_dict().items()}},
            **{{"initializer." + k: v for k, v in pipeline.initializer.state_dict().items()}}}}
torch.save({{"seen": seen, "weights": weights}}, os.path.join({results!r}, f"rank{{os.environ['RANK']}}.pt"))
"""


def test_torchrun_two_cpu_processes(tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(examples=str(SCRIPT.parent), results=str(tmp_path)))
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper)]
    command += [f"--output_dir={output_dir}", *TINY, "--embedded_dataset=digits", "--label_column=label"]
    command += ["--resolution=16", "--max_train_steps=4", "--checkpointing_steps=2"]
    command += ["--eval_steps=4", "--validation_split=20", "--eval_num_samples=10"]  # only rank 0 evaluates
    result = subprocess.run(command, capture_output=True, text=True, env=environment(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MULTI_CPU" in result.stderr
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    assert all(torch.equal(ranks[0]["weights"][key], ranks[1]["weights"][key]) for key in ranks[0]["weights"])
    first, second = ([row for batch in rank["seen"] for row in batch] for rank in ranks)
    assert len(first) == len(second) == 4 * 4
    epoch = 2 * 4  # 16 images, 2 processes x batch 4: two batches per process and epoch
    assert set(first[:epoch]).isdisjoint(second[:epoch])  # each process sees its own shard
    assert (output_dir / "checkpoint-4" / "generator_1.pt").exists()
    assert sorted(scalars(output_dir, "eval/accuracy")) == [4]
    pipe = CDRLPipeline.from_pretrained(output_dir)  # the embedded digits: 1 channel, class names "0".."9"
    assert pipe.sample_shape == (1, 16, 16) and pipe.class_names == [str(digit) for digit in range(10)]


# --------------------------------------------------------------------------------------------------------------------
# Helpers of the script, imported directly
# --------------------------------------------------------------------------------------------------------------------
def test_latest_checkpoint_ignores_partial_folders(tmp_path):
    script = load_script()
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp", "checkpoint-10.old", "checkpoint-x"):
        (tmp_path / name).mkdir()
    assert script.list_checkpoints(str(tmp_path)) == [str(tmp_path / "checkpoint-2"), str(tmp_path / "checkpoint-10")]
    assert script.resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-10")
    assert script.resolve_checkpoint("checkpoint-2", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    assert script.resolve_checkpoint("latest", str(tmp_path / "missing")) is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        script.resolve_checkpoint("checkpoint-3", str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoint-10")
    assert script.resolve_checkpoint("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")


def test_bad_flags_give_clear_errors():
    script = load_script()
    with pytest.raises(ValueError, match="at most one data source"):
        script.parse_args(["--train_data_dir=a", "--embedded_dataset=digits"])
    with pytest.raises(ValueError, match="exclude each other"):
        script.parse_args(["--label_column=shape", "--attribute_columns", "shape"])
    with pytest.raises(ValueError, match="--train_batch_size"):
        script.parse_args(["--train_batch_size=0"])
    with pytest.raises(ValueError, match="--label_dropout"):
        script.parse_args(["--label_dropout=1.5"])
    with pytest.raises(ValueError, match="--validation_split"):
        script.parse_args(["--validation_split=1.5"])
    with pytest.raises(ValueError, match="needs `--eval_steps`"):
        script.parse_args(["--keep_best_metric=kid"])
    with pytest.raises(ValueError, match="class-conditional"):
        script.parse_args(["--eval_steps=5", "--keep_best_metric=accuracy"])


def test_training_images_are_seeded_by_epoch_and_row():
    script = load_script()
    from cdrl_diffusers.data import load_shapes_dataset

    rows = load_shapes_dataset(4, 16, seed=0)
    images = script.TrainingImages(rows, "image", ["shape", "color"], 8, 3, False, True, seed=0)
    first = torch.stack([images[i]["pixel_values"] for i in range(4)])
    assert first.shape == (4, 3, 8, 8) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, torch.stack([images[i]["pixel_values"] for i in range(4)]))  # same epoch, same crops
    images.set_epoch(1)
    assert not torch.equal(first, torch.stack([images[i]["pixel_values"] for i in range(4)]))
    assert images[0]["labels"].tolist() == [rows[0]["shape"], rows[0]["color"]]


def test_attribute_classes_pick_one_attribute_per_image():
    script = load_script()
    conditioning = script.Conditioning(["shape", "color"], ["s0", "s1", "s2", "c0", "c1", "c2"], offsets=[0, 3])
    batch = {"labels": torch.tensor([[2, 1]] * 200)}
    classes = script.class_labels_of(batch, conditioning, torch.Generator().manual_seed(0))
    assert set(classes.tolist()) == {2, 3 + 1}  # shape=2 or color=1, each picked about half the time
    assert 60 < (classes == 2).sum() < 140


def test_training_step_keeps_losses_in_float32_under_bf16_autocast():
    """What the script runs under `accelerator.autocast()` with --mixed_precision bf16."""
    from conftest import tiny_energy_model, tiny_initializer

    from cdrl_diffusers import CDRLScheduler, cdrl_training_step

    energy_model, initializer = tiny_energy_model().train(), tiny_initializer().train()
    clean = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = cdrl_training_step(
            energy_model, initializer, CDRLScheduler(num_langevin_steps=2), clean, generator=torch.manual_seed(0)
        )
    assert output.ebm_loss.dtype == output.initializer_loss.dtype == torch.float32
    assert torch.isfinite(output.ebm_loss) and torch.isfinite(output.initializer_loss)
    assert all(value.dtype == torch.float32 for value in output.level_metrics.values())
    (output.ebm_loss + output.initializer_loss).backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in energy_model.parameters())
