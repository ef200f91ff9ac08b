#!/usr/bin/env python
"""Classifier-free guidance on digits: the fidelity/diversity trade-off of the paper's Fig. 3 (Sec. 4.3) on a CPU.

Trains a class-conditional CDRL model on scikit-learn's 8x8 digits upsampled to 16x16 with ``examples/train_cdrl.py``,
then samples 50 images per class at each guidance weight w in {0, 0.5, 1, 2, 3} from the same initial noise and scores
them with a classifier trained on held-out digits (``cdrl_diffusers.evaluation``):

- accuracy: how often the classifier recognises the requested digit (rises with w, like the Inception Score);
- Fréchet classifier distance (FD) to real digits the classifier never saw (FID's formula on its features);
- diversity: the mean within-class pairwise feature distance (falls with w).

One command (a heavy job: take the shared lock on a shared machine), about 30 minutes on one CPU core:

    flock /tmp/cdrl_heavy.lock python benchmarks/digits_guidance.py

It writes docs/results/digits_guidance.json, docs/figures/digits_guidance.png and
docs/figures/digits_guidance_samples.png; the trained pipeline stays in outputs/digits_cdrl for
benchmarks/sampling_steps.py. ``--skip_training`` reuses it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from cdrl_diffusers import CDRLPipeline  # noqa: E402
from cdrl_diffusers.data import load_digits_dataset  # noqa: E402
from cdrl_diffusers.evaluation import (  # noqa: E402
    ClassifierFeatures,
    classifier_accuracy,
    extract_features,
    feature_diversity,
    frechet_distance,
    kernel_distance,
    score_samples,
    train_classifier,
)

REPO = Path(__file__).resolve().parents[1]
GUIDANCE_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0)
# The CPU training recipe: the training script's default learning rates and K = 8 (docs/evaluation.md records the
# slower first recipe, K = 15 at 2e-4 for 2,000 steps, which learned too little class information for guidance to act
# on). benchmarks/sampling_steps.py then compares K' = 15, 8, 5 and 3 with the sampling adjustment.
TRAINING_FLAGS = {
    "--embedded_dataset": "digits",
    "--label_column": "label",
    "--resolution": "16",
    "--num_langevin_steps": "8",
    "--train_batch_size": "32",
    "--max_train_steps": "4000",
    "--ebm_learning_rate": "5e-4",
    "--initializer_learning_rate": "1e-3",
    "--lr_warmup_steps": "200",
    "--label_dropout": "0.1",
    "--seed": "0",
    "--checkpointing_steps": "1000",
    "--save_images_steps": "1000",
}


# --------------------------------------------------------------------------------------------------------------------
# Data, classifier, model
# --------------------------------------------------------------------------------------------------------------------
def digits_tensors(resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, H, W) tensors in [-1, 1] (the training script's mapping) and their labels."""
    dataset = load_digits_dataset(resolution=resolution)
    images = np.stack([np.asarray(image, dtype=np.float32) for image in dataset["image"]]) / 127.5 - 1.0
    return torch.from_numpy(images)[:, None], torch.tensor(dataset["label"])


@dataclass
class DigitSplits:
    """A seeded 60/20/20 split: the classifier trains on ``train``; ``reference`` is what samples are compared to;
    ``real`` (also unseen by the classifier) scores real digits the same way, the floor a perfect sampler reaches."""

    train: tuple[torch.Tensor, torch.Tensor]
    reference: tuple[torch.Tensor, torch.Tensor]
    real: tuple[torch.Tensor, torch.Tensor]


def digit_splits(seed: int = 0) -> DigitSplits:
    images, labels = digits_tensors()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    first, second = int(0.6 * len(images)), int(0.8 * len(images))
    parts = [order[:first], order[first:second], order[second:]]
    return DigitSplits(*[(images[index], labels[index]) for index in parts])


def evaluation_classifier(splits: DigitSplits, cache_dir: str | os.PathLike):
    """The seeded digits classifier (cached), and its accuracy on the two held-out parts."""
    classifier = train_classifier(*splits.train, num_classes=10, cache_dir=cache_dir, seed=0)
    held_out = {
        "reference": classifier_accuracy(classifier, *splits.reference),
        "real": classifier_accuracy(classifier, *splits.real),
    }
    return classifier, held_out


def train_model(model_dir: Path, flags: dict[str, str], threads: int) -> float:
    """Run examples/train_cdrl.py in a subprocess with ``threads`` CPU threads; return the wall-clock seconds."""
    command = [sys.executable, str(REPO / "examples" / "train_cdrl.py"), "--output_dir", str(model_dir)]
    for flag, value in flags.items():
        command += [flag, value]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("Training:", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environment, cwd=REPO)
    return time.perf_counter() - start


def load_pipeline(model_dir: Path) -> CDRLPipeline:
    pipeline = CDRLPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(
    pipeline: CDRLPipeline,
    labels: torch.Tensor,
    guidance_scale: float = 0.0,
    num_langevin_steps: int | None = None,
    use_initializer: bool = True,
    seed: int = 0,
    batch_size: int = 250,
) -> tuple[torch.Tensor, float]:
    """Samples in [-1, 1] for ``labels`` (Algorithm 2 + Eq. 18) and the sampling wall-clock seconds.

    Chunk i always starts from the noise of ``seed + i``, so settings differ only in how they sample.
    """
    samples, seconds = [], 0.0
    for index, start in enumerate(range(0, len(labels), batch_size)):
        chunk = labels[start : start + batch_size]
        generator = torch.Generator().manual_seed(seed + index)
        latents = randn_tensor((len(chunk), *pipeline.sample_shape), generator=generator, dtype=torch.float32)
        begin = time.perf_counter()
        output = pipeline(
            batch_size=len(chunk),
            class_labels=chunk,
            guidance_scale=guidance_scale,
            num_langevin_steps=num_langevin_steps,
            use_initializer=use_initializer,
            generator=generator,
            latents=latents,
            output_type="latent",
        )
        samples.append(output.images)
        seconds += time.perf_counter() - begin
    return torch.cat(samples), seconds


def real_data_scores(classifier, splits: DigitSplits) -> dict[str, float]:
    """The scores of held-out real digits: what a perfect sampler would get at this sample size."""
    extractor = ClassifierFeatures(classifier)
    reference = extract_features(extractor, splits.reference[0])
    real = extract_features(extractor, splits.real[0])
    kid_mean, kid_std = kernel_distance(reference, real)
    return {
        "accuracy": classifier_accuracy(classifier, *splits.real),
        "frechet_distance": frechet_distance(reference, real),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "diversity": feature_diversity(real, splits.real[1]),
        "num_samples": len(real),
    }


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------
def save_sample_rows(rows: dict[str, torch.Tensor], path: Path, title: str, pad: int = 2) -> None:
    """One row of images per setting (the same initial noise in every column), labelled on the left."""
    size = next(iter(rows.values())).shape[-1]
    columns = max(len(images) for images in rows.values())
    step = size + pad
    canvas = np.full((len(rows) * step + pad, columns * step + pad), 0.5, dtype=np.float32)
    for row, images in enumerate(rows.values()):
        for column, image in enumerate(images):
            top, left = pad + row * step, pad + column * step
            canvas[top : top + size, left : left + size] = ((image[0].clamp(-1, 1) + 1) / 2).numpy()
    figure, axis = plt.subplots(figsize=(0.42 * columns + 1.2, 0.42 * len(rows) + 0.6))
    axis.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.set_yticks([pad + row * step + size / 2 for row in range(len(rows))], list(rows))
    axis.set_xticks([])
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def save_tradeoff_plot(results: dict, path: Path) -> None:
    sweep = results["guidance_sweep"]
    scales = [row["guidance_scale"] for row in sweep]
    real = results["real_data"]
    panels = [
        ("accuracy", "classifier accuracy (higher: more recognisable)"),
        ("frechet_distance", "Fréchet classifier distance (lower: closer to data)"),
        ("diversity", "within-class diversity"),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (key, label) in zip(axes, panels):
        axis.plot(scales, [row[key] for row in sweep], "o-", label="CDRL samples")
        axis.axhline(real[key], color="gray", linestyle="--", label="held-out real digits")
        axis.set_xlabel("guidance weight w")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Classifier-free guidance on 16x16 digits (cf. the paper's Fig. 3)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, default=REPO / "outputs" / "digits_cdrl")
    parser.add_argument("--skip_training", action="store_true", help="Reuse the pipeline in --model_dir.")
    parser.add_argument("--train_steps", type=int, default=None, help="Override the recipe's --max_train_steps.")
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for training and sampling.")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "digits_guidance.json")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--classifier_cache", type=Path, default=REPO / "outputs" / "classifier_cache")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    flags = dict(TRAINING_FLAGS)
    if args.train_steps is not None:
        flags["--max_train_steps"] = str(args.train_steps)
    training_seconds = None
    if not args.skip_training:
        training_seconds = train_model(args.model_dir, flags, args.threads)
    pipeline = load_pipeline(args.model_dir)

    splits = digit_splits()
    classifier, classifier_accuracies = evaluation_classifier(splits, args.classifier_cache)
    print(f"Classifier accuracy on held-out digits: {classifier_accuracies}", flush=True)
    labels = torch.arange(10 * args.samples_per_class) % 10

    sweep, rows = [], {}
    for scale in GUIDANCE_SCALES:
        samples, seconds = generate(pipeline, labels, guidance_scale=scale)
        scores = score_samples(classifier, samples, labels, *splits.reference)
        sweep.append({"guidance_scale": scale, **scores.to_dict(), "sampling_seconds": seconds})
        rows[f"w = {scale:g}"] = samples[:20]
        print(
            f"w={scale:<4g} accuracy={scores.accuracy:.3f} FD={scores.frechet_distance:.3f} "
            f"KID={scores.kid_mean:.4f}±{scores.kid_std:.4f} diversity={scores.diversity:.3f} ({seconds:.0f} s)",
            flush=True,
        )
    real = real_data_scores(classifier, splits)
    print(f"held-out real digits: {real}", flush=True)

    results = {
        "description": "Class-conditional CDRL on 16x16 digits: guidance sweep scored by an offline classifier.",
        "command": "flock /tmp/cdrl_heavy.lock python benchmarks/digits_guidance.py",
        "training_flags": flags,
        "training_minutes": None if training_seconds is None else training_seconds / 60,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "samples_per_class": args.samples_per_class,
        "num_langevin_steps": pipeline.scheduler.config.num_langevin_steps,
        "classifier_held_out_accuracy": classifier_accuracies,
        "reference_set_size": len(splits.reference[0]),
        "guidance_sweep": sweep,
        "real_data": real,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.figures.mkdir(parents=True, exist_ok=True)
    save_tradeoff_plot(results, args.figures / "digits_guidance.png")
    save_sample_rows(
        rows,
        args.figures / "digits_guidance_samples.png",
        "Same initial noise and labels (0-9, 0-9) in each column; only w changes",
    )
    print(f"Wrote {args.results} and figures in {args.figures}")
    return results


if __name__ == "__main__":
    main(parse_args())
