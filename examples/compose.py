#!/usr/bin/env python
"""Compositional generation with a trained attribute-conditional CDRL model (Sec. 3.6 and 4.5, Figures 4 and 10).

Train a compositional model first (each image is assigned to the class of one randomly picked attribute), e.g.

    python examples/train_cdrl.py --attribute_columns shape color --output_dir outputs/shapes-attributes

then compose its concepts:

    python examples/compose.py --model outputs/shapes-attributes --guidance_scales 0 1 3
    python examples/compose.py --model outputs/shapes-attributes \\
        --compositions "shape=circle,color=red" "shape=square,!color=blue" --guidance_scales 3

A composition is a comma-separated list of class names; a leading ``!`` negates a concept (NOT). With strength w
every concept gets weight 1 + w and every negated concept -(1 + w); the unconditional energy gets one minus their
sum, which is Eq. 14 when nothing is negated. ``--product_of_experts`` drops the negative unconditional term (the
baseline of Du et al., 2020). For each w, ``compose_w{w}.png`` has one row per composition and one column per
seed; the seeds are shared across w, so the same cell of two grids starts from the same noise (as Figure 10).
"""

from __future__ import annotations

import argparse
import itertools
import os

import PIL.Image
import torch
from diffusers.utils import make_image_grid

from cdrl_diffusers import CDRLComposePipeline
from cdrl_diffusers.validation import cli_device, cli_non_negative_float, cli_non_negative_int, cli_positive_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compose concepts with a trained CDRL pipeline (Eq. 14).")
    parser.add_argument("--model", required=True, help="A folder saved by a class/attribute-conditional pipeline.")
    parser.add_argument("--output_dir", default="outputs/compose", help="Where the grids are written.")
    parser.add_argument(
        "--compositions",
        nargs="+",
        default=None,
        help="Comma-separated class names per row, '!' negates; default: every pair of values of the first two "
        "attributes (class names like 'shape=circle').",
    )
    parser.add_argument(
        "--guidance_scales", type=cli_non_negative_float, nargs="+", default=[0.0, 1.0, 3.0], help="Values of w."
    )
    parser.add_argument("--num_samples", type=cli_positive_int, default=8, help="Columns of each grid.")
    parser.add_argument("--product_of_experts", action="store_true", help="The baseline without the negative term.")
    parser.add_argument("--compose_initializer", action="store_true", help="Compose a conditional initializer too.")
    parser.add_argument(
        "--num_langevin_steps",
        type=cli_non_negative_int,
        default=None,
        help="K' (default: the trained K; 0: the initializer's proposals alone).",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upscale", type=cli_positive_int, default=4, help="Nearest-neighbour zoom of the grids.")
    parser.add_argument("--device", type=cli_device, default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def default_compositions(class_names: list[str]) -> list[str]:
    """All pairs of values of the first two attributes, from class names 'attribute=value'."""
    attributes: dict[str, list[str]] = {}
    for name in class_names:
        attribute, separator, _ = name.partition("=")
        if not separator:
            raise ValueError(f"Class {name!r} is not named 'attribute=value': pass --compositions explicitly.")
        attributes.setdefault(attribute, []).append(name)
    if len(attributes) < 2:
        raise ValueError(f"The model has one attribute ({list(attributes)}): pass --compositions explicitly.")
    first, second = list(attributes.values())[:2]
    return [f"{a},{b}" for a, b in itertools.product(first, second)]


def parse_composition(text: str, guidance_scale: float) -> tuple[list[str], list[float]]:
    """Concepts and their weights: 1 + w, or -(1 + w) for a concept written '!name'."""
    concepts, weights = [], []
    for item in text.split(","):
        item = item.strip()
        negated = item.startswith("!")
        concepts.append(item[1:] if negated else item)
        weights.append(-(1.0 + guidance_scale) if negated else 1.0 + guidance_scale)
    return concepts, weights


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pipe = CDRLComposePipeline.from_pretrained(args.model).to(args.device)
    if not pipe.class_names:
        raise ValueError("The model has no class names; train it with --attribute_columns or --label_column.")
    compositions = args.compositions or default_compositions(pipe.class_names)
    os.makedirs(args.output_dir, exist_ok=True)
    method = "product of experts" if args.product_of_experts else "Eq. 14"
    for guidance_scale in args.guidance_scales:
        rows = []
        for text in compositions:
            concepts, weights = parse_composition(text, guidance_scale)
            generators = [
                torch.Generator(device=args.device).manual_seed(args.seed + index) for index in range(args.num_samples)
            ]
            rows += pipe(
                concepts,
                concept_weights=weights,
                batch_size=args.num_samples,
                num_langevin_steps=args.num_langevin_steps,
                generator=generators,
                product_of_experts=args.product_of_experts,
                compose_initializer=args.compose_initializer,
            ).images
        grid = make_image_grid([image.convert("RGB") for image in rows], rows=len(compositions), cols=args.num_samples)
        grid = grid.resize((grid.width * args.upscale, grid.height * args.upscale), PIL.Image.Resampling.NEAREST)
        suffix = "_poe" if args.product_of_experts else ""
        path = os.path.join(args.output_dir, f"compose_w{guidance_scale:g}{suffix}.png")
        grid.save(path)
        print(f"Wrote {path} ({method}, w = {guidance_scale:g})")
    print("Rows, top to bottom:\n" + "\n".join(f"  {index}: {text}" for index, text in enumerate(compositions)))


if __name__ == "__main__":
    main()
