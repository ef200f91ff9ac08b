#!/usr/bin/env python
"""Fewer Langevin steps with the sampling adjustment (Sec. 4.2, Table 2, Table 9) and the roles of the initializer and
the EBM (App. F, Fig. 8), on the digits model of benchmarks/digits_guidance.py.

The model was trained with K Langevin steps per level (8 in the digits recipe). Sampling with K' steps scales the step
size by sqrt(K / K') (``num_langevin_steps=K'``). Settings, all from the same initial noise x_T:

- K' in {15, 8, 5, 3}: initializer proposal + K' adjusted Langevin steps per level (Table 2);
- initializer alone: the proposals without Langevin (``num_langevin_steps=0``, Fig. 8a);
- Langevin alone: the trained K steps per level from x_{t+1} instead of the proposal (``use_initializer=False``).

Samples are class-conditional with guidance w = 1 (``--guidance_scale``), where this small model's samples show
their class; quality is scored as in digits_guidance.py (classifier accuracy, Fréchet classifier distance,
diversity) and time is the sampling wall-clock relative to the trained K (Table 9's time column as ratios).

One command, after digits_guidance.py has trained the model:

    flock /tmp/cdrl_heavy.lock python benchmarks/sampling_steps.py

It writes docs/results/sampling_steps.json, docs/figures/sampling_steps.png and
docs/figures/sampling_steps_samples.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from digits_guidance import (  # noqa: E402
    REPO,
    digit_splits,
    evaluation_classifier,
    generate,
    load_pipeline,
    real_data_scores,
    save_sample_rows,
)

from cdrl_diffusers.evaluation import score_samples  # noqa: E402

LANGEVIN_STEPS = (15, 8, 5, 3)


def settings(trained_steps: int) -> list[dict]:
    """Name and sampler options of each setting, in the order of the table."""
    rows = [{"name": f"K'={steps}", "num_langevin_steps": steps, "use_initializer": True} for steps in LANGEVIN_STEPS]
    rows.append({"name": "initializer alone", "num_langevin_steps": 0, "use_initializer": True})
    rows.append({"name": "Langevin alone", "num_langevin_steps": trained_steps, "use_initializer": False})
    return rows


def save_quality_plot(results: dict, path: Path) -> None:
    rows = {row["name"]: row for row in results["settings"]}
    adjusted = [rows[f"K'={steps}"] for steps in LANGEVIN_STEPS]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("frechet_distance", "Fréchet classifier distance (lower is better)"), ("accuracy", "accuracy")]
    for axis, (key, title) in zip(axes[:2], panels):
        axis.plot(LANGEVIN_STEPS, [row[key] for row in adjusted], "o-", label="proposal + K' adjusted steps")
        axis.axhline(rows["initializer alone"][key], color="tab:orange", linestyle=":", label="initializer alone")
        axis.axhline(rows["Langevin alone"][key], color="tab:red", linestyle="-.", label="Langevin alone (trained K)")
        axis.axhline(results["real_data"][key], color="gray", linestyle="--", label="held-out real digits")
        axis.set_xlabel("Langevin steps per level K'")
        axis.set_xticks(LANGEVIN_STEPS)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    names = [row["name"] for row in results["settings"]]
    axes[2].barh(names, [row["time_ratio"] for row in results["settings"]], color="tab:blue")
    axes[2].invert_yaxis()
    axes[2].set_xlabel(f"sampling time relative to the trained K'={results['trained_langevin_steps']}")
    axes[2].set_title("wall-clock (Table 9 as ratios)", fontsize=10)
    figure.suptitle("Sampling adjustment on 16x16 digits (cf. the paper's Table 2 and Fig. 8)", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, default=REPO / "outputs" / "digits_cdrl")
    parser.add_argument("--guidance_scale", type=float, default=1.0, help="Guidance weight w of every setting.")
    parser.add_argument("--samples_per_class", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for sampling.")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results" / "sampling_steps.json")
    parser.add_argument("--figures", type=Path, default=REPO / "docs" / "figures")
    parser.add_argument("--classifier_cache", type=Path, default=REPO / "outputs" / "classifier_cache")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model_dir)
    trained_steps = pipeline.scheduler.config.num_langevin_steps
    splits = digit_splits()
    classifier, classifier_accuracies = evaluation_classifier(splits, args.classifier_cache)
    labels = torch.arange(10 * args.samples_per_class) % 10

    rows, images = [], {}
    for setting in settings(trained_steps):
        samples, seconds = generate(
            pipeline,
            labels,
            guidance_scale=args.guidance_scale,
            num_langevin_steps=setting["num_langevin_steps"],
            use_initializer=setting["use_initializer"],
        )
        scores = score_samples(classifier, samples, labels, *splits.reference)
        rows.append({**setting, **scores.to_dict(), "sampling_seconds": seconds})
        images[setting["name"]] = samples[:20]
        print(
            f"{setting['name']:<18} FD={scores.frechet_distance:.3f} accuracy={scores.accuracy:.3f} "
            f"diversity={scores.diversity:.3f} KID={scores.kid_mean:.4f} ({seconds:.1f} s)",
            flush=True,
        )
    baseline = next(row for row in rows if row["num_langevin_steps"] == trained_steps and row["use_initializer"])
    for row in rows:
        row["total_langevin_steps"] = pipeline.scheduler.num_noise_levels * row["num_langevin_steps"]
        row["time_ratio"] = row["sampling_seconds"] / baseline["sampling_seconds"]

    results = {
        "description": "Sampling adjustment and initializer/EBM ablation on the digits model, scored offline.",
        "command": shlex.join(["python", "benchmarks/sampling_steps.py", *sys.argv[1:]]),
        "model_dir": str(args.model_dir.relative_to(REPO) if args.model_dir.is_relative_to(REPO) else args.model_dir),
        "trained_langevin_steps": trained_steps,
        "guidance_scale": args.guidance_scale,
        "samples_per_class": args.samples_per_class,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "classifier_held_out_accuracy": classifier_accuracies,
        "settings": rows,
        "real_data": real_data_scores(classifier, splits),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    args.figures.mkdir(parents=True, exist_ok=True)
    save_quality_plot(results, args.figures / "sampling_steps.png")
    save_sample_rows(
        images,
        args.figures / "sampling_steps_samples.png",
        "Same initial noise in each column (labels 0-9, 0-9); rows differ in how each level is sampled",
    )
    print(f"Wrote {args.results} and figures in {args.figures}")
    return results


if __name__ == "__main__":
    main(parse_args())
