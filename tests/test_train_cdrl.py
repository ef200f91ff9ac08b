"""examples/train_cdrl.py end to end: a few steps on tiny models, run as a user would (subprocesses)."""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard

from cdrl_diffusers import CDRLComposePipeline, CDRLPipeline, read_model_card_section

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


# --------------------------------------------------------------------------------------------------------------------
# The default data (procedural shapes), unconditional, with checkpoints and exports
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
    assert "| ![samples](samples.png) | ![training data](data.png) |" in card.text  # beside the training data
    assert "Optimisation steps | 6" in card.text
    assert "Skipped non-finite steps | 0" in card.text
    assert PIL.Image.open(output_dir / "samples.png").size[0] > 0
    assert PIL.Image.open(output_dir / "data.png").size[1] == PIL.Image.open(output_dir / "samples.png").size[1]


def test_default_run_writes_sample_grids_and_logs_health(default_run):
    output_dir, _ = default_run
    grids = sorted(path.name for path in (output_dir / "samples").glob("*.png"))
    assert grids == ["step_0000002.png", "step_0000004.png", "step_0000006.png"]
    grid = PIL.Image.open(output_dir / "samples" / "step_0000002.png")
    assert grid.width > 2 * grid.height  # initializer-only panel next to the refined panel
    ebm_loss = scalars(output_dir, "train/ebm_loss")
    assert sorted(ebm_loss) == [1, 2, 3, 4, 5, 6] and all(np.isfinite(list(ebm_loss.values())))
    for tag in ("train/initializer_loss", "train/neg_energy_gap", "grad_norm/energy_model", "grad_norm/initializer"):
        assert len(scalars(output_dir, tag)) == 6, tag
    rates = scalars(output_dir, "lr/energy_model")  # warm-up times the cosine decay, 0 after the last step
    assert rates[2] > rates[1] > 0 and rates[6] == 0
    assert scalars(output_dir, "train/skipped_step") == dict.fromkeys(range(1, 7), 0)
    tags = _all_tags(output_dir)
    for name in ("neg_energy_gap", "initializer_loss", "proposal_distance"):  # per-level diagnostics
        assert {f"level_{level}/{name}" for level in range(3)} <= tags, name
    assert {f"health/neg_energy_gap/level_{level}" for level in range(3)} <= tags  # the health monitor's averages


def _all_tags(output_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in glob.glob(str(output_dir / "logs" / "**" / "events.out.tfevents.*"), recursive=True):
        events = EventAccumulator(path)
        events.Reload()
        tags.update(events.Tags()["scalars"])
    return tags


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
        tmp_path,
        output_dir,
        "--attribute_columns",
        "shape",
        "color",
        "--no-conditional_initializer",
        "--mixed_precision=bf16",
        "--max_train_steps=2",
    )
    pipe = CDRLPipeline.from_pretrained(output_dir)
    assert pipe.class_names == [f"shape={s}" for s in ("circle", "square", "triangle")] + [
        f"color={c}" for c in ("red", "green", "blue")
    ]
    assert pipe.initializer.config.num_class_embeds is None  # the paper's unconditional initializer (Sec. 4.5)
    assert all(np.isfinite(list(scalars(output_dir, "train/ebm_loss").values())))
    assert "Mixed precision | bf16" in (output_dir / "README.md").read_text()


def test_attribute_columns_train_a_composable_conditional_initializer_by_default(tmp_path):
    output_dir = tmp_path / "out"
    train(tmp_path, output_dir, "--attribute_columns", "shape", "color", "--max_train_steps=2")
    pipe = CDRLComposePipeline.from_pretrained(output_dir)
    assert pipe.initializer.config.num_class_embeds == pipe.energy_model.config.num_class_embeds == 6
    assert "conditional initializer" in read_model_card_section(output_dir, "Training")["Conditioning"]
    concepts = ["shape=circle", "color=red"]

    def sample(**kwargs):
        return pipe(concepts, batch_size=2, generator=torch.manual_seed(0), output_type="pt", **kwargs).images

    composed, default, plain = sample(compose_initializer=True), sample(), sample(compose_initializer=False)
    assert torch.isfinite(composed).all() and torch.equal(default, composed) and not torch.equal(composed, plain)


# --------------------------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL, and divergence handling
# --------------------------------------------------------------------------------------------------------------------
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path):
    flags = ["--checkpointing_steps=3", "--random_flip", "--gradient_accumulation_steps=2", "--save_images_steps=3"]
    flags.append("--lr_decay=constant")  # the killed run plans 100,000 steps: a decay would follow another schedule
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
    resumed = train(
        tmp_path, interrupted, *flags, "--max_train_steps=6", "--resume_from_checkpoint=latest", resumed_run
    )
    assert not partial.exists()
    assert "FutureWarning" not in resumed.stderr and "not expected" not in resumed.stderr  # the EMAs load quietly
    for tag in ("train/ebm_loss", "train/initializer_loss", "grad_norm/energy_model"):
        expected, resumed = scalars(uninterrupted, tag), scalars(interrupted, tag, "logs_resumed")
        assert sorted(resumed) == [4, 5, 6], tag
        assert [resumed[step] for step in (4, 5, 6)] == [expected[step] for step in (4, 5, 6)], tag
    for component in ("energy_model", "initializer"):  # the exported EMA weights are identical too
        expected = (uninterrupted / component / "diffusion_pytorch_model.safetensors").read_bytes()
        assert (interrupted / component / "diffusion_pytorch_model.safetensors").read_bytes() == expected


def test_divergence_skips_steps_rolls_back_then_gives_up(tmp_path):
    """An absurd EBM learning rate: the first update blows the weights up, the next steps are not finite."""
    output_dir = tmp_path / "out"
    flags = ["--ebm_learning_rate=1e30", "--lr_warmup_steps=0", "--checkpointing_steps=1", "--max_train_steps=8"]
    result = train(tmp_path, output_dir, *flags, "--max_consecutive_nonfinite=2", "--max_rollbacks=1", check=False)
    assert result.returncode != 0
    assert "Step 2: non-finite loss or gradient, update skipped" in result.stderr
    assert result.stderr.count(f"Rolling back to {output_dir / 'checkpoint-1'} with fresh noise (1/1)") == 1
    assert "TrainingDiverged: Training diverged: 2 non-finite steps in a row up to step 3" in result.stderr
    assert "1 roll-back(s) to the last checkpoint did not help" in result.stderr
    assert scalars(output_dir, "train/skipped_step")[2] == 1 and scalars(output_dir, "train/rollbacks") == {1: 1}
    # The message names the way to the last checkpoint's pipeline; following it exports a loadable folder.
    hint = f"{output_dir / 'checkpoint-1'} holds the model of step 1: `--resume_from_checkpoint latest "
    hint += "--max_train_steps 1`"
    assert hint in result.stderr and not (output_dir / "model_index.json").exists()
    train(tmp_path, output_dir, *flags[:3], "--resume_from_checkpoint=latest", "--max_train_steps=1")
    assert CDRLPipeline.from_pretrained(output_dir).scheduler.config.num_noise_levels == 3


# --------------------------------------------------------------------------------------------------------------------
# Held-out evaluation: --eval_steps, --validation_split, --keep_best_metric
# --------------------------------------------------------------------------------------------------------------------
def test_eval_steps_logs_held_out_metrics_and_keeps_the_best_pipeline_across_a_resume(tmp_path):
    output_dir = tmp_path / "out"
    flags = ["--label_column=shape", "--eval_steps=2", "--validation_split=32", "--eval_num_samples=24"]
    flags += ["--keep_best_metric=frechet_distance", "--checkpointing_steps=2", "--lr_decay=constant"]  # extended
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
    logged = float(restored.group(1))  # printed with 6 significant digits
    assert int(restored.group(2)) == first_best and logged == pytest.approx(frechet[first_best], rel=1e-5)
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


# --------------------------------------------------------------------------------------------------------------------
# Data parallel on CPU: torchrun, gloo
# --------------------------------------------------------------------------------------------------------------------
def test_torchrun_two_cpu_processes(tmp_path):
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    command += [f"--output_dir={output_dir}", *TINY, "--embedded_dataset=digits", "--label_column=label"]
    command += ["--resolution=16", "--max_train_steps=4", "--checkpointing_steps=2"]
    command += ["--eval_steps=4", "--validation_split=20", "--eval_num_samples=10"]  # only rank 0 evaluates
    result = subprocess.run(command, capture_output=True, text=True, env=environment(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MULTI_CPU" in result.stderr and "Num processes: 2" in result.stderr
    for rank in (0, 1):  # each process stores its own noise generator and RNG states
        assert (output_dir / "checkpoint-4" / f"generator_{rank}.pt").exists()
        assert (output_dir / "checkpoint-4" / f"random_states_{rank}.pkl").exists()
    assert sorted(scalars(output_dir, "eval/accuracy")) == [4]
    assert result.stderr.count("held-out evaluation:") == 1
    pipe = CDRLPipeline.from_pretrained(output_dir)  # the embedded digits: 1 channel, class names "0".."9"
    assert pipe.sample_shape == (1, 16, 16) and pipe.class_names == [str(digit) for digit in range(10)]
    assert (
        "Batch size | 8 (4 per device x 2 process(es) x 1 accumulation step(s))"
        in (output_dir / "README.md").read_text()
    )


def test_time_budget_pair_weights_step_size_spectral_norm_and_dropout_reach_the_run_and_its_export(tmp_path):
    output_dir = tmp_path / "out"
    flags = ["--max_train_steps=100000", "--max_train_minutes=0.002", "--langevin_step_size_scale=1e-3"]
    flags += ["--ebm_spectral_norm", "--initializer_dropout=0.2", "--level_sampling_weights", "0", "0", "1"]
    train(tmp_path, output_dir, *flags)
    card = (output_dir / "README.md").read_text()
    steps = int(re.search(r"Optimisation steps \| (\d+)", card).group(1))
    assert 1 <= steps < 100  # stopped by the 0.12 s budget, long before --max_train_steps
    assert "Pair sampling weights | 0, 0, 1" in card and "Langevin step size scale c | 0.001" in card
    assert "| EBM spectral norm | on (App. A.1) |" in card and "| Initializer dropout | 0.2 |" in card
    details = read_model_card_section(output_dir, "Training")
    assert re.fullmatch(r"[\d.]+ min on 1 x cpu", details["Training time"])
    assert details["CPU threads per process"] == environment(tmp_path)["OMP_NUM_THREADS"]
    pipe = CDRLPipeline.from_pretrained(output_dir)
    assert pipe.scheduler.config.langevin_step_size_scale == 1e-3 and pipe.energy_model.config.use_spectral_norm
    assert pipe.initializer.config.dropout == 0.2  # the cpu preset has none
    # Only pair 2 was drawn: levels 0 and 1 never logged a statistic.
    assert scalars(output_dir, "level_2/ebm_loss") and not scalars(output_dir, "level_0/ebm_loss")


def test_lr_decay_follows_the_warm_up_times_the_cosine_and_resumes_exactly(tmp_path):
    output_dir = tmp_path / "out"
    flags = ["--max_train_steps=4", "--lr_decay=cosine", "--lr_warmup_steps=2", "--initializer_warmup_head_start=1"]
    flags += ["--ebm_learning_rate=1e-3", "--initializer_learning_rate=2e-3", "--checkpointing_steps=2"]
    train(tmp_path, output_dir, *flags)
    cosine = [0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(1, 5)]  # logged after step n: rate of n
    expected_ebm = [1e-3 * min(1, step / 2) * decay for step, decay in zip(range(1, 5), cosine)]
    expected_initializer = [2e-3 * min(1, (step + 1) / 2) * decay for step, decay in zip(range(1, 5), cosine)]
    ebm, initializer = scalars(output_dir, "lr/energy_model"), scalars(output_dir, "lr/initializer")
    assert [ebm[step] for step in range(1, 5)] == pytest.approx(expected_ebm, abs=1e-9)
    assert [initializer[step] for step in range(1, 5)] == pytest.approx(expected_initializer, abs=1e-9)
    card = (output_dir / "README.md").read_text()
    assert "linear warm-up over 2 steps (Eq. 15), then a cosine decay to 0 at step 4" in card
    assert "warm-up 1 steps ahead (Eq. 15), then a cosine decay to 0 at step 4" in card
    # Resuming the same planned run from step 2 continues the same schedule and the same losses.
    shutil.rmtree(output_dir / "checkpoint-4")
    train(tmp_path, output_dir, *flags, "--resume_from_checkpoint=latest", "--logging_dir=logs_resumed")
    for tag in ("lr/energy_model", "lr/initializer", "train/ebm_loss"):
        expected, resumed = scalars(output_dir, tag), scalars(output_dir, tag, "logs_resumed")
        assert sorted(resumed) == [3, 4] and [resumed[3], resumed[4]] == [expected[3], expected[4]], tag


def test_data_target_from_step_switches_the_initializer_target(tmp_path):
    output_dir = tmp_path / "out"
    flags = ["--initializer_target=refined", "--data_target_from_step=2", "--langevin_noise_control"]
    train(tmp_path, output_dir, "--max_train_steps=4", *flags)
    card = (output_dir / "README.md").read_text()
    assert "Initializer target | refined samples (Eq. 8) for 2 steps, then data (App. G.2)" in card
    losses = scalars(output_dir, "train/initializer_loss")
    # The data target y_t^+ is much further from the proposal than the refined sample, without the chain's noise.
    assert sorted(losses) == [1, 2, 3, 4] and min(losses[3], losses[4]) > 10 * max(losses[1], losses[2])


def test_frozen_initializer_is_checkpointed_and_resumes_exactly(tmp_path):
    flags = ["--initializer_target=refined", "--data_target_from_step=2", "--frozen_initializer_share=0.5"]
    flags += ["--checkpointing_steps=3", "--lr_decay=constant"]  # the interrupted run is extended from 3 to 5 steps
    uninterrupted = tmp_path / "uninterrupted"
    train(tmp_path, uninterrupted, *flags, "--max_train_steps=5")
    card = (uninterrupted / "README.md").read_text()
    expected_target = "then data (App. G.2); 50% of the EBM's chains start from the initializer of step 2 |"
    assert expected_target in card
    interrupted = tmp_path / "interrupted"
    train(tmp_path, interrupted, *flags, "--max_train_steps=3")
    # The frozen copy (taken at step 2, after the switch) comes back from checkpoint-3, not from the initial weights.
    train(tmp_path, interrupted, *flags, "--max_train_steps=5", "--resume_from_checkpoint=latest", "--logging_dir=l2")
    expected, resumed = scalars(uninterrupted, "train/ebm_loss"), scalars(interrupted, "train/ebm_loss", "l2")
    assert sorted(resumed) == [4, 5] and [resumed[4], resumed[5]] == [expected[4], expected[5]]
    train(tmp_path, tmp_path / "plain", *flags[:2], "--frozen_initializer_share=0", "--max_train_steps=5")
    without = scalars(tmp_path / "plain", "train/ebm_loss")
    assert [without[step] for step in (1, 2)] == [expected[step] for step in (1, 2)]  # before the switch: the same
    assert without[3] != expected[3]  # after it, half the chains start from the frozen copy


def test_negative_shifts_add_ranked_negatives_to_the_ebm_loss_and_reach_the_card(tmp_path):
    flags = ["--max_train_steps=2", "--lr_decay=constant"]
    train(tmp_path, tmp_path / "plain", *flags)
    train(tmp_path, tmp_path / "nda", *flags, "--negative_shifts", "flipped", "--negative_share=0.5")
    card = (tmp_path / "nda" / "README.md").read_text()
    assert "| Negative data augmentation | 50% of each batch turned flipped, scored below the data" in card
    assert "| Negative data augmentation | none |" in (tmp_path / "plain" / "README.md").read_text()
    plain, nda = (scalars(tmp_path / name, "train/ebm_loss") for name in ("plain", "nda"))
    assert nda[1] > plain[1]  # the same draws plus non-negative logistic terms
    initializer = [scalars(tmp_path / name, "train/initializer_loss")[1] for name in ("plain", "nda")]
    assert initializer[0] == initializer[1]  # a flip draws nothing: the first step's chains are unchanged


# --------------------------------------------------------------------------------------------------------------------
# Flags: range-checked by argparse before anything is loaded
# --------------------------------------------------------------------------------------------------------------------
BAD_FLAGS = {
    "--max_grad_norm=-1": "argument --max_grad_norm: expected a finite number > 0, got '-1'",
    "--initializer_warmup_head_start=-5": "argument --initializer_warmup_head_start: expected an integer >= 0",
    "--keep_best_metric=kid": "--keep_best_metric needs --eval_steps",
    "--conditional_initializer --label_column=shape": "--[no-]conditional_initializer is for --attribute_columns",
    "--no-conditional_initializer": "--[no-]conditional_initializer is for --attribute_columns",
    "--level_sampling_weights=1": "--level_sampling_weights: expected 6 weights with a positive sum",
    "--langevin_step_size_scale=0": "argument --langevin_step_size_scale: expected a finite number > 0",
    "--frozen_initializer_share=0.2 --initializer_target=refined": "--frozen_initializer_share needs a data target",
    "--negative_shifts=mirrored": "argument --negative_shifts: invalid choice: 'mirrored'",
    "--negative_shifts=flipped --random_flip": "--negative_shifts flipped contradicts --random_flip",
}


def test_bad_flags_stop_the_script_with_argparse_errors(tmp_path):
    processes = {
        flag: subprocess.Popen(
            [sys.executable, str(SCRIPT), f"--output_dir={tmp_path / 'out'}", *flag.split()],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(tmp_path),
        )
        for flag in BAD_FLAGS
    }
    for flag, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2 and BAD_FLAGS[flag] in stderr, (flag, stderr[-2000:])
    assert not (tmp_path / "out").exists()


def test_cli_types_of_the_training_flags():
    from cdrl_diffusers.validation import (
        cli_fraction,
        cli_fraction_or_count,
        cli_positive_float,
        cli_positive_int_list,
    )

    assert cli_positive_float("1e-4") == 1e-4 and cli_fraction("0") == 0.0 and cli_fraction("0.9999") == 0.9999
    assert cli_fraction_or_count("0.1") == 0.1 and cli_fraction_or_count("256") == 256
    assert cli_positive_int_list("32,64") == (32, 64) and cli_positive_int_list("") == ()
    bad = [(cli_positive_float, text) for text in ("0", "-1", "nan", "inf", "x")]
    bad += [(cli_fraction, text) for text in ("1", "-0.1", "nan")]
    bad += [(cli_fraction_or_count, text) for text in ("0", "1", "1.5", "2.5", "-3")]
    bad += [(cli_positive_int_list, text) for text in ("32,0", "a,b", "-8")]
    for parse, text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


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
