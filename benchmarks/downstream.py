#!/usr/bin/env python
"""Downstream tasks of a CDRL model on the embedded coloured shapes: composition, inpainting and OOD detection.

    flock /tmp/cdrl_heavy.lock python benchmarks/downstream.py      # trains (CPU), evaluates, writes docs/

1. Trains a compositional model with ``examples/train_cdrl.py --attribute_columns shape color
   --conditional_initializer`` (Sec. 4.5: every image is assigned to the class of one randomly picked attribute;
   conditional EBM; the initializer conditional too, so that its proposals can be composed;
   ``--no-conditional_initializer`` trains the paper's unconditional one).
2. Composition: for each of the 9 (shape, colour) pairs, samples with Eq. 14 and with the product of experts
   (Du et al., 2020) at w in {0, 1, 3}, each with the initializer's unconditional proposals (the paper's) and with
   its proposals composed by the same weights; a detector that needs no learning measures shape and colour from the
   pixels (it follows the documented rendering of ``cdrl_diffusers.data.shapes``) and gives the accuracy.
3. Inpainting (App. C): held-out images with their right half masked, several seeds each; squared error on the
   masked region and attribute recovery, against filling the region with the training set's mean image or black.
4. OOD (Sec. 4.4): AUROC of the level-0 log-density of held-out shapes against uniform noise, shuffled pixels,
   inverted images, interpolated pairs and the digits dataset.

Numbers go to docs/results/downstream.json and docs/results/downstream.md, grids to docs/figures/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid
from scipy import ndimage

from cdrl_diffusers import CDRLComposePipeline, CDRLInpaintPipeline, read_model_card_section
from cdrl_diffusers.data import COLORS, SHAPES, load_digits_dataset, load_shapes_dataset, shape_mask
from cdrl_diffusers.evaluation import OOD_SHIFTS, ood_auroc, shift_images
from cdrl_diffusers.validation import cli_positive_int

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 16
GUIDANCE_SCALES = (0.0, 1.0, 3.0)
# Composition methods: the energies' rule (Eq. 14, or the product of experts without its negative unconditional term),
# and whether the initializer's proposals are composed by the same weights (a class-conditional initializer, trained
# with --conditional_initializer) or come from its unconditional term, as in the paper.
METHODS = {
    "eq14": ("Eq. 14", False, False),
    "poe": ("product of experts", True, False),
    "eq14_ci": ("Eq. 14, composed initializer", False, True),
    "poe_ci": ("product of experts, composed initializer", True, True),
}

# Pixel-based attribute detector (see the rendering rules in cdrl_diffusers/data/shapes.py): the background is
# black and every colour has a channel >= 200, so a pixel is foreground when its brightest channel exceeds half of
# that. The shape is read from the largest 8-connected foreground component, by its best match among exactly
# rendered templates: every shape, every box side from SIDES (the dataset uses 8 and 12 px; in-between sizes count)
# and every position. An image counts as showing a clean shape only if that match has an intersection over union
# of at least MIN_TEMPLATE_IOU (a 12 px square missing one corner pixel scores 0.99; half the blobs of the 768-step CPU
# model score 0.67-0.78), little
# foreground lies outside the component and its mean colour is close to one of COLORS. Real images match their
# template exactly, with no stray pixels and zero colour distance.
FOREGROUND_THRESHOLD = 100.0
MIN_FOREGROUND_PIXELS = 12
MAX_STRAY_FRACTION = 0.25
MAX_COLOUR_DISTANCE = 80.0
MIN_TEMPLATE_IOU = 0.8
SIDES = range(6, 15)


def shape_templates(resolution: int = RESOLUTION) -> tuple[np.ndarray, list[str]]:
    """Every shape of every side in SIDES at every position: boolean masks (N, H, W) and their shape names."""
    masks, names = [], []
    for shape in SHAPES:
        for side in SIDES:
            for top in range(resolution - side + 1):
                for left in range(resolution - side + 1):
                    masks.append(shape_mask(shape, side, resolution, top, left))
                    names.append(shape)
    return np.stack(masks), names


TEMPLATES, TEMPLATE_SHAPES = shape_templates()
TEMPLATE_AREAS = TEMPLATES.reshape(len(TEMPLATES), -1).sum(axis=1)


def detect_attributes(image: np.ndarray) -> tuple[str | None, str | None]:
    """(shape, colour) of an (H, W, 3) image in [0, 1], or (None, None) when it shows no clean shape."""
    pixels = image.astype(np.float64) * 255.0
    foreground = pixels.max(axis=-1) > FOREGROUND_THRESHOLD
    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    if count == 0:
        return None, None
    sizes = np.bincount(labels.ravel())[1:]
    component = labels == (int(np.argmax(sizes)) + 1)
    area = int(component.sum())
    if area < MIN_FOREGROUND_PIXELS or foreground.sum() - area > MAX_STRAY_FRACTION * area:
        return None, None
    mean = pixels[component].mean(axis=0)
    distances = {name: float(np.sqrt(np.sum((mean - np.array(rgb)) ** 2))) for name, rgb in COLORS.items()}
    colour = min(distances, key=distances.get)
    if distances[colour] > MAX_COLOUR_DISTANCE:
        return None, None
    intersection = TEMPLATES.reshape(len(TEMPLATES), -1) @ component.ravel().astype(np.int64)
    iou = intersection / (TEMPLATE_AREAS + area - intersection)
    best = int(np.argmax(iou))
    if iou[best] < MIN_TEMPLATE_IOU:
        return None, None
    return TEMPLATE_SHAPES[best], colour


def detect_batch(images: np.ndarray) -> list[tuple[str | None, str | None]]:
    return [detect_attributes(image) for image in images]


def attribute_names(rows) -> list[tuple[str, str]]:
    shape_names, colour_names = rows.features["shape"].names, rows.features["color"].names
    return [(shape_names[row["shape"]], colour_names[row["color"]]) for row in rows]


def as_array(images: list[PIL.Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])


def to_model_input(array: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(array).permute(0, 3, 1, 2) * 2.0 - 1.0


def save_grid(array: np.ndarray, rows: int, path: Path, upscale: int = 4) -> None:
    images = [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in array]
    grid = make_image_grid(images, rows=rows, cols=len(images) // rows)
    grid.resize((grid.width * upscale, grid.height * upscale), PIL.Image.Resampling.NEAREST).save(path)


# ---------------------------------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------------------------------
# The training script's flags this benchmark passes on when given; left out, the script's defaults (the main job's
# recipe) apply, so the benchmark follows the script without repeating its numbers.
TRAINING_FLAGS = ("max_train_steps", "train_batch_size", "num_langevin_steps", "mixed_precision", "cpu_threads")


def training_command(args: argparse.Namespace, model_dir: Path) -> list[str]:
    """`examples/train_cdrl.py` on the shapes with `--attribute_columns shape color` and the flags given here."""
    command = [
        sys.executable,
        str(ROOT / "examples" / "train_cdrl.py"),
        "--embedded_dataset=shapes",
        "--attribute_columns",
        "shape",
        "color",
        f"--resolution={RESOLUTION}",
        f"--seed={args.seed}",
        f"--output_dir={model_dir}",
    ]
    command += [f"--{name}={getattr(args, name)}" for name in TRAINING_FLAGS if getattr(args, name) is not None]
    return command + ["--conditional_initializer" if args.conditional_initializer else "--no-conditional_initializer"]


def train(args: argparse.Namespace, model_dir: Path) -> float:
    """Train with the example script; returns the wall-clock seconds."""
    command = training_command(args, model_dir)
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.time() - start


def training_summary(model_dir: Path) -> str:
    """What the trained model's card says about its training: steps, batch, K, precision and time."""
    details = read_model_card_section(model_dir, "Training")
    keys = ("Optimisation steps", "Batch size", "Langevin steps K", "Mixed precision", "Training time")
    return "; ".join(f"{key}: {details[key]}" for key in keys if key in details)


def network_precision(args: argparse.Namespace) -> torch.autocast:
    """The networks' precision while sampling: bf16 autocast (fast only with AMX) or float32; the chain: float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16")


def compose_samples(args, pipe, concepts, method, guidance_scale, seed) -> np.ndarray:
    _, product_of_experts, compose_initializer = METHODS[method]
    with network_precision(args):
        return pipe(
            concepts,
            guidance_scale=guidance_scale,
            batch_size=args.num_compose_samples,
            generator=torch.Generator().manual_seed(seed),
            product_of_experts=product_of_experts,
            compose_initializer=compose_initializer,
            output_type="np",
        ).images


def composition_methods(pipe: CDRLComposePipeline) -> list[str]:
    """The methods of METHODS this model can run: a composed initializer needs a class-conditional one."""
    conditional = pipe.initializer.config.num_class_embeds is not None
    return [method for method, (_, _, composed) in METHODS.items() if conditional or not composed]


def composition(args: argparse.Namespace, pipe: CDRLComposePipeline, figures: Path) -> dict:
    """Accuracy of both attributes (and of each) over the 9 (shape, colour) pairs, per method and w.

    All methods use the same seeds, so their samples are paired; ``paired`` counts the samples that only one of
    them gets right.
    """
    pairs = [(shape, colour) for shape in SHAPES for colour in COLORS]
    results: dict = {}
    correct: dict[str, np.ndarray] = {}
    for method in composition_methods(pipe):
        for guidance_scale in GUIDANCE_SCALES:
            grid, found, shapes, colours, both = [], [], [], [], []
            for index, (shape, colour) in enumerate(pairs):
                concepts = [f"shape={shape}", f"color={colour}"]
                # The same seed for every method and w: cells at the same position start from the same noise.
                images = compose_samples(args, pipe, concepts, method, guidance_scale, args.seed + index)
                grid.append(images[: args.grid_columns])
                for found_shape, found_colour in detect_batch(images):
                    found.append(found_shape is not None)
                    shapes.append(found_shape == shape)
                    colours.append(found_colour == colour)
                    both.append(found_shape == shape and found_colour == colour)
            key = f"{method}_w{guidance_scale:g}"
            correct[key] = np.array(both)
            accuracy = float(np.mean(both))
            results[key] = {
                "both": accuracy,
                "both_standard_error": float(np.sqrt(accuracy * (1 - accuracy) / len(both))),
                "shape": float(np.mean(shapes)),
                "color": float(np.mean(colours)),
                "found": float(np.mean(found)),
                "num_samples": len(both),
            }
            print(f"composition, {METHODS[method][0]}, w = {guidance_scale:g}: {results[key]}", flush=True)
            save_grid(np.concatenate(grid), len(pairs), figures / f"downstream_compose_{key}.png")
    for guidance_scale in GUIDANCE_SCALES:
        eq14, poe = correct[f"eq14_w{guidance_scale:g}"], correct[f"poe_w{guidance_scale:g}"]
        results[f"paired_w{guidance_scale:g}"] = {
            "eq14_only": int((eq14 & ~poe).sum()),
            "poe_only": int((poe & ~eq14).sum()),
        }
    return results


def unconditional_reference(args: argparse.Namespace, pipe: CDRLComposePipeline) -> dict:
    """Unconditional samples (the null-class energy): how often they show a valid shape, and the pair accuracy
    expected when they are checked against a uniformly drawn target pair (chance level of the composition task)."""
    num_samples = 9 * args.num_compose_samples
    generator = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(num_samples, 3, RESOLUTION, RESOLUTION, generator=generator)
    with network_precision(args):  # Eq. 14 with gamma = 0: the null-class energy alone
        array = pipe(0, concept_weights=[0.0], batch_size=num_samples, latents=latents, output_type="np").images
    found = detect_batch(array)
    counts: dict[str, int] = {}
    for shape, colour in found:
        if shape is not None:
            counts[f"{shape}/{colour}"] = counts.get(f"{shape}/{colour}", 0) + 1
    found_rate = sum(counts.values()) / num_samples
    return {"found": found_rate, "chance_both": found_rate / 9, "pair_counts": counts, "num_samples": num_samples}


def detector_check(rows) -> float:
    """Accuracy of the detector on real images: it must read both attributes of every rendered shape."""
    truth = attribute_names(rows)
    found = detect_batch(as_array([row["image"] for row in rows]))
    return float(np.mean([pair == tuple(result) for pair, result in zip(truth, found)]))


INPAINT_MASKS = ("square", "right half")


def inpainting_mask(kind: str) -> np.ndarray:
    """Boolean (H, W) mask, True = generate: the centre square of half the side (App. C's regular mask) or the
    right half (every shape of the dataset crosses the middle column, so part of it stays visible)."""
    mask = np.zeros((RESOLUTION, RESOLUTION), dtype=bool)
    if kind == "square":
        mask[RESOLUTION // 4 : 3 * RESOLUTION // 4, RESOLUTION // 4 : 3 * RESOLUTION // 4] = True
    else:
        mask[:, RESOLUTION // 2 :] = True
    return mask


def pixel_classes(images: np.ndarray) -> np.ndarray:
    """Each pixel's label as the detector reads it: 0 = background (brightest channel at most
    FOREGROUND_THRESHOLD), else 1 + the index of the nearest of COLORS; images (..., H, W, 3) in [0, 1]."""
    pixels = images.astype(np.float64) * 255.0
    palette = np.array(list(COLORS.values()), dtype=np.float64)
    nearest = np.argmin(((pixels[..., None, :] - palette) ** 2).sum(axis=-1), axis=-1)
    return np.where(pixels.max(axis=-1) > FOREGROUND_THRESHOLD, nearest + 1, 0)


def region_scores(filled: np.ndarray, truth: np.ndarray, masked: np.ndarray, labels: bool = True) -> dict:
    """Squared error, pixel-label accuracy and foreground IoU on the masked region.

    ``filled`` is (N, H, W, 3) or (N, S, H, W, 3) (S samples per image), ``truth`` (N, H, W, 3), ``masked`` (H, W).
    """
    target = truth[:, None] if filled.ndim == 5 else truth
    error = float(((filled - target)[..., masked, :] ** 2).mean())
    if not labels:
        return {"mse": error, "pixel_accuracy": None, "foreground_iou": None}
    predicted = pixel_classes(filled)[..., masked]
    expected = np.broadcast_to(pixel_classes(target)[..., masked], predicted.shape)
    union = ((predicted > 0) | (expected > 0)).sum(axis=-1)
    overlap = ((predicted > 0) & (expected > 0)).sum(axis=-1)
    iou = np.where(union > 0, overlap / np.maximum(union, 1), 1.0)
    return {"mse": error, "pixel_accuracy": float((predicted == expected).mean()), "foreground_iou": float(iou.mean())}


def inpainting(args: argparse.Namespace, pipe: CDRLComposePipeline, figures: Path) -> dict:
    """Per mask: squared error, pixel-label accuracy and foreground IoU on the masked region, vs. two fills."""
    rows = load_shapes_dataset(num_samples=args.num_inpaint_images, resolution=RESOLUTION, seed=1)
    truth = as_array([row["image"] for row in rows])  # (N, H, W, 3) in [0, 1]
    train = load_shapes_dataset(resolution=RESOLUTION, seed=0)
    mean_image = as_array([row["image"] for row in train]).mean(axis=0)
    seeds = args.num_inpaint_seeds
    inpaint = CDRLInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)

    results: dict = {}
    for kind in INPAINT_MASKS:
        masked = inpainting_mask(kind)
        generators = [torch.Generator().manual_seed(args.seed + index) for index in range(len(truth) * seeds)]
        with network_precision(args):
            outputs = inpaint(
                to_model_input(np.repeat(truth, seeds, axis=0)),
                torch.from_numpy(masked.astype(np.float32)),
                generator=generators,
                output_type="np",
            ).images.reshape(len(truth), seeds, *truth.shape[1:])

        fills = {
            "fill: training mean image": np.where(masked[None, :, :, None], mean_image[None], truth),
            "fill: black (background)": np.where(masked[None, :, :, None], 0.0, truth),
        }
        results[kind] = {
            "CDRL, one sample": region_scores(outputs, truth, masked),
            f"CDRL, mean of {seeds} samples": region_scores(outputs.mean(axis=1), truth, masked, labels=False),
            **{name: region_scores(fill, truth, masked) for name, fill in fills.items()},
            "max_error_on_known_pixels": float(np.abs(outputs[:, :, ~masked] - truth[:, None, ~masked]).max()),
        }
        print(f"inpainting, {kind} mask: {results[kind]}", flush=True)

        shown = min(8, len(truth))
        grid = []
        for index in range(shown):
            masked_input = np.where(masked[:, :, None], 0.5, truth[index])
            grid += [truth[index], masked_input, *outputs[index]]
        save_grid(np.stack(grid), shown, figures / f"downstream_inpaint_{kind.replace(' ', '_')}.png")
    return {"masks": results, "num_images": len(truth), "seeds": seeds}


def ood(args: argparse.Namespace, pipe: CDRLComposePipeline) -> dict:
    """AUROC of the level-0 log-density (null class) of held-out shapes against shifted sets (Sec. 4.4)."""
    held_out = load_shapes_dataset(num_samples=args.num_ood_images, resolution=RESOLUTION, seed=1)
    training = load_shapes_dataset(resolution=RESOLUTION, seed=0).select(range(args.num_ood_images))
    digits = load_digits_dataset(resolution=RESOLUTION).shuffle(seed=args.seed).select(range(args.num_ood_images))
    in_images = to_model_input(as_array([row["image"] for row in held_out]))
    generator = torch.Generator().manual_seed(args.seed)
    out_sets = {shift: shift_images(in_images, shift, generator) for shift in OOD_SHIFTS}
    out_sets["digits"] = to_model_input(as_array([row["image"] for row in digits]))
    in_scores = pipe.log_density(in_images)
    results = {name: ood_auroc(in_scores, pipe.log_density(images)) for name, images in out_sets.items()}
    # Sanity: held-out vs. training images of the same distribution should be near 0.5 (no memorisation).
    results["training shapes (same distribution)"] = ood_auroc(
        in_scores, pipe.log_density(to_model_input(as_array([row["image"] for row in training])))
    )
    print(f"OOD AUROC: {results}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    lines = ["# Downstream benchmark results (generated by `benchmarks/downstream.py`)", ""]
    lines += [f"Command: `{report['command']}`", ""]
    lines += [f"Training: {report['training']}", ""]
    lines += [
        f"Detector accuracy on {report['detector']['num_images']} real held-out images: "
        f"{report['detector']['accuracy']:.3f}",
        "",
    ]
    lines += [
        "## Two-attribute composition accuracy",
        "",
        f"{report['settings']['num_compose_samples']} samples per (shape, colour) pair, 9 pairs; all methods use "
        "the same seeds. Both attributes: accuracy ± binomial standard error.",
        "",
        "| method | w | both attributes | shape | colour | clean shape |",
        "|---|---|---|---|---|---|",
    ]
    for method, (name, _, _) in METHODS.items():
        for guidance_scale in GUIDANCE_SCALES:
            row = report["composition"].get(f"{method}_w{guidance_scale:g}")
            if row is None:
                continue
            lines.append(
                f"| {name} | {guidance_scale:g} | {row['both']:.3f} ± {row['both_standard_error']:.3f} | "
                f"{row['shape']:.3f} | {row['color']:.3f} | {row['found']:.3f} |"
            )
    lines += ["", "Paired samples (same seed) that only one method gets right:", ""]
    for guidance_scale in GUIDANCE_SCALES:
        paired = report["composition"][f"paired_w{guidance_scale:g}"]
        lines.append(
            f"- w = {guidance_scale:g}: Eq. 14 only {paired['eq14_only']}, "
            f"product of experts only {paired['poe_only']}"
        )
    reference = report["unconditional"]
    lines += [
        "",
        f"Unconditional samples (chance level): clean shape {reference['found']:.3f}, "
        f"expected accuracy against a random pair {reference['chance_both']:.3f}.",
        "",
    ]
    inpaint = report["inpainting"]
    lines += [
        "## Inpainting",
        "",
        f"{inpaint['num_images']} held-out images x {inpaint['seeds']} seeds, unconditional (null-class) model. "
        "On the masked region only: squared error per pixel and channel in [0, 1]; pixel accuracy = each pixel's "
        "label as the detector reads it (background, or the nearest colour) equals the truth's; foreground IoU of the "
        "non-background pixels of the result and of the truth (1 when both are empty).",
    ]
    for kind, rows in inpaint["masks"].items():
        lines += [
            "",
            f"**{kind} mask** (largest error on known pixels: {rows['max_error_on_known_pixels']:.2g})",
            "",
            "| method | MSE | pixel accuracy | foreground IoU |",
            "|---|---|---|---|",
        ]
        for name, row in rows.items():
            if name == "max_error_on_known_pixels":
                continue
            cells = [
                f"{row[key]:.3f}" if row[key] is not None else "-" for key in ("pixel_accuracy", "foreground_iou")
            ]
            lines.append(f"| {name} | {row['mse']:.4f} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "## OOD detection (AUROC, level-0 log-density, null class)",
        "",
        f"{report['settings']['num_ood_images']} held-out shapes against each set.",
        "",
        "| OOD set | AUROC |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.3f} |" for name, value in report["ood"].items()]
    lines += ["", f"Timings (s): {report['timings']}", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Composition, inpainting and OOD benchmark on coloured shapes.")
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "downstream"), help="Trained model folder.")
    parser.add_argument("--docs_dir", default=str(ROOT / "docs"))
    parser.add_argument("--reuse_model", action="store_true", help="Skip training when the model already exists.")
    training = parser.add_argument_group("training (left out: examples/train_cdrl.py's defaults, the main job's)")
    training.add_argument("--max_train_steps", type=cli_positive_int)
    training.add_argument("--train_batch_size", type=cli_positive_int)
    training.add_argument("--num_langevin_steps", type=cli_positive_int, help="K for training and sampling.")
    training.add_argument("--mixed_precision", choices=["no", "bf16"], help="bf16 needs AMX to pay.")
    training.add_argument("--cpu_threads", type=cli_positive_int, help="Training threads (the script's default: all).")
    training.add_argument(
        "--conditional_initializer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Train a class-conditional initializer, so that compositions can compose its proposals too.",
    )
    parser.add_argument("--num_compose_samples", type=int, default=64, help="Samples per (shape, colour) pair.")
    parser.add_argument("--num_inpaint_images", type=int, default=64)
    parser.add_argument("--num_inpaint_seeds", type=int, default=4)
    parser.add_argument("--num_ood_images", type=int, default=512)
    parser.add_argument("--grid_columns", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model_dir = Path(args.output_dir) / "model"
    figures, results_dir = Path(args.docs_dir) / "figures", Path(args.docs_dir) / "results"
    figures.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    reused = args.reuse_model and (model_dir / "model_index.json").exists()
    if not reused:
        timings["training"] = round(train(args, model_dir), 1)
    training = ("reused: " if reused else "") + training_summary(model_dir)
    pipe = CDRLComposePipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    print(f"classes: {pipe.class_names}", flush=True)

    report: dict = {
        "command": "python benchmarks/downstream.py " + " ".join(argv or sys.argv[1:]),
        "training": training,
        "settings": vars(args),
    }
    held_out = load_shapes_dataset(num_samples=512, resolution=RESOLUTION, seed=1)
    report["detector"] = {"accuracy": detector_check(held_out), "num_images": len(held_out)}
    steps = [
        ("composition", lambda: composition(args, pipe, figures)),
        ("unconditional", lambda: unconditional_reference(args, pipe)),
        ("inpainting", lambda: inpainting(args, pipe, figures)),
        ("ood", lambda: ood(args, pipe)),
    ]
    for name, step in steps:
        start = time.time()
        report[name] = step()
        timings[name] = round(time.time() - start, 1)
    report["timings"] = timings
    (results_dir / "downstream.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (results_dir / "downstream.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
