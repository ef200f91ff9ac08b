#!/usr/bin/env python
"""Guidance on digits, CDRL beside a same-budget diffusion model: the paper's Fig. 3 and Sec. 4.4 on a CPU.

Trains a class-conditional CDRL model on scikit-learn's 8x8 digits upsampled to 16x16 with ``examples/train_cdrl.py``
(``--validation_split 0.2``: a fifth of the digits is never trained on), then the model a user would pick instead
(``benchmarks/diffusion_baseline.py``): a class-conditional diffusers ``UNet2DModel`` with about as many parameters as
CDRL's EBM and initializer together, trained to predict the noise of a 1000-step ``DDPMScheduler`` (AdamW, batch 64,
the same label dropout 0.1 for guidance) on the same training digits, for the same wall-clock time on the same number
of threads, and sampled with 50 ``DDIMScheduler`` steps. Each model samples 50 images per class at each guidance weight
w in {0, 0.5, 1, 2, 3}, with guidance in the convention of the paper's Eq. 11-12, (1 + w) cond - w uncond, from the
same initial noise, and both are scored with a classifier trained on other digits (``cdrl_diffusers.evaluation``):

- accuracy: how often the classifier recognises the requested digit (rises with w, like the Inception Score);
- Fréchet classifier distance (FD) to real digits the classifier never saw (FID's formula on its features);
- diversity: the mean within-class pairwise feature distance (falls with w);
- sampling seconds per image, measured in the same run on the same threads.

CDRL's unconditional log-density at the lowest noise level (``log_density``) also serves as an out-of-distribution
score (Sec. 4.4): the AUROC of the held-out digits against five shifted copies of them (``shift_images``): rotated a
quarter turn counter-clockwise, flipped left-right, periodic gratings in the digits' value range, uniform noise and
shuffled pixels. The diffusion baseline has no density, so it has no OOD score.

One command (a heavy job: take the shared lock on a shared machine), about an hour on one CPU core (CDRL's training,
then as long for the baseline's):

    flock /tmp/cdrl_heavy.lock python benchmarks/digits_guidance.py

It writes docs/results/digits_guidance.json (a ``cdrl`` and a ``diffusion_baseline`` section), docs/figures/
digits_guidance.png and docs/figures/digits_guidance_samples.png; the trained pipeline stays in outputs/digits_cdrl
for benchmarks/sampling_steps.py. ``--skip_training`` reuses it (the baseline's budget then needs
``--baseline_minutes``); ``--skip_baseline`` leaves the baseline out, and ``--reuse_baseline FILE`` copies its numbers
from an earlier results file instead of training it again (its samples are then missing from the figure). A smoke
run of every stage (a minute or two):
``--train_steps 3 --samples_per_class 2 --baseline_minutes 0.1`` with ``--results``, ``--figures`` and
``--model_dir`` pointing outside docs/ and outputs/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import diffusers  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from diffusion_baseline import ddim_sample, train_baseline  # noqa: E402

from cdrl_diffusers import CDRLPipeline, training  # noqa: E402
from cdrl_diffusers.data import load_digits_dataset  # noqa: E402
from cdrl_diffusers.evaluation import (  # noqa: E402
    ClassifierFeatures,
    classifier_accuracy,
    extract_features,
    feature_diversity,
    frechet_distance,
    kernel_distance,
    ood_auroc,
    score_samples,
    shift_images,
    train_classifier,
)
from cdrl_diffusers.validation import cli_fraction_or_count, cli_positive_float, cli_positive_int  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GUIDANCE_SCALES = (0.0, 0.5, 1.0, 2.0, 3.0)
# The CPU training recipe (docs/training.md, "Why the image models learned so little"): the training script's
# defaults (the three-resolution EBM, K = 8, the initializer regressing on the data as App. G.2's CDRL(data) with a
# quarter of the chains started by its frozen initial weights, the learning rate's cosine decay), 1,700 steps planned
# (15 to 27 minutes on one thread of the machines we measured; the cosine decay spans them) and stopped at 28 minutes
# in any case. The EBM keeps the spectral norm of App. A.1, which the `cpu` preset drops: without it, a run twice as
# long broke at noise level 0 (three roll-backs, the first at step 2,240 of 3,400); with it, it did not. Both networks
# keep the channels this recipe was measured with, (32, 64, 128) and (32, 64) (the preset's are now (16, 32, 64) and
# (16, 32), chosen on the shapes). Handwriting has a handedness that no chain visits: a quarter of each batch, flipped
# left-right, is ranked below the data (negative data augmentation, --negative_shifts), so the flip is a shift the
# model has been shown, not an unseen one. A flag whose value is None is a switch.
# benchmarks/sampling_steps.py compares K' = 15, 8, 5 and 3 on the same model. A fifth of the digits is held out from
# training (--validation_split, drawn with --seed), the in-distribution set of the OOD test.
TRAINING_FLAGS = {
    "--embedded_dataset": "digits",
    "--label_column": "label",
    "--resolution": "16",
    "--validation_split": "0.2",
    "--num_langevin_steps": "8",
    "--train_batch_size": "32",
    "--max_train_minutes": "28",
    "--max_train_steps": "1700",
    "--ebm_spectral_norm": None,
    "--ebm_channels": "32,64,128",
    "--initializer_channels": "32,64",
    "--initializer_target": "data",
    "--frozen_initializer_share": "0.25",
    "--lr_decay": "cosine",
    "--ebm_learning_rate": "5e-4",
    "--initializer_learning_rate": "1e-3",
    "--lr_warmup_steps": "200",
    "--label_dropout": "0.1",
    "--seed": "0",
    "--checkpointing_steps": "1000",
    "--save_images_steps": "1000",
    "--negative_shifts": "flipped",
}
# The out-of-distribution sets of the OOD test (``shift_images``), by their names in the table.
OOD_SETS = {
    "rotated": "rotated 90° counter-clockwise",
    "flipped": "flipped left-right",
    "upside_down": "flipped upside down",
    "periodic": "periodic gratings",
    "uniform": "uniform noise",
    "shuffled": "shuffled pixels",
}


# --------------------------------------------------------------------------------------------------------------------
# Data, classifier, models
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


def model_training_digits(flags: dict[str, str]) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The digits ``examples/train_cdrl.py`` trains on with ``flags`` and the ones it holds out, as (images, labels).

    The same loading, labelling and ``--validation_split`` draw (seeded by ``--seed``) as the training script, so
    the baseline trains on exactly CDRL's training digits and the OOD test scores digits neither model has seen.
    """
    resolution = int(flags["--resolution"])
    dataset, _ = training.load_embedded_dataset(flags["--embedded_dataset"], resolution)
    dataset, _ = training.conditioning_for(dataset, flags["--label_column"])
    split = cli_fraction_or_count(flags["--validation_split"])
    rows, held_out = training.split_dataset(dataset, split, None, int(flags["--seed"]))
    return tuple(training.image_tensors(part, "image", resolution, 1, "label") for part in (rows, held_out))


def evaluation_classifier(splits: DigitSplits, cache_dir: str | os.PathLike):
    """The seeded digits classifier (cached), and its accuracy on the two held-out parts."""
    classifier = train_classifier(*splits.train, num_classes=10, cache_dir=cache_dir, seed=0)
    held_out = {
        "reference": classifier_accuracy(classifier, *splits.reference),
        "real": classifier_accuracy(classifier, *splits.real),
    }
    return classifier, held_out


def train_model(model_dir: Path, flags: dict[str, str | None], threads: int) -> float:
    """Run examples/train_cdrl.py in a subprocess with ``threads`` CPU threads; return the wall-clock seconds."""
    command = [sys.executable, str(REPO / "examples" / "train_cdrl.py"), "--output_dir", str(model_dir)]
    command += ["--cpu_threads", str(threads)]
    for flag, value in flags.items():
        command += [flag] if value is None else [flag, value]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("Training:", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environment, cwd=REPO)
    return time.perf_counter() - start


def load_pipeline(model_dir: Path) -> CDRLPipeline:
    pipeline = CDRLPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# --------------------------------------------------------------------------------------------------------------------
# Sampling and scoring
# --------------------------------------------------------------------------------------------------------------------
def noise_chunks(labels: torch.Tensor, sample_shape: tuple[int, ...], seed: int, batch_size: int):
    """(labels, generator, initial noise) per chunk of ``batch_size``: chunk i always starts from the noise of
    ``seed + i``, so two samplers (or two settings) given the same labels start from the same noise."""
    for index, start in enumerate(range(0, len(labels), batch_size)):
        chunk = labels[start : start + batch_size]
        generator = torch.Generator().manual_seed(seed + index)
        yield chunk, generator, randn_tensor((len(chunk), *sample_shape), generator=generator, dtype=torch.float32)


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

    Chunk i always starts from the noise of ``seed + i`` (``noise_chunks``), so settings differ only in how they
    sample.
    """
    samples, seconds = [], 0.0
    for chunk, generator, latents in noise_chunks(labels, pipeline.sample_shape, seed, batch_size):
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


def generate_baseline(
    model: UNet2DModel,
    scheduler: DDIMScheduler,
    labels: torch.Tensor,
    guidance_scale: float = 0.0,
    num_inference_steps: int = 50,
    seed: int = 0,
    batch_size: int = 250,
) -> tuple[torch.Tensor, float]:
    """Guided DDIM samples of the diffusion baseline for ``labels`` and the sampling wall-clock seconds, from the same
    initial noise as ``generate`` with the same ``seed`` and ``batch_size``."""
    sample_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    samples, seconds = [], 0.0
    for chunk, _, latents in noise_chunks(labels, sample_shape, seed, batch_size):
        begin = time.perf_counter()
        samples.append(ddim_sample(model, scheduler, latents, chunk, guidance_scale, num_inference_steps))
        seconds += time.perf_counter() - begin
    return torch.cat(samples), seconds


def guidance_sweep(
    name: str, sample: Callable[[float], tuple[torch.Tensor, float]], classifier, labels: torch.Tensor, reference
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Scores of ``sample(w) -> (samples, seconds)`` at every guidance weight, and each weight's first 20 samples."""
    sweep, rows = [], {}
    for scale in GUIDANCE_SCALES:
        samples, seconds = sample(scale)
        scores = score_samples(classifier, samples, labels, *reference)
        per_image = seconds / len(labels)
        sweep.append(
            {"guidance_scale": scale, **scores.to_dict(), "sampling_seconds": seconds, "seconds_per_image": per_image}
        )
        rows[f"{name} w = {scale:g}"] = samples[:20]
        print(
            f"{name} w={scale:<4g} accuracy={scores.accuracy:.3f} FD={scores.frechet_distance:.3f} "
            f"KID={scores.kid_mean:.4f}±{scores.kid_std:.4f} diversity={scores.diversity:.3f} "
            f"({seconds:.1f} s, {per_image * 1000:.1f} ms per image)",
            flush=True,
        )
    return sweep, rows


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


def ood_scores(pipeline: CDRLPipeline, held_out: torch.Tensor, trained_on: torch.Tensor, seed: int = 0) -> dict:
    """OOD detection by CDRL's unconditional log-density at noise level 0 (Sec. 4.4).

    The AUROC of the held-out digits (positives) against each set of ``OOD_SETS`` made from them with a seeded
    generator, and against the training digits: about 0.5 there means held-out digits score like trained-on ones
    (no memorisation); well below 0.5, the model prefers the digits it was trained on.
    """
    generator = torch.Generator().manual_seed(seed)
    in_scores = pipeline.log_density(held_out)
    aurocs = {
        name: ood_auroc(in_scores, pipeline.log_density(shift_images(held_out, shift, generator)))
        for shift, name in OOD_SETS.items()
    }
    for name, auroc in aurocs.items():
        print(f"CDRL OOD AUROC, held-out digits vs {name}: {auroc:.3f}", flush=True)
    return {
        "auroc": aurocs,
        "held_out_vs_training_auroc": ood_auroc(in_scores, pipeline.log_density(trained_on)),
        "num_in_distribution": len(held_out),
        "score": "log_density(images), null class, noise_level=0",
    }


# --------------------------------------------------------------------------------------------------------------------
# Figures and tables
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
    figure, axis = plt.subplots(figsize=(0.42 * columns + 1.6, 0.42 * len(rows) + 0.6))
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
    """Accuracy, FD and diversity against w for CDRL and, when it ran, the diffusion baseline."""
    models = [("CDRL samples", results["cdrl"]), ("diffusion baseline (DDIM)", results["diffusion_baseline"])]
    real = results["real_data"]
    panels = [
        ("accuracy", "classifier accuracy (higher: more recognisable)"),
        ("frechet_distance", "Fréchet classifier distance (lower: closer to data)"),
        ("diversity", "within-class diversity"),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (key, label) in zip(axes, panels):
        for (name, section), marker in zip(models, ("o-", "s--")):
            if section is not None:
                sweep = section["guidance_sweep"]
                axis.plot([row["guidance_scale"] for row in sweep], [row[key] for row in sweep], marker, label=name)
        axis.axhline(real[key], color="gray", linestyle=":", label="held-out real digits")
        axis.set_xlabel("guidance weight w")
        axis.set_title(label, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("Classifier-free guidance on 16x16 digits (cf. the paper's Fig. 3)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_tables(results: dict) -> None:
    """The guidance sweep of both models side by side, then the OOD AUROCs, as markdown."""
    cdrl, baseline = results["cdrl"], results["diffusion_baseline"]
    models = [("CDRL", cdrl)] + ([("DDIM", baseline)] if baseline is not None else [])
    header = " | ".join(f"{name} {column}" for name, _ in models for column in ("acc.", "FD", "div.", "ms/img"))
    print(f"\n| w | {header} |\n|---|" + "---|" * (4 * len(models)))
    for index, scale in enumerate(GUIDANCE_SCALES):
        cells = []
        for _, section in models:
            row = section["guidance_sweep"][index]
            cells += [f"{row['accuracy']:.3f}", f"{row['frechet_distance']:.2f}", f"{row['diversity']:.2f}"]
            cells.append(f"{row['seconds_per_image'] * 1000:.1f}")
        print(f"| {scale:g} | " + " | ".join(cells) + " |")
    real = results["real_data"]
    cells = [f"{real['accuracy']:.3f}", f"{real['frechet_distance']:.2f}", f"{real['diversity']:.2f}", "–"]
    print("| real held-out digits | " + " | ".join(cells * len(models)) + " |")
    baseline_cell = [] if baseline is None else ["no density"]
    print("\n| OOD set (vs held-out digits) | CDRL AUROC |" + " diffusion baseline |" * len(baseline_cell))
    print("|---|---|" + "---|" * len(baseline_cell))
    ood = cdrl["ood"]
    for name, auroc in [
        *ood["auroc"].items(),
        ("training digits (same distribution)", ood["held_out_vs_training_auroc"]),
    ]:
        print(" | ".join(["", name, f"{auroc:.3f}", *baseline_cell, ""]).strip())


# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, default=REPO / "outputs" / "digits_cdrl")
    parser.add_argument("--skip_training", action="store_true", help="Reuse the pipeline in --model_dir.")
    parser.add_argument(
        "--train_steps", type=cli_positive_int, default=None, help="Override the recipe's --max_train_steps."
    )
    parser.add_argument("--samples_per_class", type=cli_positive_int, default=50)
    parser.add_argument("--threads", type=cli_positive_int, default=1, help="CPU threads for training and sampling.")
    parser.add_argument("--skip_baseline", action="store_true", help="Leave out the diffusion baseline.")
    parser.add_argument(
        "--baseline_minutes",
        type=cli_positive_float,
        default=None,
        help="The baseline's training budget (default: CDRL's measured training time; needed with --skip_training).",
    )
    parser.add_argument(
        "--reuse_baseline",
        type=Path,
        help="Copy the baseline's section from an earlier results file (it does not depend on CDRL's recipe).",
    )
    parser.add_argument("--baseline_ddim_steps", type=cli_positive_int, default=50, help="DDIM steps per sample.")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "digits_guidance.json")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--classifier_cache", type=Path, default=REPO / "outputs" / "classifier_cache")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if args.samples_per_class < 2:
        raise ValueError(
            f"`--samples_per_class` must be at least 2 (diversity is measured within a class), "
            f"got {args.samples_per_class}."
        )
    if args.reuse_baseline is not None:
        if args.skip_baseline:
            raise ValueError("`--reuse_baseline` and `--skip_baseline` exclude each other.")
        if not args.reuse_baseline.is_file():
            raise ValueError(f"`--reuse_baseline`: {args.reuse_baseline} is not a results file.")
        if json.loads(args.reuse_baseline.read_text()).get("diffusion_baseline") is None:
            raise ValueError(f"`--reuse_baseline`: {args.reuse_baseline} has no diffusion_baseline section.")
    elif args.skip_training and not args.skip_baseline and args.baseline_minutes is None:
        raise ValueError(
            "`--baseline_minutes` is needed with `--skip_training`: the baseline's budget defaults to CDRL's "
            "training time, which this run does not measure (or pass `--skip_baseline`)."
        )


def run_baseline(
    args: argparse.Namespace, budget_seconds: float, digits, classifier, labels: torch.Tensor, reference
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train the diffusion baseline on ``digits`` for ``budget_seconds``, then sweep w with guided DDIM."""
    baseline = train_baseline(*digits, 10, budget_seconds)
    sweep, rows = guidance_sweep(
        "DDIM",
        lambda scale: generate_baseline(baseline.model, baseline.ddim, labels, scale, args.baseline_ddim_steps),
        classifier,
        labels,
        reference,
    )
    section = {
        **baseline.description,
        "sampler": f"DDIMScheduler, {args.baseline_ddim_steps} steps, eta 0",
        "guidance_sweep": sweep,
        "ood": "none: a noise-prediction model has no density to score inputs with",
    }
    return section, rows


def main(args: argparse.Namespace) -> dict:
    check_args(args)
    torch.set_num_threads(args.threads)
    flags = dict(TRAINING_FLAGS)
    if args.train_steps is not None:
        flags["--max_train_steps"] = str(args.train_steps)
    training_seconds = None
    if not args.skip_training:
        training_seconds = train_model(args.model_dir, flags, args.threads)
    pipeline = load_pipeline(args.model_dir)
    parameters = {
        "energy_model": pipeline.energy_model.num_parameters(),
        "initializer": pipeline.initializer.num_parameters(),
    }
    parameters["total"] = parameters["energy_model"] + parameters["initializer"]
    print(f"CDRL: {parameters['total']:,} parameters ({parameters})", flush=True)

    splits = digit_splits()
    trained_on, held_out = model_training_digits(flags)
    classifier, classifier_accuracies = evaluation_classifier(splits, args.classifier_cache)
    print(f"Classifier accuracy on held-out digits: {classifier_accuracies}", flush=True)
    labels = torch.arange(10 * args.samples_per_class) % 10

    sweep, rows = guidance_sweep(
        "CDRL", lambda scale: generate(pipeline, labels, guidance_scale=scale), classifier, labels, splits.reference
    )
    cdrl = {
        "parameters": parameters,
        "train_seconds": training_seconds,
        "num_langevin_steps": pipeline.scheduler.config.num_langevin_steps,
        "guidance_sweep": sweep,
        "ood": ood_scores(pipeline, held_out[0], trained_on[0]),
    }
    baseline = None
    if args.reuse_baseline is not None:  # its samples are not in this run's figure
        baseline = json.loads(args.reuse_baseline.read_text())["diffusion_baseline"]
        baseline["reused_from"] = baseline.get("reused_from", args.reuse_baseline.name)
    elif not args.skip_baseline:
        budget = training_seconds if args.baseline_minutes is None else 60 * args.baseline_minutes
        baseline, baseline_rows = run_baseline(args, budget, trained_on, classifier, labels, splits.reference)
        rows.update(baseline_rows)
    real = real_data_scores(classifier, splits)
    print(f"held-out real digits: {real}", flush=True)

    results = {
        "description": (
            "Class-conditional CDRL on 16x16 digits beside a same-budget class-conditional diffusion model "
            "(UNet2DModel, DDIM): guidance sweeps scored by an offline classifier, and CDRL's log-density as an "
            "OOD score."
        ),
        "command": shlex.join(["python", "benchmarks/digits_guidance.py", *sys.argv[1:]]),
        "training_flags": flags,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "samples_per_class": args.samples_per_class,
        "classifier_held_out_accuracy": classifier_accuracies,
        "reference_set_size": len(splits.reference[0]),
        "training_digits": len(trained_on[0]),
        "held_out_digits": len(held_out[0]),
        "cdrl": cdrl,
        "diffusion_baseline": baseline,
        "real_data": real,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.figures.mkdir(parents=True, exist_ok=True)
    save_tradeoff_plot(results, args.figures / "digits_guidance.png")
    save_sample_rows(
        rows,
        args.figures / "digits_guidance_samples.png",
        "Same initial noise and labels (0-9, 0-9) in each column; only the model and w change",
    )
    print_tables(results)
    print(f"\nWrote {args.results} and figures in {args.figures}")
    return results


if __name__ == "__main__":
    main(parse_args())
