#!/usr/bin/env python
"""The default main job as a new user runs it, timed and scored: `accelerate launch examples/train_cdrl.py`.

    python benchmarks/main_job.py                  # trains outputs/cdrl-shapes (no flags), then scores it
    python benchmarks/main_job.py --skip_training  # scores the pipeline already in outputs/cdrl-shapes

The script launches the training exactly as the README does (no flags: the embedded coloured shapes, 16x16,
unconditional) and records its wall-clock time. It then draws unconditional samples from the exported pipeline and
reads each with the attribute detector of ``benchmarks/downstream.py``. That detector needs no learning and follows the
documented rendering of ``cdrl_diffusers.data.shapes``. The scores:

- clean: the fraction of samples that show one clean, detectable shape in one of the dataset's colours (real images:
  100 %);
- pairs: how many of the 9 (shape, colour) pairs appear, and how often each does (the dataset draws them uniformly);
- clean from real x_L: the clean fraction when sampling starts at level L from real held-out shapes noised to x_L
  (L = 1..T), which shows at which noise levels the samples go wrong;
- OOD: the AUROC of the level-0 ``log_density`` of held-out shapes against shifted copies of them (``shift_images``).

``--baseline`` also trains the model a user would pick instead, an unconditional diffusers DDPM (the digits
benchmark's ``UNet2DModel``), on the same shapes for as long as CDRL's training took and on as many threads (its model
card records them; ``accelerate launch`` gives a CPU process one), and scores its DDIM samples the same way;
``--baseline_minutes M`` trains it for M minutes (e.g. with ``--skip_training``), and ``--reuse_baseline FILE``
copies that section from an earlier results file instead.

It writes docs/results/main_job.json and docs/figures/main_job_samples.png (samples beside training images).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid
from diffusion_baseline import ddim_sample, train_baseline
from downstream import as_array, detect_batch, to_model_input

from cdrl_diffusers import CDRLPipeline, read_model_card_section
from cdrl_diffusers.data import COLORS, SHAPES, load_shapes_dataset
from cdrl_diffusers.evaluation import ood_auroc, shift_images
from cdrl_diffusers.training import image_tensors, load_embedded_dataset
from cdrl_diffusers.validation import cli_positive_float, cli_positive_int

ROOT = Path(__file__).resolve().parents[1]
OOD_SETS = ("uniform", "shuffled", "inverted", "rotated", "periodic")


def train(output_dir: Path) -> float:
    """`accelerate launch examples/train_cdrl.py` (the README's command, plus the output folder): its seconds."""
    # The `accelerate` of this interpreter's environment, found even when that environment is not activated.
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [accelerate, "launch", "examples/train_cdrl.py", "--output_dir", str(output_dir)]
    print("Training:", shlex.join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - start


def score_samples(images: np.ndarray) -> dict:
    """Clean-shape fraction and (shape, colour) pair counts of (N, H, W, 3) images in [0, 1]."""
    found = detect_batch(images)
    clean = [pair for pair in found if pair[0] is not None]
    counts = collections.Counter(clean)
    pairs = {f"{shape}/{colour}": counts.get((shape, colour), 0) for shape in SHAPES for colour in COLORS}
    return {
        "clean": len(clean) / len(found),
        "pairs_present": sum(count > 0 for count in pairs.values()),
        "pair_counts": pairs,
        "num_samples": len(found),
    }


def clean_from_real_levels(pipeline: CDRLPipeline, real: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Where do samples go wrong? Start Algorithm 2 at x_L made from real held-out shapes (L = 1..T) and score.

    x_L = alpha_bar_L x_0 + sigma_bar_L eps is fed in through ``callback_on_step_end`` after level L has run (or as the
    latents for L = T), so levels L - 1..0 refine real noisy data. A drop between L and L + 1 is the loss of level L.
    """
    scheduler = pipeline.scheduler
    scores = {}
    for level in range(1, scheduler.num_noise_levels + 1):
        generator = torch.Generator().manual_seed(seed)
        start = scheduler.add_noise(real, torch.randn(real.shape, generator=generator), level)

        def replace(pipe, index, timestep, callback_kwargs, level=level, start=start):
            return {"latents": start} if timestep == level else {}

        samples = pipeline(
            batch_size=len(real),
            latents=start if level == scheduler.num_noise_levels else None,
            callback_on_step_end=None if level == scheduler.num_noise_levels else replace,
            generator=generator,
            output_type="np",
        ).images
        scores[f"x_{level}"] = score_samples(samples)["clean"]
    return scores


def diffusion_baseline(minutes: float, threads: int, num_samples: int, ddim_steps: int) -> dict:
    """The model a user would pick instead, on the same shapes for ``minutes`` on ``threads``: a diffusers DDPM.

    The digits benchmark's ``UNet2DModel`` and training choices (epsilon loss, AdamW, batch 64), one class and no
    label dropout; sampled with deterministic DDIM on the scoring threads and scored by the same detector as CDRL's.
    """
    dataset, _ = load_embedded_dataset("shapes", 16)
    images, _ = image_tensors(dataset, "image", 16, 3)
    labels = torch.zeros(len(images), dtype=torch.long)
    scoring_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.enable_grad():  # main() scores under no_grad
            baseline = train_baseline(images, labels, 1, 60 * minutes, label_dropout=0.0)
    finally:
        torch.set_num_threads(scoring_threads)
    latents = torch.randn(num_samples, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    samples = ddim_sample(baseline.model, baseline.ddim, latents, labels[:num_samples], 0.0, ddim_steps)
    seconds = time.perf_counter() - start
    scores = score_samples((samples.permute(0, 2, 3, 1).numpy() + 1) / 2)
    print(f"Diffusion baseline: clean {scores['clean']:.3f}, pairs {scores['pairs_present']}/9")
    return {
        **baseline.description,
        "training_threads": threads,
        "sampling_threads": scoring_threads,
        "sampler": f"DDIMScheduler, {ddim_steps} steps, eta 0",
        "samples": scores,
        "sampling_seconds_per_image": seconds / num_samples,
    }


def save_figure(samples: np.ndarray, real: np.ndarray, path: Path, columns: int = 8, upscale: int = 4) -> None:
    """Samples (left) beside training images (right), 8 x 8 each."""
    count = columns * columns
    panels = []
    for images in (samples[:count], real[:count]):
        pil = [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
        panels.append(np.asarray(make_image_grid(pil, rows=columns, cols=columns)))
    gap = np.full((panels[0].shape[0], 4, 3), 128, dtype=np.uint8)
    canvas = PIL.Image.fromarray(np.concatenate([panels[0], gap, panels[1]], axis=1))
    canvas.resize((canvas.width * upscale, canvas.height * upscale), PIL.Image.Resampling.NEAREST).save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "cdrl-shapes")
    parser.add_argument("--skip_training", action="store_true", help="Score the pipeline in --output_dir.")
    parser.add_argument("--num_samples", type=cli_positive_int, default=576, help="Unconditional samples to score.")
    parser.add_argument("--num_ood_images", type=cli_positive_int, default=512, help="Held-out shapes for OOD.")
    parser.add_argument("--threads", type=cli_positive_int, default=1, help="CPU threads for scoring.")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="Also train and score a diffusers DDPM on the shapes for as long as CDRL's training took.",
    )
    parser.add_argument(
        "--baseline_minutes",
        type=cli_positive_float,
        help="Also train and score a diffusers DDPM on the shapes for this many minutes.",
    )
    parser.add_argument(
        "--reuse_baseline",
        type=Path,
        help="Copy the baseline's section from an earlier results file (it does not depend on CDRL's recipe).",
    )
    parser.add_argument(
        "--baseline_threads",
        type=cli_positive_int,
        help="The baseline's training threads (default: those of CDRL's training, from its model card).",
    )
    parser.add_argument("--baseline_ddim_steps", type=cli_positive_int, default=50)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "main_job.json")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "figures" / "main_job_samples.png")
    args = parser.parse_args(argv)
    given = [flag for flag in ("--baseline", "--baseline_minutes", "--reuse_baseline") if getattr(args, flag[2:])]
    if len(given) > 1:
        parser.error(f"`{given[0]}` and `{given[1]}` exclude each other.")
    if args.baseline and args.skip_training:
        parser.error(
            "`--baseline` trains for CDRL's training time, which `--skip_training` does not measure: "
            "pass `--baseline_minutes` instead."
        )
    if args.reuse_baseline is not None:
        try:
            reusable = "diffusion_baseline" in json.loads(args.reuse_baseline.read_text())
        except (OSError, ValueError):
            reusable = False
        if not reusable:
            parser.error(f"`--reuse_baseline`: {args.reuse_baseline} is not a results file with a diffusion_baseline.")
    return args


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    training_seconds = None if args.skip_training else train(args.output_dir)
    torch.set_num_threads(args.threads)
    pipeline = CDRLPipeline.from_pretrained(args.output_dir)
    pipeline.set_progress_bar_config(disable=True)

    start = time.perf_counter()
    samples = pipeline(
        batch_size=args.num_samples, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    sampling_seconds = time.perf_counter() - start
    scores = score_samples(samples)
    # Held-out shapes: a seed the training set (seed 0) does not use.
    held_out = load_shapes_dataset(num_samples=args.num_ood_images, seed=1)
    real = as_array(held_out["image"])
    real_scores = score_samples(real)
    images = to_model_input(real)
    generator = torch.Generator().manual_seed(0)
    in_scores = pipeline.log_density(images)
    ood = {
        shift: ood_auroc(in_scores, pipeline.log_density(shift_images(images, shift, generator))) for shift in OOD_SETS
    }
    from_real = clean_from_real_levels(pipeline, images[: args.num_samples])
    print(f"samples: clean {scores['clean']:.3f}, pairs {scores['pairs_present']}/9 {scores['pair_counts']}")
    print(f"real held-out shapes: clean {real_scores['clean']:.3f}, pairs {real_scores['pairs_present']}/9")
    print("clean samples when levels L - 1..0 start from real noisy shapes x_L:", from_real)
    print("OOD AUROC:", {name: round(value, 3) for name, value in ood.items()})

    card_facts = {
        **read_model_card_section(args.output_dir, "Model"),
        **read_model_card_section(args.output_dir, "Training"),
    }
    results = {
        "description": "The default main job (accelerate launch examples/train_cdrl.py), timed and scored.",
        "command": shlex.join(["python", "benchmarks/main_job.py", *sys.argv[1:]]),
        # With --skip_training the model was trained elsewhere: its model card facts below say how.
        "training_command": None if args.skip_training else "accelerate launch examples/train_cdrl.py",
        "training_seconds": training_seconds,
        "model_card_facts": card_facts,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "samples": scores,
        "sampling_seconds_per_image": sampling_seconds / args.num_samples,
        "real_held_out": real_scores,
        "clean_from_real_x_L": from_real,
        "ood_auroc": ood,
    }
    baseline_minutes = training_seconds / 60 if args.baseline else args.baseline_minutes
    if baseline_minutes:
        threads = args.baseline_threads or int(card_facts.get("CPU threads per process", args.threads))
        results["diffusion_baseline"] = diffusion_baseline(
            baseline_minutes, threads, args.num_samples, args.baseline_ddim_steps
        )
    elif args.reuse_baseline is not None:
        baseline = json.loads(args.reuse_baseline.read_text())["diffusion_baseline"]
        results["diffusion_baseline"] = {
            **baseline,
            "reused_from": baseline.get("reused_from", args.reuse_baseline.name),
        }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    save_figure(samples, real, args.figure)
    print(f"Wrote {args.results} and {args.figure}")
    return results


if __name__ == "__main__":
    main(parse_args())
