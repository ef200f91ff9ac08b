#!/usr/bin/env python
"""Inpaint images with a trained CDRL model and write a PNG grid (App. C of the paper).

    python examples/inpaint.py --model outputs/cdrl-model
    python examples/inpaint.py --model outputs/cdrl-model --mask irregular --num_seeds 6 --image_dir my_images

Each row of ``inpaint.png`` shows one input image, its mask (white = generated), the masked input (grey where the
model fills in) and one inpainting per seed. Inputs are held-out images of the embedded dataset the model was
trained on (``--embedded_dataset``, drawn with another seed than training) or a folder of images (``--image_dir``,
loaded with ``datasets``' imagefolder and resized to the model's resolution).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import PIL.Image
import torch
from diffusers.utils import make_image_grid

from cdrl_diffusers import CDRLInpaintPipeline
from cdrl_diffusers.data import load_digits_dataset, load_shapes_dataset
from cdrl_diffusers.validation import cli_device, cli_non_negative_float, cli_non_negative_int, cli_positive_int

MASKS = ("square", "half", "irregular")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Inpaint images with a trained CDRL pipeline.")
    parser.add_argument("--model", required=True, help="A folder saved by a CDRL pipeline (save_pretrained).")
    parser.add_argument("--output_dir", default="outputs/inpaint", help="Where the grid and masks are written.")
    parser.add_argument("--embedded_dataset", choices=["shapes", "digits"], default="shapes")
    parser.add_argument("--image_dir", default=None, help="A folder of images to inpaint instead.")
    parser.add_argument("--num_images", type=cli_positive_int, default=6, help="Rows of the grid.")
    parser.add_argument("--num_seeds", type=cli_positive_int, default=4, help="Inpaintings per image.")
    parser.add_argument(
        "--mask",
        choices=MASKS,
        default="square",
        help="square: the centre square of half the side; half: the right half; irregular: random brush strokes.",
    )
    parser.add_argument("--class_label", default=None, help="Class name or id for a class-conditional model.")
    parser.add_argument(
        "--guidance_scale", type=cli_non_negative_float, default=0.0, help="Classifier-free guidance w (Eq. 11-12)."
    )
    parser.add_argument(
        "--num_langevin_steps",
        type=cli_non_negative_int,
        default=None,
        help="K' (default: the trained K; 0: the initializer's proposals alone).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale", type=cli_positive_int, default=4, help="Nearest-neighbour zoom of the grid.")
    parser.add_argument("--device", type=cli_device, default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def make_mask(kind: str, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """A (resolution, resolution) float mask in {0, 1}, 1 = generate."""
    mask = np.zeros((resolution, resolution), dtype=np.float32)
    if kind == "square":
        start = resolution // 4
        mask[start : start + resolution // 2, start : start + resolution // 2] = 1.0
    elif kind == "half":
        mask[:, resolution // 2 :] = 1.0
    else:  # a few random strokes of discs, as irregular inpainting masks are usually drawn
        rows, cols = np.mgrid[:resolution, :resolution] + 0.5
        radius = max(1.0, resolution / 10)
        for _ in range(3):
            position = rng.uniform(0, resolution, size=2)
            for _ in range(resolution // 2):
                position = np.clip(position + rng.normal(0, radius, size=2), 0, resolution)
                mask[(rows - position[0]) ** 2 + (cols - position[1]) ** 2 <= radius**2] = 1.0
    return mask


def load_images(args: argparse.Namespace, resolution: int, mode: str) -> list[PIL.Image.Image]:
    if args.image_dir:
        from datasets import load_dataset

        rows = load_dataset("imagefolder", data_dir=args.image_dir, split="train")
    elif args.embedded_dataset == "digits":
        rows = load_digits_dataset(resolution=resolution).shuffle(seed=args.seed)
    else:  # held out from training, which draws the shapes with seed 0
        rows = load_shapes_dataset(num_samples=args.num_images, resolution=resolution, seed=args.seed + 1)
    images = [rows[index]["image"] for index in range(min(args.num_images, len(rows)))]
    resample = PIL.Image.Resampling.BICUBIC
    return [image.convert(mode).resize((resolution, resolution), resample) for image in images]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = CDRLInpaintPipeline.from_pretrained(args.model).to(args.device)
    config = pipe.energy_model.config
    resolution, mode = config.sample_size, ("L" if config.in_channels == 1 else "RGB")
    images = load_images(args, resolution, mode)
    rng = np.random.default_rng(args.seed)
    masks = [make_mask(args.mask, resolution, rng) for _ in images]

    # One batch: every image repeated once per seed, with one generator per sample.
    batch_images = [image for image in images for _ in range(args.num_seeds)]
    batch_masks = [mask for mask in masks for _ in range(args.num_seeds)]
    generators = [
        torch.Generator(device=args.device).manual_seed(args.seed + seed)
        for _ in images
        for seed in range(args.num_seeds)
    ]
    class_labels = None
    if args.class_label is not None:
        class_labels = int(args.class_label) if args.class_label.isdigit() else args.class_label
    outputs = pipe(
        batch_images,
        batch_masks,
        class_labels=class_labels,
        guidance_scale=args.guidance_scale,
        num_langevin_steps=args.num_langevin_steps,
        generator=generators,
    ).images

    cells = []
    for row, (image, mask) in enumerate(zip(images, masks)):
        pixels = np.asarray(image.convert("RGB")).copy()
        pixels[mask.astype(bool)] = 128
        mask_image = PIL.Image.fromarray((mask * 255).astype(np.uint8)).convert("RGB")
        row_outputs = outputs[row * args.num_seeds : (row + 1) * args.num_seeds]
        cells += [image.convert("RGB"), mask_image, PIL.Image.fromarray(pixels)] + [
            output.convert("RGB") for output in row_outputs
        ]
    grid = make_image_grid(cells, rows=len(images), cols=3 + args.num_seeds)
    grid = grid.resize((grid.width * args.upscale, grid.height * args.upscale), PIL.Image.Resampling.NEAREST)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"inpaint_{args.mask}.png")
    grid.save(path)
    print(f"Wrote {path}: rows = images; columns = input, mask, masked input, {args.num_seeds} seeds.")


if __name__ == "__main__":
    main()
