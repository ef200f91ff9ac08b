#!/usr/bin/env python
"""Out-of-distribution detection with the energy of a trained CDRL model (Sec. 4.4, Table 4).

    python examples/ood_detection.py --model outputs/cdrl-model
    python examples/ood_detection.py --model outputs/my-model --image_dir test_images --other_image_dir other_images

Every image is scored by its unnormalised log-density at the lowest noise level (``CDRLPipeline.log_density``:
higher = more in-distribution). The in-distribution test set is a held-out draw of the embedded dataset the model
was trained on (``--embedded_dataset``) or a folder of images (``--image_dir``). It is compared with shifted copies
of itself (uniform noise, shuffled pixels, inverted images, interpolations of two images, quarter-turn rotations,
left-right flips, periodic gratings) and with a different dataset (the other embedded dataset, or
``--other_image_dir``). The script prints an AUROC table (1 = perfectly separated, 0.5 = chance) and writes it as
JSON.
"""

from __future__ import annotations

import argparse
import json
import os

import PIL.Image
import torch

from cdrl_diffusers import CDRLPipeline
from cdrl_diffusers.data import load_digits_dataset, load_shapes_dataset
from cdrl_diffusers.evaluation import OOD_SHIFTS, ood_auroc, shift_images
from cdrl_diffusers.validation import cli_device, cli_non_negative_int, cli_positive_int

SHIFT_NAMES = {
    "uniform": "uniform noise",
    "shuffled": "shuffled pixels",
    "inverted": "inverted images",
    "interpolated": "interpolated pairs",
    "rotated": "rotated a quarter turn",
    "flipped": "flipped left-right",
    "upside_down": "flipped upside down",
    "periodic": "periodic gratings",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="OOD detection with a trained CDRL pipeline.")
    parser.add_argument("--model", required=True, help="A folder saved by a CDRL pipeline (save_pretrained).")
    parser.add_argument("--embedded_dataset", choices=["shapes", "digits"], default="shapes")
    parser.add_argument("--image_dir", default=None, help="In-distribution test images (instead of embedded data).")
    parser.add_argument("--other_image_dir", default=None, help="A different dataset (default: the other embedded).")
    parser.add_argument("--num_images", type=cli_positive_int, default=512, help="Images per set.")
    parser.add_argument(
        "--noise_level", type=cli_non_negative_int, default=0, help="The EBM that scores (0: the paper's choice)."
    )
    parser.add_argument("--batch_size", type=cli_positive_int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default="outputs/ood/auroc.json")
    parser.add_argument("--device", type=cli_device, default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def load_rows(source: str, num_images: int, resolution: int, seed: int):
    if source == "digits":
        return load_digits_dataset(resolution=resolution).shuffle(seed=seed), "sklearn digits"
    if source == "shapes":  # training draws the shapes with seed 0
        return load_shapes_dataset(num_samples=num_images, resolution=resolution, seed=seed + 1), "coloured shapes"
    from datasets import load_dataset

    return load_dataset("imagefolder", data_dir=source, split="train").shuffle(seed=seed), os.path.basename(source)


def as_tensor(pipe: CDRLPipeline, rows, num_images: int) -> torch.Tensor:
    """Images in [-1, 1] at the model's resolution and number of channels."""
    config = pipe.energy_model.config
    mode = "L" if config.in_channels == 1 else "RGB"
    size = (config.sample_size, config.sample_size)
    images = [
        rows[index]["image"].convert(mode).resize(size, PIL.Image.Resampling.BICUBIC)
        for index in range(min(num_images, len(rows)))
    ]
    return pipe.image_processor.preprocess(images)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = CDRLPipeline.from_pretrained(args.model).to(args.device)
    resolution = pipe.energy_model.config.sample_size
    in_source = args.image_dir or args.embedded_dataset
    other_source = args.other_image_dir or ("digits" if args.embedded_dataset == "shapes" else "shapes")
    in_rows, in_name = load_rows(in_source, args.num_images, resolution, args.seed)
    other_rows, other_name = load_rows(other_source, args.num_images, resolution, args.seed)
    in_images = as_tensor(pipe, in_rows, args.num_images)

    generator = torch.Generator().manual_seed(args.seed)
    out_sets = {SHIFT_NAMES[shift]: shift_images(in_images, shift, generator) for shift in OOD_SHIFTS}
    out_sets[f"{other_name} (other dataset)"] = as_tensor(pipe, other_rows, args.num_images)

    def score(images: torch.Tensor) -> torch.Tensor:
        return pipe.log_density(images, noise_level=args.noise_level, batch_size=args.batch_size)

    in_scores = score(in_images)
    results = {}
    for name, images in out_sets.items():
        out_scores = score(images)
        results[name] = {
            "auroc": ood_auroc(in_scores, out_scores),
            "mean_log_density": out_scores.mean().item(),
            "num_images": len(out_scores),
        }

    print(f"In-distribution: {in_name}, {len(in_scores)} images, mean log-density {in_scores.mean().item():.4g}")
    print("\n| OOD set | AUROC | mean log-density |\n|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['auroc']:.3f} | {result['mean_log_density']:.4g} |")
    os.makedirs(os.path.dirname(args.output_json) or ".", exist_ok=True)
    with open(args.output_json, "w") as file:
        summary = {"in_distribution": in_name, "mean_log_density": in_scores.mean().item(), "ood": results}
        json.dump(summary, file, indent=2)
    print(f"\nWrote {args.output_json}")


if __name__ == "__main__":
    main()
