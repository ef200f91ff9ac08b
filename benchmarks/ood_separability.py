#!/usr/bin/env python
"""How separable is each OOD shift of the digits benchmark at all? A supervised reference for CDRL's AUROCs.

CDRL's OOD score (``log_density``, Sec. 4.4) never sees a shifted image while it trains. This script gives the
score an upper reference: for each shift of ``benchmarks/digits_guidance.py`` it trains a small CNN to tell the
training digits from shifted copies of them, then reports the AUROC of that discriminator on the held-out digits
against shifted held-out digits, the same pairs CDRL is scored on. A shift that the supervised discriminator cannot
separate (AUROC near 0.5) cannot be detected by any density either; a shift it separates well is a real miss of the
density when CDRL's AUROC stays low. For the left-right flip it also reports the AUROC per digit class, since some
digits (0, 1, 8) are nearly symmetric.

    python benchmarks/ood_separability.py     # a few minutes on one core

It writes docs/results/ood_separability.json, beside CDRL's AUROCs from docs/results/digits_guidance.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from digits_guidance import OOD_SETS, TRAINING_FLAGS, model_training_digits
from torch import nn

from cdrl_diffusers.evaluation import ood_auroc, shift_images
from cdrl_diffusers.validation import cli_positive_int

ROOT = Path(__file__).resolve().parents[1]


def discriminator() -> nn.Module:
    """A three-layer CNN on 16x16 single-channel images: one logit, higher = shifted."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 1),
    )


def separability(
    trained_on: torch.Tensor, held_out: torch.Tensor, shift: str, steps: int, seed: int
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Held-out AUROC of a discriminator trained on real vs shifted training digits; also its held-out scores."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.cat([trained_on, shift_images(trained_on, shift, generator)])
    targets = torch.cat([torch.zeros(len(trained_on)), torch.ones(len(trained_on))])
    torch.manual_seed(seed)
    model = discriminator()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = torch.randint(len(inputs), (128,), generator=generator)
        loss = nn.functional.binary_cross_entropy_with_logits(model(inputs[batch]).squeeze(1), targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        # Random shifts (periodic, uniform, shuffled) draw their held-out copies from a generator of their own.
        real = -model(held_out).squeeze(1)
        shifted = -model(shift_images(held_out, shift, torch.Generator().manual_seed(seed + 1))).squeeze(1)
    return ood_auroc(real, shifted), real, shifted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=cli_positive_int, default=3000, help="Discriminator updates per shift.")
    parser.add_argument("--threads", type=cli_positive_int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cdrl_results", type=Path, default=ROOT / "docs" / "results" / "digits_guidance.json")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "ood_separability.json")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    (trained_on, _), (held_out, held_out_labels) = model_training_digits(TRAINING_FLAGS)
    cdrl = json.loads(args.cdrl_results.read_text())["cdrl"]["ood"]["auroc"] if args.cdrl_results.exists() else {}
    results: dict = {"command": "python benchmarks/ood_separability.py", "steps": args.steps, "shifts": {}}
    for shift, name in OOD_SETS.items():
        auroc, real, shifted = separability(trained_on, held_out, shift, args.steps, args.seed)
        entry = {"supervised_auroc": auroc, "cdrl_log_density_auroc": cdrl.get(name)}
        if shift == "flipped":
            entry["supervised_auroc_per_digit"] = {
                str(digit): ood_auroc(real[held_out_labels == digit], shifted[held_out_labels == digit])
                for digit in range(10)
            }
        results["shifts"][name] = entry
        print(f"{name}: supervised {auroc:.3f}, CDRL {entry['cdrl_log_density_auroc']}", flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"Wrote {args.results}")
    return results


if __name__ == "__main__":
    main(parse_args())
